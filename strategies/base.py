"""The flush strategy protocol: how a job's events are paced and how its streams are framed.

A strategy decides two things:

* the producer's **cadence** (:class:`Cadence`): how much text or time a ``chunk`` event
  gathers, how often ``step_progress`` is sent, and the stream's heartbeat interval;
* the **wire shaping** of each stream (:class:`FrameShaper`, one per subscriber): what is
  written at stream start and around each batch of encoded frames, e.g. padding as SSE
  comment lines, and when an extra write is due (a deferred flush).

Shapers only ever add SSE comment lines, never ``data:`` lines, so ``EventSource`` sees
exactly the events the job published.
"""

from __future__ import annotations

from typing import Protocol

import attrs

__all__ = ["Cadence", "FlushStrategy", "FrameShaper", "Tuning"]


@attrs.frozen(kw_only=True)
class Tuning:
    """Operator overrides from the environment; ``None`` means "the strategy's default"."""

    padding_bytes: int | None = None
    chunk_chars: int | None = None
    chunk_interval_s: float | None = None
    progress_interval_s: float | None = None
    heartbeat_interval_s: float | None = None
    proxy_buffer_bytes: int | None = None
    max_delay_ms: float | None = None


@attrs.frozen(kw_only=True)
class Cadence:
    """How often the producer emits. ``chunk`` events go out at ``chunk_chars`` characters
    or ``chunk_interval_s`` seconds, whichever comes first."""

    chunk_chars: int
    chunk_interval_s: float
    progress_interval_s: float
    heartbeat_interval_s: float
    progress_with_chunks: bool = False

    @classmethod
    def from_tuning(
        cls,
        tuning: Tuning,
        *,
        chunk_chars: int,
        chunk_interval_s: float,
        progress_interval_s: float = 5.0,
        heartbeat_interval_s: float = 15.0,
        progress_with_chunks: bool = False,
    ) -> Cadence:
        """The strategy's defaults, each replaced by the operator's value when one is set."""

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        return cls(
            chunk_chars=int(pick(tuning.chunk_chars, chunk_chars)),
            chunk_interval_s=pick(tuning.chunk_interval_s, chunk_interval_s),
            progress_interval_s=pick(tuning.progress_interval_s, progress_interval_s),
            heartbeat_interval_s=pick(tuning.heartbeat_interval_s, heartbeat_interval_s),
            progress_with_chunks=progress_with_chunks,
        )


class FrameShaper(Protocol):
    """Per-stream framing state. The stream writes exactly the bytes these methods return."""

    def start(self, prefix: bytes, now: float, frames: bytes = b"") -> bytes:
        """Bytes to send first: ``prefix`` (the ``retry:`` line), anything the strategy adds
        at stream start, and ``frames``, the events already published (history), if any."""
        ...

    def write(self, frames: bytes, now: float) -> bytes:
        """Bytes to send for ``frames`` (one or more encoded events) written at ``now``."""
        ...

    def deadline(self) -> float | None:
        """The loop time at which :meth:`poll` must be called, or None if nothing is due."""
        ...

    def poll(self, now: float) -> bytes:
        """Bytes due at ``now`` (a deferred flush), possibly empty."""
        ...


class FlushStrategy(Protocol):
    """A named strategy: its cadence and a factory of per-stream shapers."""

    @property
    def name(self) -> str:
        """The registry name (``FLUSHLINE_STRATEGY``, ``"strategy"`` in a job)."""
        ...

    @property
    def cadence(self) -> Cadence:
        """The producer's emission cadence for jobs using this strategy."""
        ...

    def shaper(self) -> FrameShaper:
        """A fresh shaper for one stream."""
        ...

    def describe(self) -> dict[str, object]:
        """The strategy's effective parameters (for snapshots, logs and docs)."""
        ...
