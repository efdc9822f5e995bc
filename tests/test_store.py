"""Tests for the JobStore protocol (app/jobs/), written against the protocol only.

Every test gets its store from the parametrized ``make_store`` fixture, so each
implementation passes the same suite unchanged: the memory store, and the Redis store on
a throw-away redis-server (each store under its own key prefix, so tests cannot see each
other's jobs). Expiry is checked the way the service expires jobs: wait past the TTL,
then the manager's pass (``finished_before`` then ``discard``); a store may also expire
them by itself, as Redis does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import attrs
import pytest

from app.bus.redis_client import connect_redis
from app.core.errors import JobNotFound
from app.jobs.redis_store import RedisJobStore
from app.jobs.store import JobSnapshot, JobStatus, JobStore, MemoryJobStore, StepState, StepStatus
from tests.support.redis import RedisServer

# --- fixtures ----------------------------------------------------------------------


class StoreFactory(Protocol):
    def __call__(self, *, job_ttl_s: float) -> Awaitable[JobStore]: ...


async def _memory_store(*, job_ttl_s: float) -> JobStore:
    return MemoryJobStore()  # the manager expires its jobs; the TTL is the manager's


CloseStore = Callable[[], Awaitable[None]]


def _redis_store(server: RedisServer, closers: list[CloseStore]) -> StoreFactory:
    """Stores on the session's throw-away redis-server, each under its own key prefix."""

    async def make(*, job_ttl_s: float) -> JobStore:
        client = connect_redis(server.url)
        closers.append(client.aclose)
        return RedisJobStore(client, job_ttl_s=job_ttl_s, prefix=f"test-{uuid.uuid4().hex}:")

    return make


#: One factory per JobStore implementation.
STORE_FACTORIES: dict[str, StoreFactory] = {"memory": _memory_store}
#: Implementations that need a server: the server's fixture, and the factory given it.
SERVER_STORE_FACTORIES: dict[
    str, tuple[str, Callable[[RedisServer, list[CloseStore]], StoreFactory]]
] = {"redis": ("redis_server", _redis_store)}

DEFAULT_TTL_S = 3600.0

MakeStore = Callable[..., Awaitable[JobStore]]


