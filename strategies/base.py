"""The flush strategy protocol: how a job's events are paced and how its streams are framed.

A strategy decides two things:

* the producer's **cadence** (:class:`Cadence`): how much text or time a ``chunk`` event
  gathers, how ``step_progress`` follows the step's reported progress (within the
  latency budget whatever the strategy), and the stream's heartbeat interval;
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


#: The latency budget when the operator sets none (``FLUSHLINE_MAX_DELAY_MS``).
DEFAULT_LATENCY_BUDGET_S = 0.1
#: The share of the latency budget a visible progress change may wait in the producer:
#: the same share after which ``aligned`` flushes (so each of its flushes carries at
#: most one ``step_progress`` and a direct stream gets each change within the budget).
PROGRESS_WINDOW_SHARE = 0.9
#: A change of the step's percentage by at least this much is visible on a progress bar.
DEFAULT_PROGRESS_STEP_PCT = 1.0


@attrs.frozen(kw_only=True)
class Cadence:
    """How often the producer emits.

    ``chunk`` events go out at ``chunk_chars`` characters or ``chunk_interval_s``
    seconds, whichever comes first.

    ``step_progress`` follows what the step reports, never a timer of seconds:

    - a **visible** change (the step's percentage moved by ``progress_step_pct`` points
      or more since the last ``step_progress``, or an explicit percentage reported by
      the step) goes out at once, unless a ``step_progress`` went out less than
      ``progress_window_s`` ago; it then waits for the end of that window, and the
      changes within it are merged into one event (the latest value). So no reported
      value is held in the producer longer than ``progress_window_s``: 90% of the
      latency budget (``FLUSHLINE_MAX_DELAY_MS``, 100 ms by default). A shaper may hold
      the write too (``aligned`` until 90% of the budget after its previous flush), so
      on a buffering path a change is on the wire within 0.9 budget when the previous
      flush was on time, and within 1.8 budgets at worst;
    - an **invisible** change (tokens counted, the bar not moved by a visible step, e.g.
      a step whose expected tokens are unknown) goes out at most every
      ``progress_interval_s`` (``FLUSHLINE_PROGRESS_INTERVAL``): a keep-alive for the
      token count and ETA, not a limit on visible progress;
    - with every chunk too when ``progress_with_chunks`` (the estimate rides along with
      a write that happens anyway).

    So a step moving its bar by 1% every 50 ms sends at most one ``step_progress`` per
    ``progress_window_s`` and at most about 100 per step.
    """

    chunk_chars: int
    chunk_interval_s: float
    progress_interval_s: float
    heartbeat_interval_s: float
    progress_with_chunks: bool = False
    progress_window_s: float = DEFAULT_LATENCY_BUDGET_S * PROGRESS_WINDOW_SHARE
    progress_step_pct: float = DEFAULT_PROGRESS_STEP_PCT

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
        """The strategy's defaults, each replaced by the operator's value when one is set.

        The progress window is 90% of the latency budget (``tuning.max_delay_ms``, else
        100 ms), and never longer than ``progress_interval_s``.
        """

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        interval_s = pick(tuning.progress_interval_s, progress_interval_s)
        budget_s = pick(tuning.max_delay_ms, DEFAULT_LATENCY_BUDGET_S * 1000) / 1000
        return cls(
            chunk_chars=int(pick(tuning.chunk_chars, chunk_chars)),
            chunk_interval_s=pick(tuning.chunk_interval_s, chunk_interval_s),
            progress_interval_s=interval_s,
            heartbeat_interval_s=pick(tuning.heartbeat_interval_s, heartbeat_interval_s),
            progress_with_chunks=progress_with_chunks,
            progress_window_s=min(budget_s * PROGRESS_WINDOW_SHARE, interval_s),
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
