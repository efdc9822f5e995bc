"""The body buffer of an emulated buffering proxy: what it holds and when it lets go.

:class:`ReleaseBuffer` is pure: callers feed bytes with explicit timestamps and get back
:class:`Release` objects, so the policy is tested without sockets or timers.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections import deque

import attrs

__all__ = [
    "Release",
    "ReleaseBuffer",
    "ReleaseModel",
    "ReleaseReason",
    "check_max_hold",
    "check_threshold",
    "to_release_model",
]


class ReleaseModel(enum.StrEnum):
    """How much of the held body a threshold release forwards."""

    ALL = "all"  # everything held
    BLOCKS = "blocks"  # only whole blocks of threshold bytes; the remainder stays held


class ReleaseReason(enum.StrEnum):
    """Why held bytes were released."""

    THRESHOLD = "threshold"
    MAX_HOLD = "max_hold"
    EOF = "eof"


@attrs.frozen
class Release:
    """Bytes leaving the buffer, how long the oldest of them was held, and why."""

    data: bytes
    held_ms: float
    reason: ReleaseReason


@attrs.define
class _Segment:
    arrived_at: float
    size: int


def check_threshold(_instance: object, _attribute: object, value: int) -> None:
    """Validator: a threshold is a non-negative byte count."""
    if value < 0:
        raise ValueError(f"--threshold must be >= 0 bytes, got {value}")


def check_max_hold(_instance: object, _attribute: object, value: float | None) -> None:
    """Validator: a hold time is a positive, finite number of seconds (or None)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"--max-hold-s must be a positive number of seconds, got {value}")


def to_release_model(value: str) -> ReleaseModel:
    """Converter: a release model from its name, with an error naming the option."""
    try:
        return ReleaseModel(value)
    except ValueError:
        raise ValueError(f"--release must be 'all' or 'blocks', got {value!r}") from None


@attrs.define
class ReleaseBuffer:
    """Pure model of a buffering proxy's body buffer; callers pass the clock in.

    With ``gzip`` the fed bytes go through a gzip compressor first and the threshold
    counts compressed bytes; the compressor is only sync-flushed by a ``max_hold``
    release (otherwise that release could carry nothing decodable) and finished by
    :meth:`flush`.
    """

    threshold_bytes: int = attrs.field(validator=check_threshold)
    release: ReleaseModel = attrs.field(default=ReleaseModel.ALL, converter=to_release_model)
    max_hold_s: float | None = attrs.field(default=None, validator=check_max_hold)
    gzip: bool = False
    _held: bytearray = attrs.field(factory=bytearray, init=False)
    _segments: deque[_Segment] = attrs.field(factory=deque, init=False)
    _compressor: zlib._Compress | None = attrs.field(default=None, init=False)
    # Arrival time of the oldest input still inside the compressor (gzip only).
    _unemitted_since: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.gzip:
            self._compressor = zlib.compressobj(wbits=31)

    @property
    def held_bytes(self) -> int:
        """Bytes currently held (compressed bytes in gzip mode)."""
        return len(self._held)

    @property
    def deadline(self) -> float | None:
        """Clock value at which ``max_hold_s`` forces a release, or None."""
        if self.max_hold_s is None:
            return None
        times = [self._segments[0].arrived_at] if self._segments else []
        if self._unemitted_since is not None:
            times.append(self._unemitted_since)
        return min(times) + self.max_hold_s if times else None

    def feed(self, data: bytes, now: float) -> Release | None:
        """Takes upstream bytes that arrived at ``now``; returns what must go out now."""
        if not data:
            return None
        if self._compressor is None:
            self._hold(data, now)
        else:
            if self._unemitted_since is None:
                self._unemitted_since = now
            out = self._compressor.compress(data)
            if out:
                self._hold(out, self._unemitted_since)
                # Part of this chunk may still sit in the compressor.
                self._unemitted_since = now
        if self._held and len(self._held) >= self.threshold_bytes:
            count = len(self._held)
            if self.release is ReleaseModel.BLOCKS and self.threshold_bytes > 0:
                count -= count % self.threshold_bytes
            return self._take(count, now, ReleaseReason.THRESHOLD)
        return self.due(now)

    def due(self, now: float) -> Release | None:
        """Releases everything held if the oldest byte has waited ``max_hold_s``."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        if self._compressor is not None and self._unemitted_since is not None:
            self._hold(self._compressor.flush(zlib.Z_SYNC_FLUSH), self._unemitted_since)
            self._unemitted_since = None
        return self._take(len(self._held), now, ReleaseReason.MAX_HOLD)

    def flush(self, now: float) -> Release | None:
        """Upstream EOF: finishes the gzip stream and releases everything held."""
        if self._compressor is not None:
            self._hold(self._compressor.flush(), self._unemitted_since or now)
            self._compressor = None
            self._unemitted_since = None
        return self._take(len(self._held), now, ReleaseReason.EOF)

    def _hold(self, data: bytes, arrived_at: float) -> None:
        if data:
            self._held += data
            self._segments.append(_Segment(arrived_at, len(data)))

    def _take(self, count: int, now: float, reason: ReleaseReason) -> Release | None:
        if count <= 0:
            return None
        held_ms = (now - self._segments[0].arrived_at) * 1000.0
        data = bytes(self._held[:count])
        del self._held[:count]
        remaining = count
        while remaining:
            segment = self._segments[0]
            if segment.size <= remaining:
                remaining -= segment.size
                self._segments.popleft()
            else:
                segment.size -= remaining
                remaining = 0
        return Release(data, round(held_ms, 1), reason)
