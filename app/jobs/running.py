"""The jobs this process runs: each one's task, from its start to its end.

Jobs run independently of any stream: a job's task is held here (never by a request),
so watchers coming and going never affect it. Every event goes through
:meth:`RunningJobs.publish`, which publishes it on the bus and folds it into the job's
snapshot in the store (kept here while Redis is lost: :mod:`app.jobs.snapshot_keeper`).
Whatever happens, a job ends: its topic is closed, its lease released (unless its end
is still to be recorded), its bytes settled in the retention budget and its end logged.
A job that another instance ended meanwhile (its sweeper took this one for lost) is
stopped here without publishing: its log is closed, and its end is the sweeper's.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import attrs
import structlog

from app.bus import EventBus
from app.bus.base import LogClosed
from app.core.errors import backend_outage
from app.core.events import AnyEvent, DoneEvent, EncodedEvent, ErrorEvent
from app.jobs.control import JobControl
from app.jobs.pipelines import JobPlan, Pipeline
from app.jobs.retention import Retention
from app.jobs.runner import JobOutcome, run_job
from app.jobs.snapshot_keeper import REDIS_LOST_REASON, SnapshotKeeper
from app.jobs.store import JobSnapshot, JobStatus, JobStore, apply_event
from strategies import FlushStrategy

__all__ = ["RunningJob", "RunningJobs"]

# The manager's logger: its lines keep their ``logger`` field since they moved here.
log = structlog.get_logger("app.jobs.manager")

#: The end this runner records for a job another instance ended (the store keeps that
#: instance's end, whose reason says why).
ENDED_ELSEWHERE = "ended by another instance"


@attrs.define(eq=False)
class RunningJob:
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
    #: Its ending has begun (its ``done`` is being published, or ``_close``): a cancel no
    #: longer interrupts it.
    closing: bool = False
    #: The status of the ``done`` it published (or is publishing), once it has.
    final_status: str | None = None
    #: Another instance ended the job (its log is closed): nothing more is published.
    ended_elsewhere: bool = False

    def cancel(self, stop_reason: str | None = None) -> None:
        """Cancel the task (once); with ``stop_reason``, the job ends ``failed`` with it."""
        if self.task is None or self.cancelling:
            return
        self.cancelling = True
        if stop_reason is not None:
            self.stop_reason = stop_reason
        self.task.cancel()


@attrs.define(eq=False)
class RunningJobs:
    """Starts jobs as tasks this process owns, publishes their events and ends them."""

    bus: EventBus
    store: JobStore
    #: Coordination with other instances (leases); ``None``: this instance is alone.
    control: JobControl | None
    snapshots: SnapshotKeeper
    retention: Retention
    #: Called once per event published.
    on_publish: Callable[[], None]
    _running: dict[str, RunningJob] = attrs.field(init=False, factory=dict)
    #: Per job: the events and bytes it published (for its end's log line).
    _events: dict[str, int] = attrs.field(init=False, factory=dict)
    _bytes: dict[str, int] = attrs.field(init=False, factory=dict)

    def __len__(self) -> int:
        return len(self._running)

    def get(self, job_id: str) -> RunningJob | None:
        """The job, if this process runs it (it has not ended yet)."""
        return self._running.get(job_id)

    def all(self) -> list[RunningJob]:
        """Every job that has not ended yet."""
        return list(self._running.values())

    def ids(self) -> list[str]:
        """The ids of the jobs that have not ended yet."""
        return list(self._running)

    def cancel(self, job_id: str) -> None:
        """Cancel the task of a job this instance runs (once, and not once it is ending).

        Also how a job that another instance ended is stopped here: its first publish
        finds the log closed, and the job ends as that instance ended it.
        """
        run = self._running.get(job_id)
        if run is not None and not run.closing:
            run.cancel()

    async def start(
        self, job: JobSnapshot, plan: JobPlan, pipeline: Pipeline, strategy: FlushStrategy
    ) -> None:
        """Store the job's first snapshot, open its topic, take its lease and run it.

        If the topic or the lease cannot be had (Redis lost), the job is forgotten again
        (best effort: a Redis that stays away lets its key expire) rather than left
        ``queued`` forever with nothing to run it; the error goes to the caller.
        """
        await self.store.add(job)
        try:
            await self.bus.open(job.id)
            if self.control is not None:
                await self.control.acquire(job.id)
        except BaseException:
            try:
                await self.store.discard(job.id)
                await self.bus.discard(job.id)
            except Exception as exc:
                log.warning("job not forgotten after a failed start", error=str(exc))
            raise
        run = RunningJob(job)
        self._running[job.id] = run
        run.task = asyncio.create_task(
            self._run(run, plan, pipeline, strategy), name=f"job:{job.id}"
        )
        run.task.add_done_callback(functools.partial(self._task_done, run))

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        """Publish ``event`` on the bus, count it and fold it into the job's snapshot."""
        ending = self._running.get(job_id)
        if ending is not None and isinstance(event, DoneEvent):
            # From here a cancel would land after (or inside) the job's last event: it
            # must not interrupt it and publish a second `done` (cancelled) after it.
            ending.closing = True
            ending.final_status = event.status
        encoded = await self.bus.publish(job_id, event)
        self.on_publish()
        self._events[job_id] = self._events.get(job_id, 0) + 1
        self._bytes[job_id] = self._bytes.get(job_id, 0) + len(encoded.frame)
        self.retention.published(job_id, encoded)
        run = self._running.get(job_id)
        if run is None:
            await self.store.put(apply_event(await self.store.get(job_id), encoded))
        else:
            await self.snapshots.save(run, encoded)
        return encoded

    async def _run(
        self, run: RunningJob, plan: JobPlan, pipeline: Pipeline, strategy: FlushStrategy
    ) -> JobOutcome:
        job = run.job
        # The task inherited the creating request's context; its logs are the job's, not it.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=job.id)
        started = time.monotonic()
        outcome = JobOutcome("cancelled")

        async def publish(event: AnyEvent) -> EncodedEvent:
            return await self.publish(job.id, event)

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

    def _task_done(self, run: RunningJob, task: asyncio.Task[JobOutcome]) -> None:
        if run.ended.is_set():
            return
        # asyncio cancels a task that has not started yet without running any of its
        # body, so nothing published this job's `done` (its streams would wait forever),
        # closed its topic or logged its end: a task of its own does that now.
        run.ender = asyncio.create_task(self._end_unstarted(run), name=f"job-end:{run.job.id}")

    async def _end_unstarted(self, run: RunningJob) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=run.job.id)
        started = time.monotonic()
        outcome = JobOutcome("cancelled")
        try:
            if run.stop_reason is None:
                await self.publish(run.job.id, DoneEvent("cancelled", 0.0, error="cancelled"))
            else:
                outcome = JobOutcome("failed", run.stop_reason)
                await self.publish(run.job.id, ErrorEvent(run.stop_reason, None))
                await self.publish(run.job.id, DoneEvent("failed", 0.0, error=run.stop_reason))
        except Exception as exc:
            outcome = await self._crashed(run, exc)
        finally:
            await self._close(run, outcome, started)

    async def _crashed(self, run: RunningJob, exc: Exception) -> JobOutcome:
        if isinstance(exc, LogClosed):
            return await self._ended_elsewhere(run)
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
            await self.snapshots.end_without_events(run.job.id, outcome)
        except Exception as end_exc:
            if backend_outage(end_exc) is None:
                raise
        return outcome

    async def _ended_elsewhere(self, run: RunningJob) -> JobOutcome:
        """The job's log was closed by another instance: take its end as this job's."""
        run.ended_elsewhere = True
        ended = attrs.evolve(
            run.job, status=JobStatus.FAILED, error=ENDED_ELSEWHERE, finished_at=time.time()
        )
        try:
            # A finished snapshot in the store is final: this one is refused (the other
            # instance's end is there), and the store stops answering with the snapshot
            # this runner kept of the job while it ran.
            await self.store.put(ended)
            run.job = await self.store.get(run.job.id)
        except Exception as exc:
            if backend_outage(exc) is None:
                raise
            run.job = ended
        job = run.job
        status = job.status.value if job.status.finished else "failed"
        log.warning("job ended elsewhere; stopped here", status=status, error=job.error)
        return JobOutcome(status, job.error)

    async def _close(self, run: RunningJob, outcome: JobOutcome, started: float) -> None:
        """Close the job's topic and log its end; whatever happens, the job has ended."""
        job = run.job
        run.closing = True
        keep_lease = False
        try:
            if run.ended_elsewhere:
                pass  # its log and snapshot are the other instance's end: nothing to write
            elif run.unpublished_end is not None:
                # Should this instance not publish the end within the lease (it stops,
                # or Redis stays away longer), the lease is kept, so that the lost-runner
                # sweeper ends the job and no stream of it waits forever.
                keep_lease = True  # also if the wait is cancelled
                keep_lease = not await self.snapshots.record_end_when_back(
                    run, run.unpublished_end, functools.partial(self.publish, job.id)
                )
            else:
                if run.unsaved_since is not None:
                    await self.snapshots.put(run, wait=True)
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
            self.retention.settle(job.id)
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
            await self.retention.shed(keep=job.id)
