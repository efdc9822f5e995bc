"""External jobs: created here, fed by a producer over HTTP, ended by it or for it.

An external job (``"pipeline": "external"``) runs nowhere in Flushline: its producer
publishes batches of producer events (``POST /api/jobs/{id}/events``) through any
instance. :class:`ExternalJobs` creates them (a publish token, of which only the hash
is kept), publishes each batch exactly once, in ``producer_seq`` order, under the job's
lock (:mod:`app.jobs.producers`), and ends them: by the producer (``succeeded``,
``failed``), by a cancel, or when the producer has been silent for
``FLUSHLINE_PRODUCER_TIMEOUT_S`` (``failed``, :data:`PRODUCER_LOST`). Every instance
runs the silence sweep; the lock and the state's final status make exactly one end a
job. Events go to the bus and into the job's snapshot and retained bytes like a built-in
job's, so streams, long-polls, snapshots and the page cannot tell the difference.

A batch is validated and translated whole (:mod:`app.jobs.translator`) before its first
event is published. What is not covered: an instance that dies between publishing a
batch's events and recording its ``producer_seq`` (a few milliseconds) leaves the batch
unrecorded, so its retry publishes those events again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
import structlog

from app.bus import EventBus
from app.core.errors import (
    JobAlreadyFinished,
    JobNotFound,
    ProducerBusy,
    ProducerSeqGap,
    PublishRateLimited,
    TooLarge,
    backend_outage,
)
from app.core.events import AnyEvent, DoneEvent
from app.core.tasks import cancel_and_wait
from app.jobs.external import ProducerEvent, StepDecl, text_bytes
from app.jobs.producers import ProducerState, ProducerStore
from app.jobs.retention import Retention
from app.jobs.store import JobSnapshot, JobStore, apply_event
from app.jobs.translator import Translator
from strategies import Cadence

__all__ = ["PRODUCER_LOST", "ExternalJobs", "ExternalLimits", "PublishResult"]

log = structlog.get_logger(__name__)

#: The error code (and start of the message) of a job whose producer went silent.
PRODUCER_LOST = "producer_lost"
#: Longest pause between two silence sweeps.
SWEEP_EVERY_S = 0.5

Refresh = Callable[[JobSnapshot], Awaitable[JobSnapshot]]
T = TypeVar("T")


def token_hash(token: str) -> str:
    """What is kept of a publish token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen
class ExternalLimits:
    """The bounds of external jobs (the settings' ``producer_timeout_s`` and ``publish_*``)."""

    producer_timeout_s: float = 60.0
    max_job_bytes: int = 16 * 1024 * 1024
    rate_per_s: float = 20_000.0
    #: Most producer events one batch may carry (the rate bucket holds at least this many).
    max_events: int = 1000

    @property
    def burst(self) -> float:
        """The rate bucket's size: one second's worth, and at least one whole batch."""
        return max(self.rate_per_s, float(self.max_events))


