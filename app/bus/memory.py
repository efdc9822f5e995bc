"""MemoryEventBus: each job's history and live fan-out in this process.

Fan-out design: a job's history is one shared list of :class:`EncodedEvent` (encoded
once at publish). A subscriber is only a cursor into it, so a subscriber joining late,
or resuming, reads history and then live events from the same list, with no seam at
which an event could be missed or repeated. A subscriber's "queue" is the distance
between the newest seq and its cursor, counted from when it subscribed: past
``queue_limit`` it is cut off (its ``on_cut`` callbacks run at once, so a sender stuck
writing to a dead socket is interrupted), and the producer and other subscribers never
wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Self

import attrs

from app.bus.base import MAX_BATCH, Batch
from app.core.errors import HistoryTruncated, JobNotFound, SubscriberLagged
from app.core.events import AnyEvent, EncodedEvent, encode_event

__all__ = ["MemoryEventBus"]


@attrs.define(eq=False)
class _JobLog:
    """One job's retained history and its live subscribers."""

    events: list[EncodedEvent] = attrs.Factory(list)
    first_seq: int = 1  # seq of events[0]
    next_seq: int = 1
    closed: bool = False
    subscribers: set[_MemorySubscription] = attrs.Factory(set)
    changed: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.changed is not None and not self.changed.done():
            self.changed.set_result(None)
        self.changed = None

    def wait_future(self) -> asyncio.Future[None]:
        if self.changed is None:
            self.changed = asyncio.get_running_loop().create_future()
        return self.changed


@attrs.define(eq=False)
class _MemorySubscription:
    """A cursor into a :class:`_JobLog`."""

    bus: MemoryEventBus
    job_id: str
    cursor: int  # last delivered seq
    log: _JobLog | None = None
    live_from: int = 0
    cut: bool = False
    _callbacks: list[Callable[[], None]] = attrs.Factory(list)

    @property
    def last_seq(self) -> int:
        return self.cursor

    @property
    def lost(self) -> bool:
        return False  # in process: nothing to lose

    def on_cut(self, callback: Callable[[], None]) -> None:
        if self.cut:
            callback()
        else:
            self._callbacks.append(callback)

    def pending(self, newest_seq: int) -> int:
        return newest_seq - max(self.cursor, self.live_from)

    def cut_off(self) -> None:
        if self.cut:
            return
        self.cut = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    async def __aenter__(self) -> Self:
        log = self.bus._logs.get(self.job_id)
        if log is None:
            raise JobNotFound(self.job_id)
        if self.cursor == 0:
            self.cursor = log.first_seq - 1  # no resume point: all the history still kept
        elif self.cursor < log.first_seq - 1:
            raise HistoryTruncated(self.job_id, self.cursor, log.first_seq)
        self.log = log
        self.live_from = log.next_seq - 1
        log.subscribers.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.log is not None:
            self.log.subscribers.discard(self)

    async def next_batch(self, timeout_s: float | None) -> Batch:
        log = self.log
        if log is None:
            raise RuntimeError("use the subscription as an async context manager")
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if self.cut:
                raise SubscriberLagged(
                    f"subscriber of job {self.job_id} fell behind and was cut off"
                )
            if self.cursor < log.next_seq - 1:
                start = self.cursor + 1 - log.first_seq
                if start < 0:  # trimmed past us while we were away
                    self.cut_off()
                    continue
                batch = log.events[start : start + MAX_BATCH]
                self.cursor = batch[-1].seq
                return Batch(batch)
            if log.closed:
                return Batch((), ended=True)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return Batch(())
            await asyncio.wait([log.wait_future()], timeout=remaining)


@attrs.define
class MemoryEventBus:
    """In-process :class:`EventBus`: no dependencies, one instance."""

    history_limit: int = 10_000
    queue_limit: int = 1_000
    _logs: dict[str, _JobLog] = attrs.Factory(dict)

    def _log(self, job_id: str) -> _JobLog:
        log = self._logs.get(job_id)
        if log is None:
            raise JobNotFound(job_id)
        return log

    async def open(self, job_id: str) -> None:
        self._logs.setdefault(job_id, _JobLog())

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        log = self._log(job_id)
        if log.closed:
            raise RuntimeError(f"the event log of job {job_id} is closed")
        encoded = encode_event(job_id, log.next_seq, event)
        log.next_seq += 1
        # History keeps the frame only; the event object goes back to the publisher.
        log.events.append(attrs.evolve(encoded, event=None))
        if len(log.events) > self.history_limit:
            # Trim in slices of a tenth so trimming stays amortised O(1) per publish.
            drop = len(log.events) - self.history_limit + self.history_limit // 10
            del log.events[:drop]
            log.first_seq += drop
        for sub in log.subscribers:
            if sub.pending(encoded.seq) > self.queue_limit or sub.cursor < log.first_seq - 1:
                sub.cut_off()
        log.wake()
        return encoded

    async def close(self, job_id: str) -> None:
        log = self._log(job_id)
        log.closed = True
        log.wake()

    def subscribe(self, job_id: str, after_seq: int = 0) -> _MemorySubscription:
        return _MemorySubscription(self, job_id, after_seq)

    async def last_seq(self, job_id: str) -> int:
        return self._log(job_id).next_seq - 1

    def subscriber_count(self, job_id: str) -> int:
        log = self._logs.get(job_id)
        return 0 if log is None else len(log.subscribers)

    async def discard(self, job_id: str) -> None:
        log = self._logs.pop(job_id, None)
        if log is not None:
            log.closed = True
            log.wake()

    async def aclose(self) -> None:
        for log in self._logs.values():
            log.closed = True
            log.wake()
