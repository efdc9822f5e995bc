"""Local fan-out: one job's events held in this process, and cursors that read them.

Both buses fan out the same way once events are here (published in process, or read
from Redis): a job's history is one shared list of :class:`EncodedEvent`, and a
subscriber is only a cursor into it, so a subscriber joining late, or resuming, reads
history and then live events from the same list with no seam at which an event could be
missed or repeated. A subscriber's "queue" is the distance between the newest seq and
its cursor, counted from when it subscribed: past ``queue_limit`` it is cut off (its
``on_cut`` callbacks run at once, so a sender stuck writing to a dead socket is
interrupted), and the producer and other subscribers never wait for it.

History is bounded twice: by count (``history_limit``) and by bytes (``history_bytes``,
each event costing its frame plus :data:`EVENT_OVERHEAD_BYTES`). Past either, the oldest
events go (a resume before them is ``HistoryTruncated``, 410), always keeping the newest
event, and a cursor that had not read them is cut off rather than moved past a gap.

A reader that is caught up may park with a ``push`` callback (the SSE stream does): the
log then hands each new batch's frames, joined once and shared by every subscriber, to
``push`` synchronously as it appends them, and the reader's task is not woken at all. A
push that cannot go (earlier bytes still wait for the socket) wakes that reader alone,
which then reads what it missed from its cursor in one batch. So a publish costs each
parked subscriber one write: no task wake-up, future or timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import attrs

from app.bus.base import MAX_BATCH, Batch, Push
from app.core.errors import BackendUnavailable, HistoryTruncated, SubscriberLagged
from app.core.events import EncodedEvent

__all__ = ["EVENT_OVERHEAD_BYTES", "LocalCursor", "LocalLog", "event_cost"]

#: What one kept event costs in memory beyond its frame: the event object, its seq, stamp
#: and type, the list slot (about 180 bytes measured with tracemalloc; rounded up).
EVENT_OVERHEAD_BYTES = 256


def event_cost(event: EncodedEvent) -> int:
    """The bytes one kept event counts against the history budget."""
    return len(event.frame) + EVENT_OVERHEAD_BYTES


@attrs.define(eq=False)
class LocalLog:
    """One job's retained events in this process, and the cursors reading them."""

    events: list[EncodedEvent] = attrs.Factory(list)
    first_seq: int = 1  # seq of events[0]
    next_seq: int = 1
    #: What ``events`` cost (see :func:`event_cost`).
    bytes: int = 0
    closed: bool = False
    subscribers: set[LocalCursor] = attrs.Factory(set)
    changed: asyncio.Future[None] | None = None
    #: Caught-up readers parked with a push callback (each waits on its own future).
    parked: set[LocalCursor] = attrs.Factory(set)
    #: The other subscribers: the only ones an append can leave behind the queue limit.
    awake: set[LocalCursor] = attrs.Factory(set)

    def wake(self) -> None:
        """Wake every cursor waiting for a change, parked ones included."""
        self._wake_waiting()
        for sub in list(self.parked):
            sub.unpark()

    def _wake_waiting(self) -> None:
        """Wake the cursors waiting on :meth:`wait_future` (not the parked ones)."""
        if self.changed is not None and not self.changed.done():
            self.changed.set_result(None)
        self.changed = None

    def wait_future(self) -> asyncio.Future[None]:
        """A future set at the next change."""
        if self.changed is None:
            self.changed = asyncio.get_running_loop().create_future()
        return self.changed

    def append(
        self,
        events: Sequence[EncodedEvent],
        history_limit: int,
        queue_limit: int,
        history_bytes: int,
    ) -> None:
        """Add events continuing at ``next_seq``; trim, cut laggards and wake readers."""
        if not events:
            return
        self.events.extend(events)
        self.bytes += sum(event_cost(e) for e in events)
        self.next_seq = events[-1].seq + 1
        self._trim(history_limit, history_bytes)
        newest = self.next_seq - 1
        # A parked reader has read everything before this batch: it falls behind only a
        # batch longer than its queue, or one whose trim passed it (both rare: then check
        # everyone). Otherwise the check costs the awake readers only, not the thousands
        # parked on a broadcast.
        rare = len(events) > queue_limit or self.first_seq > events[0].seq
        for sub in list(self.subscribers if rare else self.awake):
            if sub.pending(newest) > queue_limit or sub.cursor < self.first_seq - 1:
                sub.cut_off()
        if self.parked:
            self._push(events, newest)
        self._wake_waiting()

    def _push(self, events: Sequence[EncodedEvent], newest: int) -> None:
        """Hand the new frames to every parked reader that has read all the earlier ones."""
        frames = events[0].frame if len(events) == 1 else b"".join(e.frame for e in events)
        before = events[0].seq - 1
        for sub in list(self.parked):
            push = sub.push
            if push is not None and sub.cursor == before and not sub.cut and push(frames, events):
                sub.cursor = newest
            else:
                sub.unpark()

    def _trim(self, history_limit: int, history_bytes: int) -> None:
        """Drop the oldest events past either limit, always keeping the newest one.

        Past a limit, history is trimmed to nine tenths of it, so trimming (a list
        shift) stays amortised O(1) per event.
        """
        drop = 0
        kept_bytes = self.bytes
        if len(self.events) > history_limit:
            drop = len(self.events) - history_limit + history_limit // 10
            kept_bytes -= sum(event_cost(e) for e in self.events[:drop])
        if kept_bytes > history_bytes:
            target = history_bytes - history_bytes // 10
            while kept_bytes > target and drop < len(self.events) - 1:
                kept_bytes -= event_cost(self.events[drop])
                drop += 1
        if drop:
            del self.events[:drop]
            self.first_seq += drop
            self.bytes = kept_bytes

    def end(self) -> None:
        """No more events will come: cursors end once they have read them all."""
        self.closed = True
        self.wake()


