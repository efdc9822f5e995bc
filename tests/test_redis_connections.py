"""Redis connections stay fixed whatever the number of jobs watched, and a blocking read never
times out on a healthy Redis.

Each watched job used to hold a pooled connection in ``XREAD BLOCK``, finished jobs included
while their feed lingered: thousands of jobs touched at once emptied the pool, and every
command of the instance waited, then failed. And redis-py's socket timeout (5 s) applied to
``XREAD BLOCK 0``: a healthy Redis logged ``redis read failed`` 10 s into a watch and ended
a live stream as ``backend_lost``. Real sockets throughout: the app on a real server (or real
``flushline serve`` processes), a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.bus.redis import RedisEventBus
from app.bus.redis_client import POOL_CLIENT_NAME, READER_CLIENT_NAME, CountingPool
from app.bus.redis_reader import READERS
from app.core.events import InsightEvent
from app.jobs.redis_store import RedisJobStore
from app.jobs.store import JobSnapshot, JobStatus, StepState
from app.web.keys import BUS
from tests.support.redis import RedisServer
from tests.support.redis_jobs import seed_finished_jobs
from tests.support.sse_client import StreamRecord, read_stream
from tests.test_redis_instances import RUNNING_JOB, create, start_instances, stream
from tests.test_redis_lease import assert_ended_by_lost_runner

pytestmark = pytest.mark.integration

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]

#: Finished jobs long-polled once each, and how many polls are in flight at once.
FINISHED_JOBS = 5_000
CONCURRENT_POLLS = 32
#: The pool connections the burst may use beyond those open before it: the polls in
#: flight, plus a few for the running job's stream and the publisher's writes.
POOL_BOUND = CONCURRENT_POLLS + 16
#: A generous bound on a running job's delivery lag while the burst goes on (the figure
#: is in ``python -m bench.redis_bus``).
LAG_BOUND_S = 1.0
#: Events of the running job: one every this many seconds.
PUBLISH_EVERY_S = 0.05


async def client_names(admin: Redis) -> dict[str, int]:
    """Connections to Redis right now, by client name."""
    counts: dict[str, int] = {}
    for client in await admin.client_list():
        name = client.get("name", "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def lags_s(record: StreamRecord, start: float, end: float) -> list[float]:
    """Arrival minus emission of the events that arrived between ``start`` and ``end``."""
    return [a.at - a.data["ts"] for a in record.events if start <= a.at < end]


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client of the test's own (unnamed, so not counted as the app's)."""
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


class TestManyJobsWatched:
    """Thousands of jobs watched on one instance cost no connection each."""

    async def test_5000_finished_jobs_polled_once_hold_no_connection(
        self, make_client: MakeClient, redis_server: RedisServer, admin: Redis
    ) -> None:
        """5,000 finished jobs polled once: no pool wait, connections bounded, no stalled stream."""
        ids = await seed_finished_jobs(admin, FINISHED_JOBS)
        client = await make_client(
            {
                "FLUSHLINE_BUS": "redis",
                "FLUSHLINE_REDIS_URL": redis_server.url,
                "FLUSHLINE_LOG_LEVEL": "warning",
            }
        )
        bus = client.app[BUS]
        assert isinstance(bus, RedisEventBus)
        pool = bus.redis.connection_pool
        assert isinstance(pool, CountingPool)
        # Every feed lingers to the end, as if all the polls had come within 10 s.
        bus.feed_linger_s = 600.0

        # A running job published by another instance (a bus of the test's own), watched
        # over SSE here: its events come through this instance's readers.
        publisher = RedisEventBus(Redis.from_url(redis_server.url), owns_client=True)
        running = uuid.uuid4().hex
        await RedisJobStore(admin).add(
            JobSnapshot(
                id=running,
                pipeline="demo",
                strategy="none",
                steps=(StepState("only"),),
                created_at=time.time(),
                status=JobStatus.RUNNING,
            )
        )
        await publisher.open(running)
        stop = asyncio.Event()

        async def publish() -> None:
            i = 0
            while not stop.is_set():
                await publisher.publish(running, InsightEvent(f"event {i}"))
                i += 1
                await asyncio.sleep(PUBLISH_EVERY_S)
            await publisher.close(running)

        before = await client_names(admin)
        peak: dict[str, int] = dict(before)
        sampling = True

        async def sample() -> None:
            while sampling:
                for name, count in (await client_names(admin)).items():
                    peak[name] = max(peak.get(name, 0), count)
                await asyncio.sleep(0.1)

        async with aiohttp.ClientSession() as session:
            watched = asyncio.create_task(
                read_stream(
                    session, f"{client.make_url(f'/api/jobs/{running}/stream')}?proxy_buffer=0"
                )
            )
            publishing = asyncio.create_task(publish())
            sampler = asyncio.create_task(sample())
            await asyncio.sleep(2.0)
            burst_from = time.time()
            gate = asyncio.Semaphore(CONCURRENT_POLLS)

            async def poll(job_id: str) -> None:
                async with (
                    gate,
                    session.get(
                        client.make_url(f"/api/jobs/{job_id}/events?after=0&wait_s=0")
                    ) as response,
                ):
                    assert response.status == 200, await response.text()
                    body = await response.json()
                    assert body["done"]
                    assert body["last_event_id"] == 2

            # Captured, not printed: 5,000 request lines would cost more than the polls.
            with structlog.testing.capture_logs() as logs:
                await asyncio.gather(*(poll(job_id) for job_id in ids))
            burst_to = time.time()
            lingering = bus.feeds.count
            stop.set()
            await publishing
            record = await watched
            sampling = False
            await sampler
        await publisher.aclose()

        # Every finished job's feed is still here, and none is read: only the running one.
        assert lingering >= FINISHED_JOBS
        assert bus.feeds.followed <= 1
        assert pool.waits == 0
        assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
        assert peak.get(READER_CLIENT_NAME, 0) - before.get(READER_CLIENT_NAME, 0) <= READERS
        assert peak.get(POOL_CLIENT_NAME, 0) - before.get(POOL_CLIENT_NAME, 0) <= POOL_BOUND
        assert pool.peak_in_use <= POOL_BOUND
        during = lags_s(record, burst_from, burst_to)
        assert len(during) > (burst_to - burst_from) / PUBLISH_EVERY_S / 4
        assert sorted(during)[int(len(during) * 0.99)] < LAG_BOUND_S
        assert record.payloads()[-1]["type"] == "insight"  # the log closed: the stream ended
        assert record.seqs() == list(range(1, len(record.seqs()) + 1))