@pytest.fixture(params=sorted([*STORE_FACTORIES, *SERVER_STORE_FACTORIES]))
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Build stores of the parametrized kind with a chosen TTL; closed after the test."""
    closers: list[CloseStore] = []
    if request.param in SERVER_STORE_FACTORIES:
        fixture, build = SERVER_STORE_FACTORIES[request.param]
        # Skips (or fails under FLUSHLINE_REQUIRE_INTEGRATION=1) without the server.
        factory = build(request.getfixturevalue(fixture), closers)
    else:
        factory = STORE_FACTORIES[request.param]

    async def make(*, job_ttl_s: float = DEFAULT_TTL_S) -> JobStore:
        return await factory(job_ttl_s=job_ttl_s)

    yield make
    for close in closers:
        await close()


@pytest.fixture
async def store(make_store: MakeStore) -> JobStore:
    """A store of the parametrized kind with the default TTL."""
    return await make_store()


# --- helpers -----------------------------------------------------------------------


def snapshot(n: int = 0, **changes: object) -> JobSnapshot:
    """A job created now (+ n ms, so creation order is n's order) with two steps."""
    job = JobSnapshot(
        id=f"job-{uuid.uuid4().hex}",
        pipeline="demo",
        strategy="aligned",
        steps=(StepState("research"), StepState("write")),
        created_at=time.time() + n / 1000,
        input={"topic": "résumé ✓"},
        options={"steps": 2, "seed": 7},
    )
    return attrs.evolve(job, **changes)


def finished(job: JobSnapshot, status: JobStatus = JobStatus.SUCCEEDED) -> JobSnapshot:
    now = time.time()
    return attrs.evolve(
        job, status=status, started_at=job.created_at, finished_at=now, progress=100.0
    )


async def expire(store: JobStore, ttl_s: float) -> None:
    """The manager's expiry pass: forget what finished more than ``ttl_s`` ago."""
    for job_id in await store.finished_before(time.time() - ttl_s):
        await store.discard(job_id)


# --- tests -------------------------------------------------------------------------


class TestReadWrite:
    async def test_added_job_reads_back_equal_in_every_field(self, store: JobStore) -> None:
        """get returns the snapshot that was added, steps, input, options and all."""
        job = snapshot()
        await store.add(job)
        assert await store.get(job.id) == job

    async def test_unknown_job_raises_job_not_found(self, store: JobStore) -> None:
        """get of an id never added raises JobNotFound."""
        with pytest.raises(JobNotFound):
            await store.get(f"missing-{uuid.uuid4().hex}")

    async def test_put_replaces_the_snapshot(self, store: JobStore) -> None:
        """After put, get returns the new snapshot (running, then finished with a result)."""
        job = snapshot()
        await store.add(job)
        running = attrs.evolve(
            job,
            status=JobStatus.RUNNING,
            started_at=job.created_at + 0.25,
            steps=(StepState("research", StepStatus.RUNNING, 42.5, 17), StepState("write")),
            progress=21.25,
            last_event_id=9,
        )
        await store.put(running)
        assert await store.get(job.id) == running
        done = attrs.evolve(
            finished(running),
            steps=(
                StepState("research", StepStatus.SUCCEEDED, 100.0, 40),
                StepState("write", StepStatus.SUCCEEDED, 100.0, 40),
            ),
            result={"text": "ok", "sections": [1, 2, {"nested": None}]},
            last_event_id=30,
        )
        await store.put(done)
        assert await store.get(job.id) == done

    async def test_put_of_an_unknown_job_stores_nothing(self, store: JobStore) -> None:
        """put only replaces: a job that was never added (or was forgotten) stays unknown."""
        job = snapshot()
        await store.put(job)
        with pytest.raises(JobNotFound):
            await store.get(job.id)
        assert job.id not in [j.id for j in await store.newest(limit=100)]

    async def test_failed_job_keeps_its_error(self, store: JobStore) -> None:
        """A failed snapshot round-trips with its error and failed step."""
        job = snapshot()
        await store.add(job)
        failed = attrs.evolve(
            finished(job, JobStatus.FAILED),
            error="step write failed: boom",
            steps=(
                StepState("research", StepStatus.SUCCEEDED, 100.0, 40),
                StepState("write", StepStatus.FAILED, 12.0, 5),
            ),
        )
        await store.put(failed)
        assert await store.get(job.id) == failed


class TestListing:
    async def test_newest_first_with_limit(self, store: JobStore) -> None:
        """newest lists jobs newest first and at most limit of them."""
        jobs = [snapshot(n) for n in range(5)]
        for job in jobs:
            await store.add(job)
        assert [j.id for j in await store.newest(limit=10)] == [j.id for j in reversed(jobs)]
        assert [j.id for j in await store.newest(limit=2)] == [jobs[4].id, jobs[3].id]

    async def test_newest_shows_the_current_snapshots(self, store: JobStore) -> None:
        """The listing carries each job's latest state, not the one it was added with."""
        job = snapshot()
        await store.add(job)
        running = attrs.evolve(job, status=JobStatus.RUNNING, progress=50.0, last_event_id=4)
        await store.put(running)
        assert await store.newest(limit=1) == [running]

    async def test_status_filter(self, store: JobStore) -> None:
        """newest(status=...) lists only jobs in that status, still newest first."""
        jobs = [snapshot(n) for n in range(6)]
        for job in jobs:
            await store.add(job)
        for job in jobs[::2]:
            await store.put(finished(job))
        done = await store.newest(limit=10, status=JobStatus.SUCCEEDED)
        assert [j.id for j in done] == [jobs[4].id, jobs[2].id, jobs[0].id]
        queued = await store.newest(limit=2, status=JobStatus.QUEUED)
        assert [j.id for j in queued] == [jobs[5].id, jobs[3].id]
        assert await store.newest(limit=10, status=JobStatus.CANCELLED) == []

    async def test_status_filter_reaches_past_many_other_jobs(self, store: JobStore) -> None:
        """A filtered listing finds the jobs it wants behind hundreds that it skips."""
        old = snapshot(0)
        await store.add(old)
        await store.put(finished(old, JobStatus.CANCELLED))
        for n in range(1, 451):
            await store.add(snapshot(n))
        got = await store.newest(limit=5, status=JobStatus.CANCELLED)
        assert [j.id for j in got] == [old.id]

    async def test_owner_filter(self, store: JobStore) -> None:
        """newest(owner=...) lists only that owner's jobs, with the status filter too."""
        mine = [snapshot(n, owner="fp-a") for n in (0, 2, 4)]
        theirs = [snapshot(n, owner="fp-b") for n in (1, 3)]
        anonymous = snapshot(5)
        for job in sorted([*mine, *theirs, anonymous], key=lambda j: j.created_at):
            await store.add(job)
        await store.put(finished(mine[0]))
        assert [j.id for j in await store.newest(limit=10, owner="fp-a")] == [
            mine[2].id,
            mine[1].id,
            mine[0].id,
        ]
        assert [j.id for j in await store.newest(limit=1, owner="fp-b")] == [theirs[1].id]
        got = await store.newest(limit=10, status=JobStatus.SUCCEEDED, owner="fp-a")
        assert [j.id for j in got] == [mine[0].id]
        assert await store.newest(limit=10, status=JobStatus.SUCCEEDED, owner="fp-b") == []
        assert (await store.get(mine[1].id)).owner == "fp-a"
        assert "owner" not in mine[1].to_json()

    async def test_owner_filter_after_discards(self, store: JobStore) -> None:
        """An owner's discarded jobs leave their listing; their other jobs stay in order."""
        mine = [snapshot(n, owner="fp-a") for n in range(4)]
        for job in mine:
            await store.add(job)
        await store.add(snapshot(5, owner="fp-b"))
        await store.discard(mine[1].id)
        await store.discard(mine[3].id)
        got = await store.newest(limit=10, owner="fp-a")
        assert [j.id for j in got] == [mine[2].id, mine[0].id]
        for job in (mine[0], mine[2]):
            await store.discard(job.id)
        assert await store.newest(limit=10, owner="fp-a") == []
        assert len(await store.newest(limit=10, owner="fp-b")) == 1

    async def test_count(self, store: JobStore) -> None:
        """count follows adds and discards."""
        assert await store.count() == 0
        jobs = [snapshot(n) for n in range(3)]
        for job in jobs:
            await store.add(job)
        assert await store.count() == 3
        await store.discard(jobs[1].id)
        assert await store.count() == 2


class TestCountsByStatus:
    """count_by_status: kept as jobs change status (the /metrics figure), on every store."""

    @staticmethod
    def counts(**nonzero: int) -> dict[JobStatus, int]:
        return {status: nonzero.get(status.value, 0) for status in JobStatus}

    async def test_counts_follow_adds_puts_and_discards(self, store: JobStore) -> None:
        """Each add, status change and discard moves the counts; other puts do not."""
        assert await store.count_by_status() == self.counts()
        jobs = [snapshot(n) for n in range(4)]
        for job in jobs:
            await store.add(job)
        assert await store.count_by_status() == self.counts(queued=4)
        running = attrs.evolve(jobs[0], status=JobStatus.RUNNING)
        await store.put(running)
        await store.put(attrs.evolve(running, progress=40.0, last_event_id=3))
        await store.put(finished(jobs[1]))
        await store.put(finished(jobs[2], JobStatus.CANCELLED))
        assert await store.count_by_status() == self.counts(
            queued=1, running=1, succeeded=1, cancelled=1
        )
        await store.put(finished(running, JobStatus.FAILED))
        await store.discard(jobs[2].id)
        await store.discard(f"missing-{uuid.uuid4().hex}")
        assert await store.count_by_status() == self.counts(queued=1, succeeded=1, failed=1)

    async def test_a_put_of_an_unknown_job_counts_nothing(self, store: JobStore) -> None:
        """put of a job never added (or discarded) stores and counts nothing."""
        job = snapshot()
        await store.put(finished(job))
        assert await store.count_by_status() == self.counts()

    async def test_a_late_put_after_the_end_counts_what_is_kept(self, store: JobStore) -> None:
        """A put after the job's end: the counts show the status the store kept."""
        job = snapshot()
        await store.add(job)
        await store.put(finished(job))
        stored = (await store.get(job.id)).status
        await store.put(attrs.evolve(job, status=JobStatus.RUNNING))
        now = (await store.get(job.id)).status
        assert await store.count_by_status() == self.counts(**{now.value: 1})
        assert stored is JobStatus.SUCCEEDED

    async def test_counts_agree_with_the_listing(self, store: JobStore) -> None:
        """For each status, the count is the number of jobs a filtered listing returns."""
        jobs = [snapshot(n) for n in range(30)]
        statuses = list(JobStatus)
        for n, job in enumerate(jobs):
            await store.add(job)
            status = statuses[n % len(statuses)]
            if status is not JobStatus.QUEUED:
                await store.put(attrs.evolve(job, status=status))
        counts = await store.count_by_status()
        for status in JobStatus:
            assert counts[status] == len(await store.newest(limit=100, status=status)) == 6


class TestForgetting:
    async def test_discard_forgets_the_job(self, store: JobStore) -> None:
        """After discard the job is neither found nor listed; others stay."""
        keep, drop = snapshot(0), snapshot(1)
        await store.add(keep)
        await store.add(drop)
        await store.discard(drop.id)
        with pytest.raises(JobNotFound):
            await store.get(drop.id)
        assert [j.id for j in await store.newest(limit=10)] == [keep.id]
        assert await store.get(keep.id) == keep

    async def test_discard_of_an_unknown_job_is_harmless(self, store: JobStore) -> None:
        """discard of an id that is not stored changes nothing."""
        job = snapshot()
        await store.add(job)
        await store.discard(f"missing-{uuid.uuid4().hex}")
        assert await store.newest(limit=10) == [job]

    async def test_finished_job_is_gone_after_the_ttl(self, make_store: MakeStore) -> None:
        """Past the TTL (and the expiry pass) a finished job is gone; one still written stays."""
        ttl_s = 0.5
        store = await make_store(job_ttl_s=ttl_s)
        done, running = snapshot(0), snapshot(1)
        await store.add(done)
        await store.add(running)
        await store.put(finished(done))
        deadline = time.monotonic() + ttl_s + 0.5
        progress = 0.0
        while time.monotonic() < deadline:  # the running job keeps publishing
            progress += 1.0
            await store.put(attrs.evolve(running, status=JobStatus.RUNNING, progress=progress))
            await asyncio.sleep(0.05)
        await expire(store, ttl_s)
        with pytest.raises(JobNotFound):
            await store.get(done.id)
        assert (await store.get(running.id)).progress == progress
        assert done.id not in [j.id for j in await store.newest(limit=10)]

    async def test_finished_job_stays_within_the_ttl(self, make_store: MakeStore) -> None:
        """Before the TTL has passed, a finished job survives the expiry pass."""
        ttl_s = 30.0
        store = await make_store(job_ttl_s=ttl_s)
        job = snapshot()
        await store.add(job)
        await store.put(finished(job))
        await expire(store, ttl_s)
        assert (await store.get(job.id)).status is JobStatus.SUCCEEDED
