"""The event bus seam: per-job ordered history, live fan-out, resume from any seq.

:class:`EventBus` is the protocol every bus implements (``app/bus/memory.py`` in
process; a Redis-backed bus plugs into the same seam). ``tests/test_bus.py`` is written
against the protocol, so every implementation passes it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol, Self

import attrs

from app.core.events import AnyEvent, EncodedEvent

__all__ = ["MAX_BATCH", "Batch", "EventBus", "LogClosed", "Push", "Subscription"]

#: Most events one ``next_batch`` call returns.
MAX_BATCH = 256


class LogClosed(RuntimeError):
    """A publish to a job whose log is closed (it ended; with Redis, maybe elsewhere)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the event log of job {job_id} is closed")
        self.job_id = job_id


@attrs.frozen
class Batch:
    """What one ``Subscription.next_batch`` call returns.

    ``events`` are in seq order, continuing exactly after the previous batch. ``ended``
    is true once the job's log is closed and every event has been delivered.
    """

    events: Sequence[EncodedEvent]
    ended: bool = False


class Push(Protocol):
    """Writes a batch's frames (shared by every subscriber) at once; False if it cannot."""

    def __call__(self, frames: bytes, events: Sequence[EncodedEvent]) -> bool: ...


class Subscription(Protocol):
    """One subscriber's view of one job's events; use it as an async context manager."""

    @property
    def last_seq(self) -> int:
        """The seq of the last event delivered (the resume point)."""
        ...

    @property
    def cut(self) -> bool:
        """Whether the bus has cut this subscriber off for falling behind."""
        ...

    async def next_batch(self, timeout_s: float | None, push: Push | None = None) -> Batch:
        """Wait up to ``timeout_s`` for events after ``last_seq``.

        Returns an empty, not-ended batch on timeout; raises ``SubscriberLagged`` once
        the subscriber has been cut off. With ``push``, a caught-up subscriber parks:
        new events are handed to ``push`` as they are published, until it declines one.
        """
        ...

    def unpark(self) -> None:
        """End a parked wait now (its ``next_batch`` returns)."""
        ...

    @property
    def lost(self) -> bool:
        """Whether the cut came from the bus losing its backend (resume later or elsewhere)."""
        ...

    def on_cut(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (once, synchronously) when the subscriber is cut off."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class EventBus(Protocol):
    """Per-job event logs: publish assigns ``seq`` and encodes once; subscribe resumes."""

    async def open(self, job_id: str) -> None:
        """Create the (empty) log of a new job."""
        ...

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        """Assign the next seq to ``event``, stamp ``ts``, encode it and fan it out.

        Raises ``LogClosed`` once the job's log is closed (with several instances, by
        whichever instance ended the job).
        """
        ...

    async def close(self, job_id: str) -> None:
        """Mark the log complete: subscribers end after the last event."""
        ...

    def subscribe(self, job_id: str, after_seq: int = 0) -> Subscription:
        """Events with seq > ``after_seq``: history first, then live ones.

        ``after_seq`` 0 means all the history still kept (from seq 1 unless the history
        limits trimmed it: ``history_limit`` events, ``history_bytes`` of them counted as
        ``app.bus.local.event_cost``; the newest event is always kept). Entering the
        returned context raises ``JobNotFound`` for an unknown job and
        ``HistoryTruncated`` when events after a non-zero ``after_seq`` are no longer
        kept.
        """
        ...

    async def last_seq(self, job_id: str) -> int:
        """The newest seq of the job (0 before the first event)."""
        ...

    async def discard(self, job_id: str) -> None:
        """Forget the job's log (expiry); live subscribers end."""
        ...

    def subscriber_count(self, job_id: str) -> int:
        """How many subscribers of the job this process serves right now."""
        ...

    def release_publisher(self, job_id: str) -> None:
        """This process stops being the job's publisher until it publishes again.

        For a job whose events come through any instance (a job run elsewhere, published
        over HTTP): a bus that takes the last publisher for the only one (Redis) then
        reads what other instances publish. Events still waiting to be written stay.
        """
        ...

    async def aclose(self) -> None:
        """Release the bus's resources at shutdown."""
        ...
