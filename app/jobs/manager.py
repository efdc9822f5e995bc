"""The job manager: creates jobs, runs them as tasks the app owns, cancels and expires them.

:class:`JobManager` is the service's entry point to jobs. A job's ``input`` and
``options`` are bounded in depth and size (:mod:`app.jobs.limits`) before anything reads
them, and room is made for it in the retention budget (:mod:`app.jobs.retention`) before
it starts. The manager then hands it to :mod:`app.jobs.running`, which owns its task,
publishes its events and ends it, riding out a lost Redis (:mod:`app.jobs.snapshot_keeper`).
It also answers cancels (here or on the instance that runs the job), drains and shuts
down; with other instances, :mod:`app.jobs.maintenance` watches cancels, renews this
instance's leases and sweeps lost runners.

An external job (``"pipeline": "external"``) is created here too, within the same
bounds and budget, but runs nowhere: :mod:`app.jobs.external_jobs` publishes what its
producer sends, cancels it and ends it when its producer goes silent.
"""

from __future__ import annotations

import asyncio
import contextlib
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
)
from app.jobs.budget import (
    JOB_BASE_BYTES,
    RESULT_BYTES_PER_TOKEN,
    STEP_BYTES,
    KeptJob,
    RetainedBudget,
)
from app.jobs.control import JobControl
from app.jobs.external import EXTERNAL_PIPELINE, ProducerEvent, StepDecl
from app.jobs.external_jobs import ExternalJobs, ExternalLimits, PublishResult, Refresh
from app.jobs.limits import JsonLimits, measure_json
from app.jobs.maintenance import LeaseMaintenance
from app.jobs.pipelines import JobPlan, Pipeline
from app.jobs.producers import MemoryProducerStore, ProducerStore
from app.jobs.retention import Retention
from app.jobs.running import RunningJobs
from app.jobs.snapshot_keeper import REDIS_LOST_REASON, SnapshotKeeper
from app.jobs.store import JobSnapshot, JobStatus, JobStore, StepState
from strategies import FlushStrategy

