"""A job's own end against a cancel, and a start that fails half-way (issue 16).

A cancel that lands while the job is publishing its ``done`` used to interrupt it: the
runner then published a second ``done`` (cancelled) after the first, and the cancel was
answered ``202`` with status ``succeeded``. A job whose topic could not be opened after
its snapshot was stored stayed ``queued`` forever. Both are forced here deterministically
through the real ``JobManager``, with a store or bus that pauses or fails at that point.
"""

from __future__ import annotations

import asyncio

import attrs
import pytest

from app.bus import MemoryEventBus
from app.core.errors import JobAlreadyFinished
from app.jobs.manager import JobManager, JobRequest
from app.jobs.pipelines import DemoPipeline
from app.jobs.store import JobSnapshot, JobStatus, MemoryJobStore
from strategies import STRATEGIES, build_strategy

QUICK = {"steps": 1, "tokens_per_step": 5, "tokens_per_second": 1000}


@attrs.define(eq=False)
class PausingStore(MemoryJobStore):
    """The memory store, pausing the write of the job's succeeded snapshot until released."""

    reached: asyncio.Event = attrs.Factory(asyncio.Event)
    release: asyncio.Event = attrs.Factory(asyncio.Event)

    async def put(self, job: JobSnapshot) -> None:
        if job.status is JobStatus.SUCCEEDED and not self.release.is_set():
            self.reached.set()  # the job's `done` is on the bus; its snapshot not yet
            await self.release.wait()
        await super().put(job)


@attrs.define
class FailingOpenBus(MemoryEventBus):
    """The memory bus, whose ``open`` fails (as a lost Redis would)."""

    async def open(self, job_id: str) -> None:
        raise ConnectionError("the bus cannot open the job's topic (injected)")


def manager(store: MemoryJobStore, bus: MemoryEventBus) -> JobManager:
    return JobManager(
        bus=bus,
        store=store,
        pipelines={"demo": DemoPipeline()},
        strategies={name: build_strategy(name) for name in STRATEGIES},
    )


class TestCancelAgainstTheEnd:
    async def test_a_cancel_during_the_jobs_done_is_a_409_and_publishes_nothing(self) -> None:
        """A cancel while `done` (succeeded) is being published: 409 naming succeeded, one
        `done` on the bus, the job succeeded."""
        store, bus = PausingStore(), MemoryEventBus()
        jobs = manager(store, bus)
        job = await jobs.create(JobRequest(pipeline="demo", strategy="none", options=QUICK))
        await asyncio.wait_for(store.reached.wait(), 10)
        with pytest.raises(JobAlreadyFinished) as refused:
            await jobs.cancel(job.id)
        assert refused.value.status == 409
        assert refused.value.job_status == "succeeded"
        store.release.set()
        async with bus.subscribe(job.id) as subscription:
            events = []
            while not (batch := await subscription.next_batch(5)).ended:
                events += batch.events
        assert [e.type for e in events].count("done") == 1
        assert events[-1].type == "done"
        assert (await store.get(job.id)).status is JobStatus.SUCCEEDED

    async def test_a_cancel_before_the_end_is_accepted(self) -> None:
        """The control: a cancel while the job runs is accepted and ends it cancelled."""
        store, bus = MemoryJobStore(), MemoryEventBus()
        jobs = manager(store, bus)
        slow = {"steps": 1, "tokens_per_step": 1000, "tokens_per_second": 10}
        job = await jobs.create(JobRequest(pipeline="demo", strategy="none", options=slow))
        await asyncio.sleep(0.2)
        answer = await jobs.cancel(job.id)
        assert answer.status is JobStatus.CANCELLED


class TestStartThatFails:
    async def test_a_job_whose_topic_cannot_open_is_not_left_queued(self) -> None:
        """The bus fails after the snapshot was stored: the error reaches the caller and the
        job is forgotten (not `queued` forever)."""
        store = MemoryJobStore()
        jobs = manager(store, FailingOpenBus())
        with pytest.raises(ConnectionError):
            await jobs.create(JobRequest(pipeline="demo", strategy="none", options=QUICK))
        assert await store.newest(limit=10) == []
        assert jobs.active_jobs == 0