@attrs.define(eq=False)
class LocalCursor:
    """One subscriber's position in a :class:`LocalLog` (the bus enters and leaves it)."""

    job_id: str
    cursor: int  # last delivered seq
    log: LocalLog | None = None
    live_from: int = 0
    cut: bool = False
    #: Cut off because the bus lost its backend, not for falling behind.
    lost: bool = False
    _callbacks: list[Callable[[], None]] = attrs.Factory(list)
    #: While parked: how new frames are written, and the future that ends the wait.
    push: Push | None = None
    _parked: asyncio.Future[None] | None = None

    @property
    def last_seq(self) -> int:
        """The seq of the last event delivered (the resume point)."""
        return self.cursor

    def on_cut(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (once, synchronously) when the subscriber is cut off."""
        if self.cut:
            callback()
        else:
            self._callbacks.append(callback)

    def pending(self, newest_seq: int) -> int:
        """Events published since it subscribed that it has not read yet."""
        return newest_seq - max(self.cursor, self.live_from)

    def cut_off(self) -> None:
        """Cut the subscriber off: its callbacks run now, its next read raises."""
        if self.cut:
            return
        self.cut = True
        self.unpark()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def start(self, log: LocalLog) -> None:
        """Read ``log`` from the resume point on; ``HistoryTruncated`` if it is not kept."""
        if self.cursor == 0:
            self.cursor = log.first_seq - 1  # no resume point: all the history still kept
        elif self.cursor < log.first_seq - 1:
            raise HistoryTruncated(self.job_id, self.cursor, log.first_seq)
        self.log = log
        self.live_from = log.next_seq - 1
        log.subscribers.add(self)
        log.awake.add(self)

    def stop(self) -> LocalLog | None:
        """Stop reading; the log it read, if it had started."""
        self.unpark()
        log, self.log = self.log, None
        if log is not None:
            log.subscribers.discard(self)
            log.awake.discard(self)
        return log

    def unpark(self) -> None:
        """End a parked wait (no more pushes); a no-op when not parked."""
        self.push = None
        log = self.log
        if log is not None and self in log.parked:
            log.parked.discard(self)
            log.awake.add(self)
        waiter, self._parked = self._parked, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self, timeout_s: float | None, push: Push | None = None) -> Batch:
        """Wait up to ``timeout_s`` for events after ``last_seq`` (see ``Subscription``).

        With ``push``, a caught-up reader parks instead: new events are written by
        ``push`` as they are published (and the reader's cursor moves past them) until
        the timeout, the end of the log, a cut, or a push that cannot go.
        """
        log = self.log
        if log is None:
            raise RuntimeError("use the subscription as an async context manager")
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if self.cut and self.lost:
                raise BackendUnavailable(f"lost the bus backend while reading job {self.job_id}")
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
            if push is None:
                await asyncio.wait([log.wait_future()], timeout=remaining)
                continue
            await self._park(log, push, deadline)
            if self.cursor >= log.next_seq - 1 and not log.closed and not self.cut:
                return Batch(())  # woken by the timeout (or a push that set a deadline)

    async def _park(self, log: LocalLog, push: Push, deadline: float | None) -> None:
        """Wait parked (one future and at most one timer for the whole wait)."""
        loop = asyncio.get_running_loop()
        waiter = self._parked = loop.create_future()
        self.push = push
        log.parked.add(self)
        log.awake.discard(self)
        timer = None if deadline is None else loop.call_at(deadline, self.unpark)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._parked is waiter:
                self.unpark()
