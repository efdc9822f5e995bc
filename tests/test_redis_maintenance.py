"""The maintenance loops (cancel watcher, lease renewal, lost-runner sweep) outlive their failures.

A loop that died on an unexpected error (only lost connections were retried) stopped the
lease renewals with it: the peers then ended every job of the instance as runner lost. And
one job whose takeover raised blocked the sweep of every other. Each test runs the real
``JobManager`` and ``RedisJobControl`` on a real ``redis-server``; the failure is injected
through the control (or the store it reads), which raises once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import structlog
from redis.asyncio import Redis

from app.bus.redis import RedisEventBus
from app.bus.redis_client import connect_redis
from app.core.events import JobStartedEvent
from app.jobs.manager import JobManager, JobRequest
from app.jobs.pipelines import DemoPipeline
from app.jobs.redis_control import RUNNER_LOST, RedisJobControl
from app.jobs.redis_store import RedisJobStore
from app.jobs.store import JobSnapshot, JobStatus, StepState
from strategies import STRATEGIES, build_strategy
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

LEASE_S = 1.0
#: How long the peer sweeps while the job runs: several leases.
WATCH_S = 4 * LEASE_S
#: A demo job that runs past ``WATCH_S`` (60 tokens at 10 per second).
LONG_OPTIONS = {"steps": 1, "tokens_per_step": 60, "tokens_per_second": 10}


class Injected(RuntimeError):
    """The failure a test injects."""


@attrs.define(eq=False)
class FailingOnce(RedisJobControl):
    """The real control, whose ``step`` (a method name) raises once, on its first call."""

    step: str = ""
    failures: int = 0

    def _fail(self, step: str) -> None:
        if step == self.step and self.failures == 0:
            self.failures += 1
            raise Injected(f"{step} failed (injected)")

    async def watch_cancels(self, on_cancel: Callable[[str], None]) -> None:
        self._fail("watch_cancels")
        await super().watch_cancels(on_cancel)

    async def renew(self, job_ids: Any) -> set[str]:
        self._fail("renew")
        return await super().renew(job_ids)

    async def sweep(self) -> list[str]:
        self._fail("sweep")
        return await super().sweep()


@attrs.define(eq=False)
class FoldFails(RedisJobStore):
    """The real store, whose ``fold`` (the sweep's first read of a job) raises for one job."""

    failing: str | None = None

    async def fold(self, job: JobSnapshot, until: bytes | str = "+") -> JobSnapshot:
        if job.id == self.failing:
            raise Injected(f"cannot read job {job.id} (injected)")
        return await super().fold(job, until)


@attrs.define
class Instance:
    """One instance's Redis side: its client, bus, store and control."""

    redis: Redis
    bus: RedisEventBus
    store: RedisJobStore
    control: RedisJobControl


@pytest.fixture
async def make_instance(
    redis_server: RedisServer,
) -> AsyncIterator[Callable[..., Instance]]:
    """Instances on the session's Redis, all under one key prefix of the test's own."""
    prefix = f"maint-{uuid.uuid4().hex}:"
    made: list[Instance] = []

    def make(
        control_class: type[RedisJobControl] = RedisJobControl,
        store_class: type[RedisJobStore] = RedisJobStore,
        lease_s: float = LEASE_S,
        **control: Any,
    ) -> Instance:
        redis = connect_redis(redis_server.url)
        bus = RedisEventBus(redis, prefix=prefix)
        store = store_class(redis, prefix=prefix)
        made.append(
            Instance(
                redis,
                bus,
                store,
                control_class(redis, bus, store, lease_s=lease_s, prefix=prefix, **control),
            )
        )
        return made[-1]

    yield make
    for instance in made:
        await instance.bus.aclose()
        await instance.redis.aclose()


def manager(instance: Instance) -> JobManager:
    return JobManager(
        bus=instance.bus,
        store=instance.store,
        pipelines={"demo": DemoPipeline()},
        strategies={name: build_strategy(name) for name in STRATEGIES},
        control=instance.control,
    )


def failures_logged(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log entries of failures logged with their traceback."""
    return [e for e in logs if e["log_level"] == "error" and e.get("exc_info")]


class TestAStepThatRaisesOnce:
    """Each maintenance step may fail once: the job's lease is still renewed, nothing swept."""

    @pytest.mark.parametrize("step", ["watch_cancels", "renew", "sweep"])
    async def test_leases_still_renewed_and_no_job_swept(
        self, make_instance: Callable[..., Instance], step: str
    ) -> None:
        """The step raises once: for 4 leases the peer sweeps nothing, the lease stays ours."""
        runner = make_instance(FailingOnce, step=step)
        peer = make_instance()
        jobs = manager(runner)
        with structlog.testing.capture_logs() as logs:
            maintenance = asyncio.create_task(jobs.maintain())
            try:
                job = await jobs.create(JobRequest("demo", "none", options=LONG_OPTIONS))
                swept: list[str] = []
                deadline = time.monotonic() + WATCH_S
                while time.monotonic() < deadline:
                    swept += await peer.control.sweep()
                    await asyncio.sleep(LEASE_S / 4)
                holder = await runner.redis.get(f"{runner.bus.prefix}job:{job.id}:lease")
                status = (await jobs.get(job.id)).status
                # The loops went on: a cancel is still heard (on the other instance here).
                cancelled = await manager(peer).cancel(job.id)
            finally:
                maintenance.cancel()
                await asyncio.gather(maintenance, return_exceptions=True)
                await jobs.shutdown()
        assert isinstance(runner.control, FailingOnce)
        assert runner.control.failures == 1
        assert swept == []
        assert holder == runner.control.instance.encode()
        assert status is JobStatus.RUNNING
        assert cancelled.status is JobStatus.CANCELLED
        [failure] = failures_logged(logs)
        assert "failed" in failure["event"]


async def lost_job(instance: Instance, job_id: str) -> None:
    """A running job whose runner (``instance``, with a short lease) is gone."""
    await instance.store.add(
        JobSnapshot(
            id=job_id,
            pipeline="demo",
            strategy="none",
            steps=(StepState("only"),),
            created_at=time.time(),
            status=JobStatus.RUNNING,
        )
    )
    await instance.bus.open(job_id)
    await instance.bus.publish(job_id, JobStartedEvent(("only",), "none"))
    await instance.control.acquire(job_id)


class TestOneJobNeverBlocksTheSweep:
    """A job whose takeover raises is logged and tried later; the others are swept."""

    async def test_the_other_lost_jobs_are_ended(
        self, make_instance: Callable[..., Instance]
    ) -> None:
        """Two lost jobs, the first one's takeover raising: the second ends; the first later."""
        dead = make_instance(lease_s=0.2)
        bad, good = f"bad-{uuid.uuid4().hex}", f"good-{uuid.uuid4().hex}"
        await lost_job(dead, bad)
        await asyncio.sleep(0.05)  # the bad job's lease expires first: it leads the sweep
        await lost_job(dead, good)
        await asyncio.sleep(0.4)
        sweeper = make_instance(store_class=FoldFails, lease_s=0.2)
        store = sweeper.store
        assert isinstance(store, FoldFails)
        store.failing = bad
        with structlog.testing.capture_logs() as logs:
            first = await sweeper.control.sweep()
        store.failing = None
        await asyncio.sleep(0.4)  # it was put back a lease later
        second = await sweeper.control.sweep()
        assert first == [good]
        assert second == [bad]
        for job_id in (good, bad):
            snapshot = await sweeper.store.get(job_id)
            assert snapshot.status is JobStatus.FAILED
            assert snapshot.error == RUNNER_LOST
        [failure] = failures_logged(logs)
        assert failure["job_id"] == bad


class TestSweptJobsAreCounted:
    async def test_a_swept_job_moves_from_running_to_failed_in_the_counts(
        self, make_instance: Callable[..., Instance]
    ) -> None:
        """The takeover files the job under failed at once: /metrics's counts agree with it."""
        dead = make_instance(lease_s=0.2)
        job_id = f"lost-{uuid.uuid4().hex}"
        await lost_job(dead, job_id)
        sweeper = make_instance(lease_s=0.2)
        before = await sweeper.store.count_by_status()
        await asyncio.sleep(0.4)
        assert await sweeper.control.sweep() == [job_id]
        after = await sweeper.store.count_by_status()
        assert after[JobStatus.RUNNING] == before[JobStatus.RUNNING] - 1
        assert after[JobStatus.FAILED] == before[JobStatus.FAILED] + 1
        listed = await sweeper.store.newest(limit=1000, status=JobStatus.FAILED)
        assert job_id in {job.id for job in listed}