__all__ = ["CANCEL_WAIT_S", "REDIS_LOST_REASON", "SHUTDOWN_REASON", "JobManager", "JobRequest"]

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
    #: An external job's declared steps (``pipeline`` is ``external``).
    steps: tuple[StepDecl, ...] = ()


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
    #: External jobs' producer states and publish locks (Redis: shared by every instance).
    producers: ProducerStore = attrs.Factory(MemoryProducerStore)
    #: Brings a snapshot up to its job's log (Redis: ``RedisJobStore.fold``); external
    #: jobs are published from any instance, so a snapshot held here may be behind.
    refresh_snapshot: Refresh | None = None
    #: Bounds of external jobs (producer timeout, bytes, rate, batch size).
    external_limits: ExternalLimits = attrs.Factory(ExternalLimits)
    _drain_callbacks: set[Callable[[], None]] = attrs.Factory(set)
    _retention: Retention = attrs.field(init=False)
    _running: RunningJobs = attrs.field(init=False)
    _external: ExternalJobs = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._retention = Retention(
            self.store,
            self.bus,
            RetainedBudget(self.max_retained_bytes, self.max_history_bytes),
            self.max_retained_jobs,
            running_jobs=lambda: self.active_jobs,
        )
        self._running = RunningJobs(
            self.bus,
            self.store,
            self.control,
            SnapshotKeeper(self.store, self.bus, self.control, self.backend_grace_s),
            self._retention,
            on_publish=self._published,
        )
        self._external = ExternalJobs(
            self.bus,
            self.store,
            self.producers,
            self._retention,
            cadence_of=lambda name: self.strategy(name).cadence,
            limits=self.external_limits,
            on_publish=self._published,
            refresh=self.refresh_snapshot,
            shared=self.control is not None,
        )

    def _published(self) -> None:
        # Read at each event: the app's metrics set `on_publish` after construction.
        if self.on_publish is not None:
            self.on_publish()

    @property
    def active_jobs(self) -> int:
        """Jobs created here that have not ended yet (queued, running or being cancelled)."""
        return len(self._running) + len(self._external)

    @property
    def retained_bytes(self) -> int:
        """What the jobs this process keeps count against ``max_retained_bytes``."""
        return self._retention.retained_bytes

    def strategy(self, name: str) -> FlushStrategy:
        """The configured strategy called ``name`` (``InvalidField`` if unknown)."""
        return _lookup(self.strategies, "strategy", name)

    def pipeline(self, name: str) -> Pipeline:
        """The registered pipeline called ``name`` (``InvalidField`` if unknown)."""
        if name not in self.pipelines:
            allowed = ", ".join((*self.pipelines, EXTERNAL_PIPELINE))
            raise InvalidField("pipeline", f"unknown pipeline {name!r}; allowed: {allowed}")
        return self.pipelines[name]

    async def create(self, request: JobRequest) -> JobSnapshot:
        """Validate, store and start a job; returns its first snapshot."""
        pipeline = self.pipeline(request.pipeline)
        strategy = self.strategy(request.strategy)
        measured = self._measure(request)
        plan = pipeline.plan(request.input, request.options)
        fixed = self._admit(measured, len(plan.steps))
        expected = RESULT_BYTES_PER_TOKEN * sum(step.expected_tokens for step in plan.steps)
        job_id = secrets.token_urlsafe(16)
        await self._retention.make_room(job_id, KeptJob(fixed, expected))
        try:
            return await self._start(job_id, request, plan, pipeline, strategy)
        except BaseException:
            self._retention.release(job_id)
            raise

    def _measure(self, request: JobRequest) -> int:
        """Bound ``input`` and ``options`` (before anything reads, prints or encodes them)."""
        return measure_json("input", request.input, self.input_limits) + measure_json(
            "options", request.options, self.input_limits
        )

    def _admit(self, measured: int, steps: int) -> int:
        """Check capacity; the job's fixed bytes (``measured``: its input and options)."""
        fixed = JOB_BASE_BYTES + measured + STEP_BYTES * steps
        if self.draining:
            raise Draining()
        if self.active_jobs >= self.max_active_jobs:
            raise AtCapacity(self.max_active_jobs)
        return fixed

    async def create_external(self, request: JobRequest) -> tuple[JobSnapshot, str]:
        """Create an external job (its producer publishes); its snapshot and publish token.

        It stays ``queued`` until its producer's first publish. It reserves, besides its
        fixed bytes and a full history, the largest result a producer may send.
        """
        strategy = self.strategy(request.strategy)
        fixed = self._admit(self._measure(request), len(request.steps))
        job_id = secrets.token_urlsafe(16)
        kept = KeptJob(fixed, self.input_limits.max_bytes)
        await self._retention.make_room(job_id, kept)
        job = JobSnapshot(
            id=job_id,
            pipeline=EXTERNAL_PIPELINE,
            strategy=strategy.name,
            steps=tuple(StepState(step.name) for step in request.steps),
            created_at=time.time(),
            input=request.input,
            options=request.options,
            owner=request.owner,
        )
        try:
            token = await self._external.create(job, request.steps)
        except BaseException:
            self._retention.release(job_id)
            raise
        return job, token

    async def publish(
        self, job_id: str, producer_seq: int, events: list[ProducerEvent]
    ) -> PublishResult:
        """Publish an external job's batch (see ``ExternalJobs.publish``)."""
        return await self._external.publish(job_id, producer_seq, events)

    async def check_publish_token(self, job_id: str, token: str) -> bool:
        """Whether ``token`` is the external job's publish token (``JobNotFound`` if none)."""
        return await self._external.check_token(job_id, token)

    async def watch_producers(self) -> None:
        """End external jobs whose producer went silent, until cancelled (the app's task)."""
        await self._external.watch()

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
        await self._running.start(job, plan, pipeline, strategy)
        return job

    async def get(self, job_id: str) -> JobSnapshot:
        """The job's snapshot (``JobNotFound`` if unknown)."""
        return await self._current(await self.store.get(job_id))

    async def _current(self, job: JobSnapshot) -> JobSnapshot:
        if self.refresh_snapshot is None or job.status.finished:
            return job
        if job.pipeline != EXTERNAL_PIPELINE:
            return job
        return await self.refresh_snapshot(job)

    async def newest(
        self, *, limit: int, status: JobStatus | None, owner: str | None = None
    ) -> list[JobSnapshot]:
        """Jobs newest first; only ``owner``'s when given."""
        jobs = await self.store.newest(limit=limit, status=status, owner=owner)
        return [await self._current(job) for job in jobs]

    async def cancel(self, job_id: str) -> JobSnapshot:
        """Cancel a queued or running job; ``JobAlreadyFinished`` if it has ended.

        A job already being cancelled counts as ended: of two concurrent cancels, only
        the first is accepted (with other instances: of all cancels on every instance).
        A job another instance runs is cancelled there (that instance learns at once);
        the answer waits for its ``done`` either way.
        """
        job = await self.store.get(job_id)
        if job.pipeline == EXTERNAL_PIPELINE:
            # Ended at once, from any instance, under the job's publish lock.
            return await self._external.cancel(job_id)
        run = self._running.get(job_id)
        if self.control is None:
            # No await from here to `RunningJobs.cancel`, which sets `cancelling`: of concurrent
            # cancels exactly one passes this check (the claim, as SET NX is with Redis).
            if (
                run is None
                or run.task is None
                or run.cancelling
                or run.closing
                or job.status.finished
            ):
                status = job.status.value
                if not job.status.finished and run is not None:
                    if run.final_status is not None:
                        status = run.final_status  # its `done` is out or on its way
                    elif run.cancelling:
                        status = JobStatus.CANCELLED.value
                raise JobAlreadyFinished(job_id, status)
        else:
            if job.status.finished:
                raise JobAlreadyFinished(job_id, job.status.value)
            if not await self.control.claim_cancel(job_id):
                raise JobAlreadyFinished(job_id, JobStatus.CANCELLED.value)
        if run is not None and run.task is not None:
            self._running.cancel(job_id)
            # Let the job publish its final event, so the answer shows the cancelled job.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await run.ended.wait()
            return self._cancelled(await self.store.get(job_id))
        assert self.control is not None
        await self.control.request_cancel(job_id)
        return self._cancelled(await self._wait_ended_elsewhere(job_id))

    @staticmethod
    def _cancelled(job: JobSnapshot) -> JobSnapshot:
        """``job`` as a cancel's answer: a job that ended otherwise first is a 409.

        The cancel raced the job's own end (its ``done`` went out first): answering 202
        with status ``succeeded`` would say the cancel was accepted when it changed nothing.
        """
        if job.status.finished and job.status is not JobStatus.CANCELLED:
            raise JobAlreadyFinished(job.id, job.status.value)
        return job

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
        await self.producers.expire(cutoff)
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
        runs = self._running.all()
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
        await self._external.shutdown()
        await self._external.aclose()
        runs = self._running.all()
        stop_reason = SHUTDOWN_REASON if self.control is not None else None
        for run in runs:
            run.cancel(stop_reason)
        if runs:
            await asyncio.gather(*(run.ended.wait() for run in runs))

    async def maintain(self) -> None:
        """With other instances: watch cancel requests, renew leases, sweep lost runners.

        Runs until cancelled (the app owns the task); returns at once for one instance.
        """
        if self.control is None:
            return
        maintenance = LeaseMaintenance(
            self.control, running_jobs=self._running.ids, cancel=self._running.cancel
        )
        await maintenance.run()
