"""MemoryEventBus: each job's history and live fan-out in this process.

The fan-out itself (a shared history list, subscribers as cursors into it, laggards
cut off at publish, history bounded by count and bytes) is :mod:`app.bus.local`, which
the Redis bus shares.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import attrs

from app.bus.base import LogClosed
from app.bus.local import LocalCursor, LocalLog
from app.core.errors import JobNotFound
from app.core.events import AnyEvent, EncodedEvent, encode_event

__all__ = ["MemoryEventBus"]


@attrs.define(eq=False)
class _MemorySubscription(LocalCursor):
    """A cursor into a job's :class:`LocalLog` held by the bus."""

    bus: MemoryEventBus = attrs.field(kw_only=True)

    async def __aenter__(self) -> Self:
        log = self.bus._logs.get(self.job_id)
        if log is None:
            raise JobNotFound(self.job_id)
        self.start(log)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@attrs.define
class MemoryEventBus:
    """In-process :class:`EventBus`: no dependencies, one instance."""

    history_limit: int = 10_000
    queue_limit: int = 1_000
    #: Bytes of one job's kept events (``FLUSHLINE_MAX_HISTORY_BYTES``; see ``event_cost``).
    history_bytes: int = 4 << 20
    _logs: dict[str, LocalLog] = attrs.Factory(dict)

    def _log(self, job_id: str) -> LocalLog:
        log = self._logs.get(job_id)
        if log is None:
            raise JobNotFound(job_id)
        return log

    async def open(self, job_id: str) -> None:
        self._logs.setdefault(job_id, LocalLog())

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        log = self._log(job_id)
        if log.closed:
            raise LogClosed(job_id)
        encoded = encode_event(job_id, log.next_seq, event)
        # History keeps the frame only; the event object goes back to the publisher.
        log.append(
            (attrs.evolve(encoded, event=None),),
            self.history_limit,
            self.queue_limit,
            self.history_bytes,
        )
        return encoded

    async def close(self, job_id: str) -> None:
        self._log(job_id).end()

    def subscribe(self, job_id: str, after_seq: int = 0) -> _MemorySubscription:
        return _MemorySubscription(job_id, after_seq, bus=self)

    async def last_seq(self, job_id: str) -> int:
        return self._log(job_id).next_seq - 1

    def release_publisher(self, job_id: str) -> None:
        """Nothing to do: one process publishes and reads every job."""

    def subscriber_count(self, job_id: str) -> int:
        log = self._logs.get(job_id)
        return 0 if log is None else len(log.subscribers)

    async def discard(self, job_id: str) -> None:
        log = self._logs.pop(job_id, None)
        if log is not None:
            log.end()

    async def aclose(self) -> None:
        for log in self._logs.values():
            log.end()
