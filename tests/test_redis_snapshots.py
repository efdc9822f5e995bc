"""Redis snapshots: written once a second and at the end, not per event, yet the same everywhere.

The runner's store writes a running job's snapshot at most once a second, and its end at
once; another instance's store folds the events published since into the snapshot it
reads. These tests run a runner's side (bus + store on one client) and a
reader's side (a store on another client) on a throw-away redis-server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import attrs
import pytest
from redis.asyncio import Redis

from app.bus.redis import RedisEventBus
from app.bus.redis_client import connect_redis
from app.core.events import (
    AnyEvent,
    ChunkEvent,
    DoneEvent,
    JobStartedEvent,
    StepCompletedEvent,
    StepProgressEvent,
    StepStartedEvent,
)
from app.jobs.redis_store import RedisJobStore, snapshot_from_json, snapshot_to_json
from app.jobs.store import JobSnapshot, JobStatus, StepState, StepStatus, apply_event
from tests.support.redis import RedisServer

STEPS = ("research", "write")
#: The runner's snapshot interval here: long, so that no test depends on its speed.
INTERVAL_S = 60.0


@attrs.define
class Instances:
    """The runner's bus and store, and another instance's store, sharing one Redis."""

    bus: RedisEventBus
    runner: RedisJobStore
    reader: RedisJobStore
    admin: Redis

    async def start(self) -> JobSnapshot:
        job = JobSnapshot(
            id=f"job-{uuid.uuid4().hex}",
            pipeline="demo",
            strategy="none",
            steps=tuple(StepState(name) for name in STEPS),
            created_at=time.time(),
        )
        await self.runner.add(job)
        await self.bus.open(job.id)
        return job

    async def publish(self, job: JobSnapshot, event: AnyEvent) -> JobSnapshot:
        """What the manager does per event: publish, fold, put."""
        encoded = await self.bus.publish(job.id, event)
        job = apply_event(await self.runner.get(job.id), encoded)
        await self.runner.put(job)
        return job

    async def stored(self, job_id: str) -> JobSnapshot:
        """The snapshot as written in Redis, without any folding."""
        raw = await self.admin.get(self.runner.key(job_id))
        assert raw is not None
        return snapshot_from_json(raw)


@pytest.fixture
async def instances(redis_server: RedisServer) -> AsyncIterator[Instances]:
    prefix = f"test-{uuid.uuid4().hex}:"
    clients = [connect_redis(redis_server.url) for _ in range(3)]
    yield Instances(
        bus=RedisEventBus(clients[0], prefix=prefix),
        runner=RedisJobStore(clients[0], prefix=prefix, snapshot_interval_s=INTERVAL_S),
        reader=RedisJobStore(clients[1], prefix=prefix),
        admin=clients[2],
    )
    for client in clients:
        await client.aclose()


async def run_first_step(instances: Instances, job: JobSnapshot, chunks: int) -> JobSnapshot:
    job = await instances.publish(job, JobStartedEvent(STEPS, "none"))
    job = await instances.publish(job, StepStartedEvent("research", 0, 2))
    for n in range(1, chunks + 1):
        job = await instances.publish(job, ChunkEvent("research", "tok ", 1))
        pct = 90.0 * n / chunks
        job = await instances.publish(job, StepProgressEvent("research", pct, pct / 2, n, 1.0))
    return job


class TestWrites:
    async def test_progress_events_do_not_each_write_a_snapshot(self, instances: Instances) -> None:
        """The start (a status change) is written at once; 200 chunks and progress events
        after it, within the interval, write no snapshot."""
        job = await instances.start()
        job = await instances.publish(job, JobStartedEvent(STEPS, "none"))
        assert await instances.stored(job.id) == job
        assert job.status is JobStatus.RUNNING
        job = await instances.publish(job, StepStartedEvent("research", 0, 2))
        for n in range(1, 101):
            job = await instances.publish(job, ChunkEvent("research", "tok ", 1))
            job = await instances.publish(job, StepProgressEvent("research", n * 0.9, n, n, 1.0))
        # Every write stores the newest snapshot: none since the start's (event 1).
        assert job.last_event_id == 202
        assert (await instances.stored(job.id)).last_event_id == 1

    async def test_the_end_is_written_at_once(self, instances: Instances) -> None:
        """The job's final snapshot is in Redis as soon as its done is published."""
        job = await run_first_step(instances, await instances.start(), chunks=3)
        job = await instances.publish(job, StepCompletedEvent("research", 0, 50.0, 3, 0.1))
        assert (await instances.stored(job.id)).last_event_id < job.last_event_id
        job = await instances.publish(job, DoneEvent("succeeded", 100.0, result={"ok": 1}))
        assert await instances.stored(job.id) == job
        assert job.steps[0].status is StepStatus.SUCCEEDED

    async def test_a_quiet_job_is_written_after_the_interval(self, instances: Instances) -> None:
        """An event more than the interval after the last write is written at once."""
        instances.runner.snapshot_interval_s = 0.2
        job = await run_first_step(instances, await instances.start(), chunks=3)
        await asyncio.sleep(0.3)
        job = await instances.publish(job, StepCompletedEvent("research", 0, 50.0, 3, 0.1))
        assert await instances.stored(job.id) == job


