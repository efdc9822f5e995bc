"""``aligned``: the strategy that always flushes a buffering proxy, at a bounded cost.

A buffering proxy holds response bytes until it holds ``B`` of them (its buffer size),
then releases either everything it holds ("all") or only whole ``B``-byte blocks,
keeping the rest ("blocks"). A fixed 2 KB of padding per event crosses ``B = 4096`` only
every second event, and ``B = 8192`` every fourth: the others wait for the next event.

``aligned`` keeps count of the bytes it has written on this stream and, to flush, pads
with exactly enough comment bytes that the total becomes a multiple of ``B``. Under
"blocks" the proxy then holds no remainder; under "all" it holds at least ``B`` and so
releases everything. Either way the whole event goes out, headers included (the stream
start is aligned too, so the first block, which carries the headers through nginx, is
released at once).

Each flush ends with at least ``min_tail_bytes`` of padding: nginx's first buffer also
holds the upstream's response headers, which shifts its block boundaries a couple of
hundred bytes before ours, so the last bytes of every flush stay held there.

Cost is bounded by a latency budget ``max_delay_s``: a write within the budget of the
previous flush is held, and one flush, at 90% of the budget, sends everything written
since, padded. So at most one flush happens per budget, and padding stays below about
``B / (0.9 * max_delay_s)`` bytes per second, however fast events come.

Every write the shaper returns starts and ends on a block boundary: nothing goes out
unpadded. An earlier version sent the writes within the budget at once, unpadded, and
padded later; but a proxy reads whatever has arrived, and one read often held a padded
flush *and* the unpadded writes right behind it (a chunk, then its ``step_progress`` and
``insight`` a fraction of a millisecond later). A proxy that releases everything it
holds once it holds ``B`` ("all") then released past our boundary, and from there on
every boundary of ours left it holding less than ``B``: events waited for the next one.

The producer's cadence is set for the same economy: on a buffering path each flush costs
up to a block, so chunks are fuller (1000 chars / 2.5 s) and progress rides along.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs

from strategies.base import Cadence, Tuning
from strategies.padding import padding_comment

__all__ = ["AlignedShaper", "AlignedStrategy"]

DEFAULT_BLOCK_BYTES = 4096
DEFAULT_MAX_DELAY_MS = 100.0
#: Each flush ends with at least this much padding. nginx's first buffer also holds the
#: upstream's response headers (~200 bytes), so its block boundaries sit that far before
#: ours and the last bytes of each flush stay held: they must be padding, not event.
DEFAULT_MIN_TAIL_BYTES = 512
#: Deferred flushes fire at this share of the budget, leaving the rest for the path.
DEADLINE_SHARE = 0.9


@attrs.define
class AlignedShaper:
    """Pads each flush so the stream's byte count lands on a multiple of ``block_bytes``."""

    block_bytes: int
    max_delay_s: float
    min_tail_bytes: int = DEFAULT_MIN_TAIL_BYTES
    written: int = 0
    last_flush_at: float = -math.inf
    flush_due_at: float | None = None
    #: Frames written within the budget of the last flush, waiting for the next one.
    held: list[bytes] = attrs.Factory(list)

    def _pad(self) -> bytes:
        gap = -self.written % self.block_bytes
        if self.block_bytes > 1:
            # A comment line needs 2 bytes, so a gap of 1 also moves to the next boundary.
            need = max(self.min_tail_bytes, 2) if gap or self.min_tail_bytes else 0
            while gap < need:
                gap += self.block_bytes
        padding = padding_comment(gap)
        self.written += len(padding)
        return padding

    def _flush(self, data: bytes, now: float) -> bytes:
        self.written += len(data)
        self.last_flush_at = now
        self.flush_due_at = None
        return data + self._pad()

    def start(self, prefix: bytes, now: float, frames: bytes = b"") -> bytes:
        return self._flush(prefix + frames, now)  # one flush for both

    def write(self, frames: bytes, now: float) -> bytes:
        if self.block_bytes <= 1:  # the path does not buffer: nothing to align or hold
            self.written += len(frames)
            return frames
        self.held.append(frames)
        due = self.last_flush_at + self.max_delay_s * DEADLINE_SHARE
        if now >= due:
            return self.poll(now)
        self.flush_due_at = due
        return b""

    def deadline(self) -> float | None:
        return self.flush_due_at

    def poll(self, now: float) -> bytes:
        """The held frames, padded, once their flush is due (``math.inf``: all of them now)."""
        if not self.held or (self.flush_due_at is not None and now < self.flush_due_at):
            return b""
        data = b"".join(self.held)
        self.held.clear()
        return self._flush(data, now)


@attrs.frozen
class AlignedStrategy:
    """Pads each flush to the proxy's block boundary, at most once per latency budget."""

    name: ClassVar[str] = "aligned"
    cadence: Cadence
    block_bytes: int = DEFAULT_BLOCK_BYTES
    max_delay_s: float = DEFAULT_MAX_DELAY_MS / 1000

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> AlignedStrategy:
        block = (
            DEFAULT_BLOCK_BYTES if tuning.proxy_buffer_bytes is None else tuning.proxy_buffer_bytes
        )
        delay_ms = DEFAULT_MAX_DELAY_MS if tuning.max_delay_ms is None else tuning.max_delay_ms
        # Every flush through a buffering path costs up to a block of padding, so chunks
        # are fewer and fuller there; on a path that does not buffer, flushes are free.
        chars, interval_s = (1000, 2.5) if block else (100, 0.3)
        cadence = Cadence.from_tuning(
            tuning, chunk_chars=chars, chunk_interval_s=interval_s, progress_with_chunks=True
        )
        return cls(cadence, block, delay_ms / 1000)

    def shaper(self) -> AlignedShaper:
        # A block size of 0 means "the path does not buffer": alignment is then a no-op.
        return AlignedShaper(self.block_bytes or 1, self.max_delay_s)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "block_bytes": self.block_bytes,
            "max_delay_ms": self.max_delay_s * 1000,
            **attrs.asdict(self.cadence),
        }
