"""Retention: which finished jobs this process keeps, within a count and a byte budget.

Memory is a budget, not only counts: every job this process keeps is counted in
:mod:`app.jobs.budget`. A new job that would pass the budget makes finished jobs
forgotten, those that ended first first; when even that could not make room (running
jobs fill it), it is refused (503 with ``Retry-After``) and nothing is forgotten. A job
whose result passes its reservation makes older finished jobs forgotten as it ends. So
what jobs hold stays within the budget, whatever clients send (a single job larger than
the whole budget is taken only when no other job is kept). Jobs that finished more than
the TTL ago are forgotten by :meth:`Retention.expire`.

Forgetting a job drops it from the store and the bus as well as from the budget.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import structlog

from app.bus import EventBus
from app.core.errors import OverBudget, backend_outage
from app.core.events import EncodedEvent
from app.jobs.budget import KeptJob, RetainedBudget
from app.jobs.store import JobStore

__all__ = ["Retention"]

# The manager's logger: its lines keep their ``logger`` field since they moved here.
log = structlog.get_logger("app.jobs.manager")


@attrs.define(eq=False)
class Retention:
    """Counts the jobs this process keeps and forgets the oldest finished ones to make room."""

    store: JobStore
    bus: EventBus
    budget: RetainedBudget
    max_retained_jobs: int
    #: How many jobs run now (a refusal tells the client).
    running_jobs: Callable[[], int]

    @property
    def retained_bytes(self) -> int:
        """What the jobs this process keeps count against the budget."""
        return self.budget.retained

    async def make_room(self, job_id: str, kept: KeptJob) -> None:
        """Keep the new job within both budgets (count, bytes), forgetting the oldest
        finished jobs first; ``OverBudget`` (503) when only running jobs are left.

        On return the job's bytes are counted (:meth:`release` takes them back), with no
        await between the last check and the count: concurrent creates cannot both fit
        in the same room.
        """
        if await self.store.count() >= self.max_retained_jobs:
            for old in reversed(await self.store.newest(limit=self.max_retained_jobs + 1)):
                if old.status.finished:
                    await self._forget(old.id)
                    break
        budget = self.budget
        while not budget.fits(kept):
            # Refused before anything is forgotten when forgetting could not make the room
            # (running jobs hold it).
            oldest = budget.oldest_finished()
            if oldest is None or budget.running_fill(kept):
                # Not a warning: under load it would be one line per refused request.
                log.debug(
                    "job refused: retained bytes",
                    retained_bytes=budget.retained,
                    needed_bytes=kept.size(budget.history_bytes),
                    max_retained_bytes=budget.max_bytes,
                )
                raise OverBudget(self.running_jobs())
            await self._forget(oldest)
        budget.add(job_id, kept)

    def release(self, job_id: str) -> None:
        """Stop counting a job that did not start after all."""
        self.budget.remove(job_id)

    def published(self, job_id: str, encoded: EncodedEvent) -> None:
        """A running job published ``encoded`` (what it will keep once it ends)."""
        self.budget.published(job_id, encoded)

    def settle(self, job_id: str) -> None:
        """The job has ended: it counts what it keeps instead of its reservation."""
        self.budget.settle(job_id)

    async def shed(self, keep: str) -> None:
        """Past the budget (a result larger than its job's reservation), forget the oldest
        finished jobs but ``keep`` (it has just ended: its result is still to be read).
        """
        while self.budget.over():
            oldest = self.budget.oldest_finished(keep)
            if oldest is None:
                return
            try:
                await self._forget(oldest)
            except Exception as exc:
                if backend_outage(exc) is None:
                    raise
                log.warning("finished job not forgotten: redis unreachable", error=str(exc))
                return

    async def expire(self, cutoff: float) -> int:
        """Forget jobs that finished before ``cutoff`` (Unix seconds); returns how many.

        With Redis, whose keys expire by themselves, only this process's count of them.
        """
        expired = await self.store.finished_before(cutoff)
        for job_id in expired:
            await self._forget(job_id)
        for job_id in self.budget.finished_before(cutoff):
            self.budget.remove(job_id)
        return len(expired)

    async def _forget(self, job_id: str) -> None:
        self.budget.remove(job_id)
        await self.store.discard(job_id)
        await self.bus.discard(job_id)
