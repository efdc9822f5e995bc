"""Keeping a running job's snapshot while Redis is lost, and recording its end once back.

A running job's runner is its snapshot's only writer, so while Redis cannot be reached
the newest snapshot is kept in this process and written as soon as Redis answers (with
the job's next event, or at its end). Should Redis stay away longer than the grace
(``FLUSHLINE_REDIS_GRACE_S``), the job fails with :data:`REDIS_LOST_REASON`; its
``error`` and ``done`` are published once Redis is back, within the runner's lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import structlog

from app.bus import EventBus
from app.core.errors import BackendUnavailable, backend_outage
from app.core.events import AnyEvent, DoneEvent, EncodedEvent, ErrorEvent
from app.jobs.control import JobControl
from app.jobs.maintenance import MAINTENANCE_RETRY_S
from app.jobs.runner import JobOutcome
from app.jobs.store import JobSnapshot, JobStatus, JobStore, StepStatus, apply_event

__all__ = ["REDIS_LOST_REASON", "SNAPSHOT_RETRY_S", "KeptSnapshot", "SnapshotKeeper"]

# The manager's logger: its lines keep their ``logger`` field since they moved here.
log = structlog.get_logger("app.jobs.manager")

#: Pause between attempts to write a job's snapshot while Redis is lost.
SNAPSHOT_RETRY_S = 0.2
#: Why a job failed when Redis stayed away past ``FLUSHLINE_REDIS_GRACE_S``.
REDIS_LOST_REASON = (
    "Redis was unreachable for longer than FLUSHLINE_REDIS_GRACE_S: "
    "the events the job published meanwhile were dropped"
)


class KeptSnapshot(Protocol):
    """A running job's newest snapshot, and since when it could not be written."""

    #: The newest snapshot (the last one written, or one kept while Redis is lost).
    job: JobSnapshot
    #: When ``job`` could not be written, Redis being lost; or None.
    unsaved_since: float | None


@attrs.frozen
class SnapshotKeeper:
    """Writes running jobs' snapshots, riding out a lost Redis for ``grace_s``."""

    store: JobStore
    bus: EventBus
    #: Coordination with other instances; ``None``: alone (no end to record later).
    control: JobControl | None
    #: How long a running job's snapshot waits for a lost Redis.
    grace_s: float

    async def save(self, run: KeptSnapshot, encoded: EncodedEvent) -> None:
        """Fold ``encoded`` into the job's snapshot; while Redis is lost, keep it here.

        The runner is the snapshot's only writer, so its last snapshot is the base when
        the store cannot be read; the newest one is written as soon as Redis answers
        (here, or at the job's end), or the job fails past ``grace_s``.
        """
        try:
            base = run.job if run.unsaved_since is not None else await self.store.get(run.job.id)
        except Exception as exc:
            if backend_outage(exc) is None:
                raise
            base = run.job
        run.job = apply_event(base, encoded)
        await self.put(run, wait=False)

    async def put(self, run: KeptSnapshot, *, wait: bool) -> None:
        """Write ``run.job``; on a lost Redis, keep it for later (or, with ``wait``, retry).

        Raises ``BackendUnavailable`` once Redis has been lost for ``grace_s``.
        """
        while True:
            try:
                await self.store.put(run.job)
            except Exception as exc:
                outage = backend_outage(exc)
                if outage is None:
                    raise
                now = time.monotonic()
                if run.unsaved_since is None:
                    run.unsaved_since = now
                    log.warning("redis lost; the job's snapshot waits for it", error=str(exc))
                if now - run.unsaved_since > self.grace_s:
                    raise BackendUnavailable(
                        f"Redis unreachable for more than {self.grace_s:g} s"
                    ) from None
                if not wait:
                    return
                await asyncio.sleep(SNAPSHOT_RETRY_S)
                continue
            run.unsaved_since = None
            return

    async def record_end_when_back(
        self,
        run: KeptSnapshot,
        reason: str,
        publish: Callable[[AnyEvent], Awaitable[object]],
    ) -> bool:
        """Publish the job's ``error`` and ``done`` (failed: ``reason``) once Redis is back.

        Tried every :data:`~app.jobs.maintenance.MAINTENANCE_RETRY_S` within the lease
        (the job still counts as running, so its lease is renewed as soon as Redis
        answers). False when it did not get through, or another instance ended the job
        first (its log is closed).
        """
        if self.control is None:
            return False
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.control.lease_s
        step = next((s.name for s in run.job.steps if s.status is StepStatus.RUNNING), None)
        pending: list[AnyEvent] = [
            ErrorEvent(reason, step),
            DoneEvent("failed", run.job.progress, error=reason),
        ]
        while loop.time() < give_up_at:
            await asyncio.sleep(MAINTENANCE_RETRY_S)
            try:
                while pending:
                    await publish(pending[0])
                    pending.pop(0)
                if run.unsaved_since is not None:
                    await self.put(run, wait=False)
                await self.bus.close(run.job.id)
                log.info("job end recorded after the outage", reason=reason)
                return True
            except Exception as exc:
                if backend_outage(exc) is None:
                    # Another instance's sweeper ended the job: its log is closed.
                    log.info("job end recorded elsewhere", error=str(exc))
                    return False
        return False

    async def end_without_events(self, job_id: str, outcome: JobOutcome) -> None:
        """Mark the job finished in the store when its final events could not be published."""
        job = await self.store.get(job_id)
        if not job.status.finished:
            await self.store.put(
                attrs.evolve(
                    job,
                    status=JobStatus(outcome.status),
                    error=outcome.error,
                    finished_at=time.time(),
                )
            )