@attrs.frozen
class PublishResult:
    """The answer to one publish."""

    accepted: int
    producer_seq: int
    duplicate: bool
    last_event_id: int

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class ExternalJobs:
    """Creates, publishes to, cancels and times out this service's external jobs."""

    bus: EventBus
    store: JobStore
    producers: ProducerStore
    retention: Retention
    #: The cadence of a strategy by name (the job's strategy decides its chunks).
    cadence_of: Callable[[str], Cadence]
    limits: ExternalLimits
    #: Called once per event published (the app's metrics count them).
    on_publish: Callable[[], None]
    #: Brings a snapshot this instance may hold stale up to the job's log (Redis: another
    #: instance may have published since); None when this process is alone.
    refresh: Refresh | None = None
    #: Whether the jobs outlive this process (Redis): then shutdown leaves them open.
    shared: bool = False
    #: External jobs created here that have not ended (they count as active jobs here, and
    #: their retained bytes are settled here when they end, wherever that happens).
    _open: dict[str, float] = attrs.Factory(dict)
    #: Per job: when its cadence wants a flush between batches (wall-clock seconds), and
    #: the one task that waits for it (app-owned: cancelled by :meth:`aclose`).
    _flush_at: dict[str, float] = attrs.Factory(dict)
    _flushers: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = attrs.Factory(dict)
    #: Publishes and ends under way, shielded from their callers' cancellation.
    _whole_tasks: set[asyncio.Future[Any]] = attrs.Factory(set)

    def __len__(self) -> int:
        return len(self._open)

    async def create(self, job: JobSnapshot, steps: Sequence[StepDecl]) -> str:
        """Store the new job and its producer state; returns its publish token."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        translator = Translator.new(steps, job.strategy, self.cadence_of(job.strategy))
        state = ProducerState(
            token_hash=token_hash(token),
            last_publish_at=now,
            bucket=self.limits.burst,
            bucket_at=now,
            emitter=translator.to_json(),
        )
        await self.store.add(job)
        await self.bus.open(job.id)
        await self.producers.create(job.id, state)
        self._open[job.id] = time.monotonic()
        return token

    async def is_external(self, job_id: str) -> bool:
        """Whether the job is an external one (it has a producer state)."""
        return await self.producers.load(job_id) is not None

    async def check_token(self, job_id: str, token: str) -> bool:
        """Whether ``token`` is the job's publish token (constant-time); JobNotFound if none."""
        state = await self.producers.load(job_id)
        if state is None:
            raise JobNotFound(job_id)
        return hmac.compare_digest(token_hash(token), state.token_hash)

    async def _state(self, job_id: str) -> ProducerState:
        state = await self.producers.load(job_id)
        if state is None:
            raise JobNotFound(job_id)
        return state

    async def _whole(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end even if the caller is cancelled (a producer that gave up
        waiting for its answer): half a batch published and not recorded would be
        published again by the retry. The task is kept until it ends."""
        task = asyncio.ensure_future(work)
        self._whole_tasks.add(task)
        task.add_done_callback(self._whole_tasks.discard)
        return await asyncio.shield(task)

    async def publish(
        self, job_id: str, producer_seq: int, events: Sequence[ProducerEvent]
    ) -> PublishResult:
        """Publish one batch, exactly once and in ``producer_seq`` order.

        A batch already accepted is a duplicate (nothing published); otherwise a finished
        job is ``JobAlreadyFinished``, a gap ``ProducerSeqGap``, a producer over its rate
        ``PublishRateLimited``, over its bytes ``TooLarge``; a refused event
        ``InvalidField``. Nothing is published unless the whole batch is, and a batch
        begun is finished whatever happens to its request.
        """
        return await self._whole(self._publish_batch(job_id, producer_seq, events))

    async def _publish_batch(
        self, job_id: str, producer_seq: int, events: Sequence[ProducerEvent]
    ) -> PublishResult:
        async with self.producers.locked(job_id):
            state = await self._state(job_id)
            if producer_seq <= state.producer_seq:
                return PublishResult(0, producer_seq, True, state.last_event_id)
            if state.status is not None:
                raise JobAlreadyFinished(job_id, state.status)
            if producer_seq != state.producer_seq + 1:
                raise ProducerSeqGap(job_id, producer_seq, state.producer_seq + 1)
            now = time.time()
            limits = self.limits
            elapsed = max(now - state.bucket_at, 0.0)
            bucket = min(limits.burst, state.bucket + elapsed * limits.rate_per_s)
            if bucket < len(events):
                wait_s = (len(events) - bucket) / limits.rate_per_s
                raise PublishRateLimited(limits.rate_per_s, max(math.ceil(wait_s), 1))
            used = state.bytes_used + sum(text_bytes(event) for event in events)
            if used > limits.max_job_bytes:
                raise TooLarge(
                    "events",
                    f"the job's producer would have published {used} bytes of text and "
                    f"results; at most {limits.max_job_bytes} (FLUSHLINE_PUBLISH_MAX_JOB_BYTES)",
                )
            translator = Translator.from_json(state.emitter, self._cadence(state))
            translation = translator.translate(events, now)
            last = await self._publish(job_id, translation.events, state.last_event_id)
            saved = attrs.evolve(
                state,
                producer_seq=producer_seq,
                last_event_id=last,
                status=translation.final_status,
                last_publish_at=now,
                bytes_used=used,
                bucket=bucket - len(events),
                bucket_at=now,
                emitter=translation.state,
            )
            await self.producers.save(job_id, saved, expected_seq=state.producer_seq)
        if translation.final_status is not None:
            await self._ended(job_id, translation.final_status)
        elif translation.deadline is not None:
            self._want_flush(job_id, translation.deadline)
        return PublishResult(len(events), producer_seq, False, last)

    def _want_flush(self, job_id: str, at: float) -> None:
        """Have the job's cadence flushed at ``at`` unless a batch comes first."""
        current = self._flush_at.get(job_id)
        if current is not None and current <= at:
            return
        self._flush_at[job_id] = at
        waiting = self._flushers.get(job_id)
        if waiting is None:
            wake = asyncio.Event()
            task = asyncio.create_task(self._flusher(job_id, wake), name=f"producer-flush:{job_id}")
            self._flushers[job_id] = (task, wake)
        else:
            waiting[1].set()  # an earlier deadline than the one it sleeps for

    async def _flusher(self, job_id: str, wake: asyncio.Event) -> None:
        """Between batches, publish what the cadence holds (a progress value at the end of
        its window) when it is due; ends when nothing more is wanted."""
        try:
            while (at := self._flush_at.get(job_id)) is not None:
                wake.clear()
                delay_s = at - time.time()
                if delay_s > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay_s):
                            await wake.wait()
                    continue  # the deadline may have moved earlier: read it again
                del self._flush_at[job_id]
                try:
                    await self._whole(self._flush(job_id))
                except Exception as exc:
                    if backend_outage(exc) is None and not isinstance(exc, ProducerBusy):
                        log.exception("producer flush failed", job_id=job_id)
        finally:
            self._flushers.pop(job_id, None)

    async def _flush(self, job_id: str) -> None:
        async with self.producers.locked(job_id):
            state = await self.producers.load(job_id)
            if state is None or state.status is not None:
                return
            translator = Translator.from_json(state.emitter, self._cadence(state))
            now = time.time()
            events = translator.due(now)
            if events:
                last = await self._publish(job_id, events, state.last_event_id)
                saved = attrs.evolve(state, last_event_id=last, emitter=translator.to_json())
                await self.producers.save(job_id, saved, expected_seq=state.producer_seq)
            deadline = translator.deadline()
        if deadline is not None and deadline > now:
            self._want_flush(job_id, deadline)

    async def aclose(self) -> None:
        """Stop the flush tasks and let the publishes under way end (the app's shutdown)."""
        for task, _ in list(self._flushers.values()):
            await cancel_and_wait(task)
        if self._whole_tasks:
            await asyncio.wait(list(self._whole_tasks))

    def _cadence(self, state: ProducerState) -> Cadence:
        return self.cadence_of(str(state.emitter["strategy"]))

    async def _end(
        self,
        job_id: str,
        status: str,
        events: Callable[[Translator], list[AnyEvent]],
        *,
        silent_before: float | None = None,
    ) -> bool:
        """End the open job with ``events`` under its lock; False if it had already ended
        (or, with ``silent_before``, if its producer has published since)."""
        return await self._whole(self._end_now(job_id, status, events, silent_before))

    async def _end_now(
        self,
        job_id: str,
        status: str,
        events: Callable[[Translator], list[AnyEvent]],
        silent_before: float | None,
    ) -> bool:
        async with self.producers.locked(job_id):
            state = await self._state(job_id)
            if state.status is not None:
                return False
            if silent_before is not None and state.last_publish_at >= silent_before:
                return False
            translator = Translator.from_json(state.emitter, self._cadence(state))
            last = await self._publish(job_id, events(translator), state.last_event_id)
            saved = attrs.evolve(state, last_event_id=last, status=status)
            await self.producers.save(job_id, saved, expected_seq=state.producer_seq)
        await self._ended(job_id, status)
        return True

    async def cancel(self, job_id: str) -> JobSnapshot:
        """End the job ``cancelled`` now; ``JobAlreadyFinished`` if it has ended."""

        def cancelled(translator: Translator) -> list[AnyEvent]:
            return [DoneEvent("cancelled", translator.overall_pct, error="cancelled")]

        if not await self._end(job_id, "cancelled", cancelled):
            state = await self._state(job_id)
            raise JobAlreadyFinished(job_id, str(state.status))
        return await self.snapshot(job_id)

    async def snapshot(self, job_id: str) -> JobSnapshot:
        """The job's snapshot, up to date with its log."""
        job = await self.store.get(job_id)
        if self.refresh is not None and not job.status.finished:
            job = await self.refresh(job)
        return job

    async def _publish(self, job_id: str, events: Sequence[AnyEvent], last_seq: int) -> int:
        """Publish ``events`` and fold them into the job's snapshot; the newest seq."""
        if not events:
            return last_seq
        job = await self.snapshot(job_id)
        for event in events:
            encoded = await self.bus.publish(job_id, event)
            self.on_publish()
            self.retention.published(job_id, encoded)
            job = apply_event(job, encoded)
            last_seq = encoded.seq
        await self.store.put(job)
        if self.shared:
            # Any instance may publish the next batch: this one must not stay the only
            # publisher its watchers of the job hear.
            self.bus.release_publisher(job_id)
        return last_seq

    async def _ended(self, job_id: str, status: str) -> None:
        """The job's last event is out: close its log, settle its bytes, log its end."""
        await self.bus.close(job_id)
        if self._flush_at.pop(job_id, None) is not None and job_id in self._flushers:
            self._flushers[job_id][1].set()  # nothing more to flush: let its task end
        started = self._open.pop(job_id, None)
        if started is not None:
            self.retention.settle(job_id)
        log.info(
            "job finished",
            job_id=job_id,
            pipeline="external",
            status=status,
            duration_s=None if started is None else round(time.monotonic() - started, 3),
        )
        await self.retention.shed(keep=job_id)

    async def sweep(self, now: float | None = None) -> list[str]:
        """End the jobs whose producer has been silent for the timeout; their ids.

        Every instance sweeps; of several, the one that takes a job's lock first and finds
        it still open and silent ends it. Jobs created here that ended elsewhere (Redis)
        have their retained bytes settled.
        """
        now = time.time() if now is None else now
        timeout_s = self.limits.producer_timeout_s
        cutoff = now - timeout_s
        message = (
            f"{PRODUCER_LOST}: no publish or heartbeat from the job's producer for "
            f"{timeout_s:g} s (FLUSHLINE_PRODUCER_TIMEOUT_S)"
        )
        ended: list[str] = []
        for job_id in await self.producers.silent_since(cutoff):
            state = await self.producers.load(job_id)
            if state is None or state.status is not None or state.last_publish_at >= cutoff:
                continue
            try:
                lost = await self._end(
                    job_id,
                    "failed",
                    lambda translator: translator.ending(message, time.time(), PRODUCER_LOST),
                    silent_before=cutoff,
                )
                if lost:
                    ended.append(job_id)
                    log.warning("job failed: producer lost", job_id=job_id, timeout_s=timeout_s)
            except ProducerBusy:
                continue  # a publish holds it: the producer is alive after all
        if self.shared and self._open:
            statuses = await self.producers.statuses(list(self._open))
            for job_id, status in statuses.items():
                if status is not None and job_id in self._open:
                    del self._open[job_id]
                    self.retention.settle(job_id)
        return ended

    async def watch(self) -> None:
        """Sweep silent producers until cancelled (the app owns the task)."""
        every_s = min(self.limits.producer_timeout_s / 4, SWEEP_EVERY_S)
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.sweep()
            except Exception as exc:
                if backend_outage(exc) is None:
                    log.exception("producer sweep failed")
                else:
                    log.warning("producer sweep failed: redis unreachable", error=str(exc))

    async def shutdown(self) -> None:
        """Alone (memory), end the open external jobs ``cancelled``: their log dies with
        this process, and their streams must end. Shared (Redis), leave them open."""
        if self.shared:
            return
        for job_id in list(self._open):
            with contextlib.suppress(JobAlreadyFinished):
                await self.cancel(job_id)
