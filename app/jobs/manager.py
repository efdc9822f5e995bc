"""The job manager: creates jobs, runs them as tasks the app owns, cancels and expires them.

Jobs run independently of any stream: a job's task is held here (never by a request),
so watchers coming and going never affect it. Every event goes through
:meth:`JobManager._publish`, which publishes it on the bus and folds it into the job's
snapshot in the store (kept here while Redis is lost: :mod:`app.jobs.snapshot_keeper`).

A job's ``input`` and ``options`` are bounded in depth and size (:mod:`app.jobs.limits`)
before anything reads them, and room is made for it in the retention budget
(:mod:`app.jobs.retention`) before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import structlog

from app.bus import EventBus
from app.core.errors import (
    AtCapacity,
    BackendUnavailable,
    Draining,
    InvalidField,
    JobAlreadyFinished,
    backend_outage,
)
from app.core.events import AnyEvent, DoneEvent, EncodedEvent, ErrorEvent
from app.jobs.budget import (
    JOB_BASE_BYTES,
    RESULT_BYTES_PER_TOKEN,
    STEP_BYTES,
    KeptJob,
    RetainedBudget,
)
from app.jobs.control import JobControl
from app.jobs.limits import JsonLimits, measure_json
from app.jobs.maintenance import LeaseMaintenance
from app.jobs.pipelines import JobPlan, Pipeline
from app.jobs.retention import Retention
from app.jobs.runner import JobOutcome, run_job
from app.jobs.snapshot_keeper import REDIS_LOST_REASON, SnapshotKeeper
from app.jobs.store import (
    JobSnapshot,
    JobStatus,
    JobStore,
    StepState,
    apply_event,
)
from strategies import FlushStrategy

__all__ = ["REDIS_LOST_REASON", "SHUTDOWN_REASON", "JobManager", "JobRequest"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: How long a cancel request waits for the job to publish its ``done``.
CANCEL_WAIT_S = 5.0
#: How often a cancel on an instance that does not run the job checks the snapshot
#: after the job's stream has ended (the runner writes it just after ``done``).
CANCEL_POLL_S = 0.01
#: Why jobs still running at the end of the shutdown grace end ``failed``.
SHUTDOWN_REASON = "shutdown"


def _lookup(registry: Mapping[str, T], field: str, name: str) -> T:
    try:
        return registry[name]
    except KeyError:
        allowed = ", ".join(registry)
        raise InvalidField(field, f"unknown {field} {name!r}; allowed: {allowed}") from None


@attrs.frozen
class JobRequest:
    """A validated ``POST /api/jobs`` body."""

    pipeline: str
    strategy: str
    input: Mapping[str, Any] = attrs.field(factory=dict)
    options: Mapping[str, Any] = attrs.field(factory=dict)
    #: With auth on: the fingerprint of the caller's API token (see ``JobSnapshot.owner``).
    owner: str | None = None


@attrs.define(eq=False)
class _Running:
    """A job this process runs: its task, and how far its ending has got."""

    job: JobSnapshot
    task: asyncio.Task[JobOutcome] | None = None
    #: A cancel has been asked for (by ``cancel`` or ``shutdown``): a second one is a 409.
    cancelling: bool = False
    #: Set once the job has published its last event, closed its topic and logged its end.
    ended: asyncio.Event = attrs.Factory(asyncio.Event)
    #: Ends a job whose task was cancelled before it first ran (see ``_task_done``).
    ender: asyncio.Task[None] | None = None
    #: Set when the service stops the job: it ends ``failed`` with this reason.
    stop_reason: str | None = None
    #: Redis stayed away past the grace: the job's ``error`` and ``done`` (failed with
    #: this reason) are still to be published, once Redis answers.
    unpublished_end: str | None = None
    #: When ``job`` (the newest snapshot) could not be written, Redis being lost; or None.
    unsaved_since: float | None = None


@attrs.define(eq=False)
class JobManager:
    """Owns the running jobs of this process."""

    bus: EventBus
    store: JobStore
    pipelines: Mapping[str, Pipeline]
    strategies: Mapping[str, FlushStrategy]
    max_active_jobs: int = 100
    job_ttl_s: float = 3600.0
    max_retained_jobs: int = 10_000
    #: Coordination with other instances (Redis); ``None``: this instance is alone.
    control: JobControl | None = None
    #: The instance is shutting down: no new job; streams hand over to other instances.
    draining: bool = False
    #: How long a running job's snapshot waits for a lost Redis (``FLUSHLINE_REDIS_GRACE_S``).
    backend_grace_s: float = 8.0
    #: One job's history, as the bus caps it (``FLUSHLINE_MAX_HISTORY_BYTES``).
    max_history_bytes: int = 1 << 20
    #: Every kept job together (``FLUSHLINE_MAX_RETAINED_BYTES``).
    max_retained_bytes: int = 128 << 20
    #: Bounds on ``input`` and ``options`` (depth; encoded size, the request body's limit).
    input_limits: JsonLimits = attrs.Factory(JsonLimits)
    #: Called once per event this instance publishes (the app's metrics count them).
    on_publish: Callable[[], None] | None = None
    _drain_callbacks: set[Callable[[], None]] = attrs.Factory(set)
    _running: dict[str, _Running] = attrs.Factory(dict)
    _events: dict[str, int] = attrs.Factory(dict)
    _bytes: dict[str, int] = attrs.Factory(dict)
    _retention: Retention = attrs.field(init=False)
    _snapshots: SnapshotKeeper = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._retention = Retention(
            self.store,
            self.bus,
            RetainedBudget(self.max_retained_bytes, self.max_history_bytes),
            self.max_retained_jobs,
            running_jobs=lambda: self.active_jobs,
        )
        self._snapshots = SnapshotKeeper(self.store, self.bus, self.control, self.backend_grace_s)

    @property
    def active_jobs(self) -> int:
        """Jobs that have not ended yet (queued, running or being cancelled)."""
        return len(self._running)

    @property
    def retained_bytes(self) -> int:
        """What the jobs this process keeps count against ``max_retained_bytes``."""
        return self._retention.retained_bytes

    def strategy(self, name: str) -> FlushStrategy:
        """The configured strategy called ``name`` (``InvalidField`` if unknown)."""
        return _lookup(self.strategies, "strategy", name)

    def pipeline(self, name: str) -> Pipeline:
        """The registered pipeline called ``name`` (``InvalidField`` if unknown)."""
        return _lookup(self.pipelines, "pipeline", name)

    async def create(self, request: JobRequest) -> JobSnapshot:
        """Validate, store and start a job; returns its first snapshot."""
        pipeline = self.pipeline(request.pipeline)
        strategy = self.strategy(request.strategy)
        # Bounded before the pipeline (or anything else) reads, prints or encodes them.
        fixed = JOB_BASE_BYTES
        fixed += measure_json("input", request.input, self.input_limits)
        fixed += measure_json("options", request.options, self.input_limits)
        plan = pipeline.plan(request.input, request.options)
        fixed += STEP_BYTES * len(plan.steps)
        if self.draining:
            raise Draining()
        if self.active_jobs >= self.max_active_jobs:
            raise AtCapacity(self.max_active_jobs)
        expected = RESULT_BYTES_PER_TOKEN * sum(step.expected_tokens for step in plan.steps)
        job_id = secrets.token_urlsafe(16)
        await self._retention.make_room(job_id, KeptJob(fixed, expected))
        try:
            return await self._start(job_id, request, plan, pipeline, strategy)
        except BaseException:
            self._retention.release(job_id)
            raise

    async def _start(
        self,
        job_id: str,
        request: JobRequest,
        plan: JobPlan,
        pipeline: Pipeline,
        strategy: FlushStrategy,
    ) -> JobSnapshot:
        job = JobSnapshot(
            id=job_id,
            pipeline=pipeline.name,
            strategy=strategy.name,
            steps=tuple(StepState(step.name) for step in plan.steps),
            created_at=time.time(),
            input=request.input,
            options=request.options,
            owner=request.owner,
        )
        await self.store.add(job)
        await self.bus.open(job.id)
        if self.control is not None:
            await self.control.acquire(job.id)
        run = _Running(job)
        self._running[job.id] = run
        run.task = asyncio.create_task(
            self._run(run, plan, pipeline, strategy), name=f"job:{job.id}"
        )
        run.task.add_done_callback(functools.partial(self._task_done, run))
        return job

    async def _publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        encoded = await self.bus.publish(job_id, event)
        if self.on_publish is not None:
            self.on_publish()
        self._events[job_id] = self._events.get(job_id, 0) + 1
        self._bytes[job_id] = self._bytes.get(job_id, 0) + len(encoded.frame)
        self._retention.published(job_id, encoded)
        run = self._running.get(job_id)
        if run is None:
            await self.store.put(apply_event(await self.store.get(job_id), encoded))
        else:
            await self._snapshots.save(run, encoded)
        return encoded

    async def _run(
        self, run: _Running, plan: JobPlan, pipeline: Pipeline, strategy: FlushStrategy
    ) -> JobOutcome:
        job = run.job
        # The task inherited the creating request's context; its logs are the job's, not it.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=job.id)
        started = time.monotonic()
        outcome = JobOutcome("cancelled")

        async def publish(event: AnyEvent) -> EncodedEvent:
            return await self._publish(job.id, event)

        try:
            outcome = await run_job(
                plan, pipeline, strategy.name, strategy.cadence, publish, lambda: run.stop_reason
            )
            return outcome
        except asyncio.CancelledError:
            if run.stop_reason is not None:
                outcome = JobOutcome("failed", run.stop_reason)
            raise
        except Exception as exc:
            # run_job reports step failures itself; this is the backstop for a failure to
            # report one (e.g. the bus refused the final event): the job must still end.
            outcome = await self._crashed(run, exc)
            return outcome
        finally:
            await self._close(run, outcome, started)

    def _task_done(self, run: _Running, task: asyncio.Task[JobOutcome]) -> None:
        if run.ended.is_set():
            return
        # asyncio cancels a task that has not started yet without running any of its
        # body, so nothing published this job's `done` (its streams would wait forever),
        # closed its topic or logged its end: a task of its own does that now.
        run.ender = asyncio.create_task(self._end_unstarted(run), name=f"job-end:{run.job.id}")

    async def _end_unstarted(self, run: _Running) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=run.job.id)
        started = time.monotonic()
        outcome = JobOutcome("cancelled")
        try:
            if run.stop_reason is None:
                await self._publish(run.job.id, DoneEvent("cancelled", 0.0, error="cancelled"))
            else:
                outcome = JobOutcome("failed", run.stop_reason)
                await self._publish(run.job.id, ErrorEvent(run.stop_reason, None))
                await self._publish(run.job.id, DoneEvent("failed", 0.0, error=run.stop_reason))
        except Exception as exc:
            outcome = await self._crashed(run, exc)
        finally:
            await self._close(run, outcome, started)

    async def _crashed(self, run: _Running, exc: Exception) -> JobOutcome:
        outage = backend_outage(exc)
        if outage is not None and self.control is not None:
            # Not a bug: Redis stayed away past the grace (logged where it was noticed).
            # The job's end is published when Redis is back (``_close``).
            run.unpublished_end = REDIS_LOST_REASON
            return JobOutcome("failed", REDIS_LOST_REASON)
        if outage is not None:
            outcome = JobOutcome("failed", outage.message)
        else:
            log.exception("job crashed")
            outcome = JobOutcome("failed", f"internal error: {type(exc).__name__}")
        try:
            await self._snapshots.end_without_events(run.job.id, outcome)
        except Exception as end_exc:
            if backend_outage(end_exc) is None:
                raise
        return outcome

    async def _close(self, run: _Running, outcome: JobOutcome, started: float) -> None:
        """Close the job's topic and log its end; whatever happens, the job has ended."""
        job = run.job
        keep_lease = False
        try:
            if run.unpublished_end is not None:
                # Should this instance not publish the end within the lease (it stops,
                # or Redis stays away longer), the lease is kept, so that the lost-runner
                # sweeper ends the job and no stream of it waits forever.
                keep_lease = True  # also if the wait is cancelled
                keep_lease = not await self._snapshots.record_end_when_back(
                    run, run.unpublished_end, functools.partial(self._publish, job.id)
                )
            else:
                if run.unsaved_since is not None:
                    await self._snapshots.put(run, wait=True)
                await self.bus.close(job.id)
        except Exception as exc:
            outage = backend_outage(exc)
            if outage is None:
                raise
            # Redis went away again after the job's `done`: the sweeper closes its log.
            keep_lease = True
            outcome = JobOutcome("failed", outage.message)
            log.error("job end not recorded: redis unreachable", error=outage.message)
        finally:
            if self.control is not None and not keep_lease:
                try:
                    await self.control.release(job.id)
                except Exception as exc:  # the lease expires by itself; sweepers skip ended jobs
                    log.warning("lease not released", error=str(exc))
            self._running.pop(job.id, None)
            self._retention.settle(job.id)
            run.ended.set()
            log.info(
                "job finished",
                pipeline=job.pipeline,
                strategy=job.strategy,
                status=outcome.status,
                error=outcome.error,
                duration_s=round(time.monotonic() - started, 3),
                events=self._events.pop(job.id, 0),
                bytes=self._bytes.pop(job.id, 0),
            )
            await self._retention.shed(keep=job.id)

    async def get(self, job_id: str) -> JobSnapshot:
        """The job's snapshot (``JobNotFound`` if unknown)."""
        return await self.store.get(job_id)

    async def newest(
        self, *, limit: int, status: JobStatus | None, owner: str | None = None
    ) -> list[JobSnapshot]:
        """Jobs newest first; only ``owner``'s when given."""
        return await self.store.newest(limit=limit, status=status, owner=owner)

    async def cancel(self, job_id: str) -> JobSnapshot:
        """Cancel a queued or running job; ``JobAlreadyFinished`` if it has ended.

        A job already being cancelled counts as ended: of two concurrent cancels, only
        the first is accepted (with other instances: of all cancels on every instance).
        A job another instance runs is cancelled there (that instance learns at once);
        the answer waits for its ``done`` either way.
        """
        job = await self.store.get(job_id)
        run = self._running.get(job_id)
        if self.control is None:
            # No await from here to `_cancel_local`, which sets `cancelling`: of concurrent
            # cancels exactly one passes this check (the claim, as SET NX is with Redis).
            if run is None or run.task is None or run.cancelling or job.status.finished:
                status = job.status
                if not status.finished and run is not None and run.cancelling:
                    status = JobStatus.CANCELLED
                raise JobAlreadyFinished(job_id, status.value)
        else:
            if job.status.finished:
                raise JobAlreadyFinished(job_id, job.status.value)
            if not await self.control.claim_cancel(job_id):
                raise JobAlreadyFinished(job_id, JobStatus.CANCELLED.value)
        if run is not None and run.task is not None:
            self._cancel_local(job_id)
            # Let the job publish its final event, so the answer shows the cancelled job.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await run.ended.wait()
            return await self.store.get(job_id)
        assert self.control is not None
        await self.control.request_cancel(job_id)
        return await self._wait_ended_elsewhere(job_id)

    def _cancel_local(self, job_id: str) -> None:
        """Cancel the task of a job this instance runs (once)."""
        run = self._running.get(job_id)
        if run is None or run.task is None or run.cancelling:
            return
        run.cancelling = True
        run.task.cancel()

    async def _wait_ended_elsewhere(self, job_id: str) -> JobSnapshot:
        """Wait (up to ``CANCEL_WAIT_S``) for another instance's job to end; its snapshot."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                after = await self.bus.last_seq(job_id)
                async with self.bus.subscribe(job_id, after) as subscription:
                    while not (await subscription.next_batch(None)).ended:
                        pass
                # The runner writes the final snapshot just after publishing `done`.
                while True:
                    job = await self.store.get(job_id)
                    if job.status.finished:
                        return job
                    await asyncio.sleep(CANCEL_POLL_S)
        return await self.store.get(job_id)

    async def expire(self, now: float | None = None) -> int:
        """Forget jobs that finished more than ``job_ttl_s`` ago; returns how many.

        With Redis, whose keys expire by themselves, only this process's count of them.
        """
        cutoff = (time.time() if now is None else now) - self.job_ttl_s
        return await self._retention.expire(cutoff)

    @property
    def handing_off(self) -> bool:
        """Draining with other instances: streams and polls end so clients go elsewhere."""
        return self.draining and self.control is not None

    async def check_ready(self, timeout_s: float) -> None:
        """Raise ``Draining`` or ``BackendUnavailable`` unless this instance can take work."""
        if self.draining:
            raise Draining()
        if self.control is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.control.ping()
        except Exception as exc:
            raise BackendUnavailable(" ".join(str(exc).split()) or type(exc).__name__) from None

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when draining starts (at once if it has); returns an unregister."""
        if self.draining:
            callback()
            return lambda: None
        self._drain_callbacks.add(callback)
        return lambda: self._drain_callbacks.discard(callback)

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs, give running ones ``grace_s`` to finish, then end the rest.

        With other instances (Redis), those still running then end ``failed`` with reason
        ``shutdown``; alone, they are cancelled as :meth:`shutdown` does.
        """
        if not self.draining:
            self.draining = True
            callbacks, self._drain_callbacks = self._drain_callbacks, set()
            for callback in callbacks:
                callback()
        runs = list(self._running.values())
        log.info("draining", running_jobs=len(runs), grace_s=grace_s)
        if runs:
            waits = [asyncio.ensure_future(run.ended.wait()) for run in runs]
            await asyncio.wait(waits, timeout=grace_s)
            for wait in waits:
                wait.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        """End every job that has not ended and wait for each to publish its ``done``.

        Alone, a job ends ``cancelled``; with other instances (Redis), ``failed`` with
        reason ``shutdown`` (its watchers are elsewhere and must not read it as a cancel).
        """
        runs = list(self._running.values())
        for run in runs:
            if not run.cancelling and run.task is not None:
                run.cancelling = True
                if self.control is not None:
                    run.stop_reason = SHUTDOWN_REASON
                run.task.cancel()
        if runs:
            await asyncio.gather(*(run.ended.wait() for run in runs))

    async def maintain(self) -> None:
        """With other instances: watch cancel requests, renew leases, sweep lost runners.

        Runs until cancelled (the app owns the task); returns at once for one instance.
        """
        if self.control is None:
            return
        maintenance = LeaseMaintenance(
            self.control, running_jobs=lambda: list(self._running), cancel=self._cancel_local
        )
        await maintenance.run()