#: A job that publishes nothing for a long while (progress and chunks every 60 s).
QUIET_JOB: dict[str, Any] = {
    "options": {"steps": 1, "tokens_per_step": 4, "tokens_per_second": 0.1},
}
QUIET_ENV = {"FLUSHLINE_PROGRESS_INTERVAL": "60", "FLUSHLINE_CHUNK_INTERVAL": "60"}
#: Past the 10 s at which the socket timeout (5 s, retried once) used to fail a read.
PAST_TIMEOUT_S = 12.0
#: A lease past it too: B's stream waits that long, with no event, for the sweeper's end.
KILL_LEASE_S = 12.0


def read_failures(log: pathlib.Path) -> list[str]:
    """The log lines of failed Redis reads."""
    return [line for line in log.read_text().splitlines() if "redis read failed" in line]


class TestBlockingReads:
    """A healthy Redis never looks lost to a blocking read."""

    async def test_watches_on_the_other_instance_past_10_s_never_fail_a_read(
        self, redis_server: RedisServer, tmp_path: pathlib.Path
    ) -> None:
        """A finished job and a quiet running job watched on B for 12 s: no read fails."""
        async with contextlib.AsyncExitStack() as stack:
            a, b = await start_instances(stack, redis_server.url, tmp_path, **QUIET_ENV)
            async with aiohttp.ClientSession() as session:
                finished = await create(session, a, RUNNING_JOB)
                quiet = await create(session, a, QUIET_JOB)
                whole = await stream(session, b, finished["id"])
                assert whole.payloads()[-1]["type"] == "done"
                started = time.monotonic()
                # Still watched on B: a long-poll of the finished job (its feed lingers), a
                # stream of the quiet one.
                watching = asyncio.create_task(stream(session, b, quiet["id"]))
                await asyncio.sleep(PAST_TIMEOUT_S)
                async with session.get(
                    f"{b.url}/api/jobs/{finished['id']}/events?after=0&wait_s=0"
                ) as response:
                    assert response.status == 200
                assert not watching.done()  # the quiet job's stream is still open
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            assert time.monotonic() - started >= PAST_TIMEOUT_S
            assert read_failures(b.log) == []

    async def test_a_killed_runner_ends_the_other_instances_stream_as_runner_lost(
        self, redis_server: RedisServer, tmp_path: pathlib.Path
    ) -> None:
        """kill -9 A (12 s lease): B's stream ends runner lost (error, done); no read failed."""
        async with contextlib.AsyncExitStack() as stack:
            a, b = await start_instances(
                stack,
                redis_server.url,
                tmp_path,
                FLUSHLINE_RUNNER_LEASE_S=str(KILL_LEASE_S),
                **QUIET_ENV,
            )
            async with aiohttp.ClientSession() as session:
                job = await create(session, a, QUIET_JOB)
                on_b = asyncio.create_task(stream(session, b, job["id"]))
                await asyncio.sleep(1.0)
                a.process.kill()
                await a.process.wait()
                record = await on_b
        assert record.status == 200
        assert_ended_by_lost_runner(record)
        assert read_failures(b.log) == []