class TestReadsElsewhere:
    async def test_another_instance_reads_the_runners_snapshot(self, instances: Instances) -> None:
        """Mid-step, get on another instance equals the runner's snapshot, progress and all."""
        job = await run_first_step(instances, await instances.start(), chunks=40)
        assert (await instances.stored(job.id)) != job  # Redis holds an older one
        assert await instances.reader.get(job.id) == job
        assert job.steps[0].pct == pytest.approx(90.0)
        assert job.status is JobStatus.RUNNING

    async def test_listing_elsewhere_shows_current_progress(self, instances: Instances) -> None:
        """newest() on another instance folds each running job's newer events."""
        first = await run_first_step(instances, await instances.start(), chunks=10)
        second = await run_first_step(instances, await instances.start(), chunks=20)
        listed = await instances.reader.newest(limit=10)
        assert listed == [second, first]
        running = await instances.reader.newest(limit=10, status=JobStatus.RUNNING)
        assert running == [second, first]


class TestStatusIndexes:
    """Per-status indexes kept with the snapshot writes: counts and filtered listings."""

    async def keyspace_reads(self, instances: Instances) -> int:
        """Key lookups Redis has served so far (hits and misses)."""
        stats = await instances.admin.info("stats")
        return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])

    async def test_every_instance_counts_the_same(self, instances: Instances) -> None:
        """The runner's and another instance's counts agree through start and end."""
        job = await instances.start()
        for store in (instances.runner, instances.reader):
            assert (await store.count_by_status())[JobStatus.QUEUED] == 1
        job = await instances.publish(job, JobStartedEvent(STEPS, "none"))
        for store in (instances.runner, instances.reader):
            counts = await store.count_by_status()
            assert (counts[JobStatus.QUEUED], counts[JobStatus.RUNNING]) == (0, 1)
        await instances.publish(job, DoneEvent("succeeded", 100.0))
        for store in (instances.runner, instances.reader):
            counts = await store.count_by_status()
            assert (counts[JobStatus.RUNNING], counts[JobStatus.SUCCEEDED]) == (0, 1)

    async def test_a_filtered_listing_reads_only_its_status(self, instances: Instances) -> None:
        """2 running jobs behind 400 finished ones: the listing reads a handful of keys."""
        running = [await instances.start() for _ in range(2)]
        for n in range(400):
            job = attrs.evolve(running[0], id=f"done-{n}-{uuid.uuid4().hex}")
            await instances.runner.add(job)
            await instances.runner.put(attrs.evolve(job, status=JobStatus.SUCCEEDED))
        for job in running:
            await instances.publish(job, JobStartedEvent(STEPS, "none"))
        before = await self.keyspace_reads(instances)
        listed = await instances.reader.newest(limit=10, status=JobStatus.RUNNING)
        reads = await self.keyspace_reads(instances) - before
        assert sorted(job.id for job in listed) == sorted(job.id for job in running)
        assert reads < 20, reads

    async def test_an_owners_listing_reads_only_their_jobs(self, instances: Instances) -> None:
        """One owner's 2 jobs behind 400 of another owner's: a handful of keys read."""
        template = await instances.start()
        mine = [
            attrs.evolve(template, id=f"mine-{n}-{uuid.uuid4().hex}", owner="fp-a") for n in (0, 1)
        ]
        for job in mine:
            await instances.runner.add(job)
        for n in range(400):
            other = attrs.evolve(template, id=f"theirs-{n}-{uuid.uuid4().hex}", owner="fp-b")
            await instances.runner.add(other)
        before = await self.keyspace_reads(instances)
        listed = await instances.reader.newest(limit=10, owner="fp-a")
        reads = await self.keyspace_reads(instances) - before
        assert sorted(job.id for job in listed) == sorted(job.id for job in mine)
        assert reads < 20, reads
        running = await instances.reader.newest(limit=10, status=JobStatus.RUNNING, owner="fp-a")
        assert running == []

    async def test_a_write_outside_put_is_settled(self, instances: Instances) -> None:
        """A snapshot ended by another script (the sweeper's) moves index on settle_status,
        and a filtered listing that meets it in the old index settles it too."""
        first, second = await instances.start(), await instances.start()
        for job in (first, second):
            ended = apply_event(job, await instances.bus.publish(job.id, DoneEvent("failed", 0.0)))
            await instances.admin.set(instances.runner.key(job.id), snapshot_to_json(ended))
        counts = await instances.reader.count_by_status()
        assert (counts[JobStatus.QUEUED], counts[JobStatus.FAILED]) == (2, 0)
        await instances.reader.settle_status(first.id)
        assert await instances.reader.newest(limit=10, status=JobStatus.QUEUED) == []
        counts = await instances.reader.count_by_status()
        assert (counts[JobStatus.QUEUED], counts[JobStatus.FAILED]) == (0, 2)

    async def test_expired_jobs_leave_the_counts(self, instances: Instances) -> None:
        """Jobs created longer than the TTL ago are no longer counted (nor listed)."""
        instances.reader.job_ttl_s = 0.5
        await instances.start()
        assert (await instances.reader.count_by_status())[JobStatus.QUEUED] == 1
        await asyncio.sleep(0.6)
        assert (await instances.reader.count_by_status())[JobStatus.QUEUED] == 0
        assert await instances.reader.newest(limit=10, status=JobStatus.QUEUED) == []
