"""Runner leases (FLUSHLINE_RUNNER_LEASE_S): a job outlives its runner by at most the lease.

Real ``flushline serve`` processes on one throw-away redis-server, with a 3 s lease: the
runner is killed (``kill -9``) or frozen (``SIGSTOP``), and the other instances must end
its job once, ``error`` (runner lost) then ``done`` status ``failed``, on every stream,
within the lease plus 2 s, without losing an event published before the crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.support.redis import RedisServer
from tests.support.sse_client import StreamRecord
from tests.test_redis_instances import (
    LONG_JOB,
    Instance,
    create,
    get_json,
    start_instances,
    stream,
    wait_running,
)

LEASE_S = 3.0
#: The contract's bound: every stream of the job ends within the lease plus 2 s.
BOUND_S = LEASE_S + 2.0
#: A runner back from a freeze stops a job ended elsewhere within this (it renews every
#: third of its 1.5 s lease).
STOPPED_WITHIN_S = 3.0
#: A job that publishes nothing for 10 s at a time (4 tokens at 0.1 per second, progress
#: and chunks every 60 s).
QUIET_JOB: dict[str, Any] = {
    "options": {"steps": 1, "tokens_per_step": 4, "tokens_per_second": 0.1},
}


@pytest.fixture
async def trio(redis_server: RedisServer, tmp_path: pathlib.Path) -> AsyncIterator[list[Instance]]:
    """Instances A, B and C with a 3 s runner lease."""
    async with contextlib.AsyncExitStack() as stack:
        yield await start_instances(
            stack, redis_server.url, tmp_path, "ABC", FLUSHLINE_RUNNER_LEASE_S=str(LEASE_S)
        )


def assert_ended_by_lost_runner(record: StreamRecord) -> None:
    """Seqs 1..n without gap; exactly one error (runner lost) and one done (failed), last."""
    payloads = record.payloads()
    assert record.seqs() == list(range(1, len(payloads) + 1))
    types = [p["type"] for p in payloads]
    assert types.count("error") == 1
    assert types.count("done") == 1
    error, done = payloads[-2], payloads[-1]
    assert error["type"] == "error"
    assert error["message"].startswith("runner lost")
    assert (done["type"], done["status"]) == ("done", "failed")
    assert done["error"].startswith("runner lost")


class TestRunnerLost:
    """The runner dies: the others end its job, once, on every stream."""

    async def test_kill_9_of_the_runner_ends_every_stream_within_the_lease_plus_2_s(
        self, trio: list[Instance]
    ) -> None:
        """kill -9 A mid-job: B's and C's streams get error then done failed within 5 s, once."""
        a, b, c = trio
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, LONG_JOB)
            job_id = job["id"]
            on_a = asyncio.create_task(stream(session, a, job_id))
            on_b = asyncio.create_task(stream(session, b, job_id))
            on_c = asyncio.create_task(stream(session, c, job_id))
            await wait_running(session, a, job_id)
            await asyncio.sleep(0.5)
            killed_at = time.time()
            a.process.kill()
            await a.process.wait()
            with contextlib.suppress(aiohttp.ClientError):
                await on_a
            from_b, from_c = await asyncio.gather(on_b, on_c)
            snapshot = await get_json(session, f"{c.url}/api/jobs/{job_id}")
        for record in (from_b, from_c):
            assert_ended_by_lost_runner(record)
            assert record.events[-1].at - killed_at < BOUND_S
            # Live until the crash: the events before it were not a replay at the end.
            assert len(record.events) > 5
        assert from_b.payloads() == from_c.payloads()
        assert snapshot["status"] == "failed"
        assert snapshot["error"].startswith("runner lost")
        assert snapshot["last_event_id"] == from_b.seqs()[-1]

    async def test_a_frozen_runner_that_comes_back_cannot_publish_after_the_end(
        self, trio: list[Instance]
    ) -> None:
        """SIGSTOP A past its lease, then SIGCONT: the log still ends at the sweeper's done."""
        a, b, _ = trio
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, LONG_JOB)
            job_id = job["id"]
            on_b = asyncio.create_task(stream(session, b, job_id))
            await wait_running(session, a, job_id)
            a.process.send_signal(signal.SIGSTOP)
            try:
                ended = await on_b
            finally:
                a.process.send_signal(signal.SIGCONT)
            assert_ended_by_lost_runner(ended)
            await asyncio.sleep(2.0)  # A resumes its job's loop and tries to publish
            replay = await stream(session, b, job_id)
            snapshot = await get_json(session, f"{b.url}/api/jobs/{job_id}")
            health = await get_json(session, f"{a.url}/healthz")
        assert replay.payloads() == ended.payloads()
        assert snapshot["status"] == "failed"
        assert snapshot["error"].startswith("runner lost")
        assert health["active_jobs"] == 0  # A gave the job up instead of running on


class TestQuietJob:
    """The lease renews the job's keys: a job that publishes nothing does not expire."""

    async def test_a_silent_running_job_outlives_the_job_ttl(
        self, redis_server: RedisServer, tmp_path: pathlib.Path
    ) -> None:
        """FLUSHLINE_JOB_TTL=1.5 and a job silent for 4 s: still found (running) on B."""
        quiet: dict[str, Any] = {
            "options": {"steps": 1, "tokens_per_step": 2, "tokens_per_second": 0.1}
        }
        async with contextlib.AsyncExitStack() as stack:
            a, b = await start_instances(
                stack,
                redis_server.url,
                tmp_path,
                FLUSHLINE_RUNNER_LEASE_S="1.5",
                FLUSHLINE_JOB_TTL="1.5",
                FLUSHLINE_PROGRESS_INTERVAL="60",
                FLUSHLINE_CHUNK_INTERVAL="60",
            )
            async with aiohttp.ClientSession() as session:
                job = await create(session, a, quiet)
                await asyncio.sleep(1.0)
                before = await get_json(session, f"{b.url}/api/jobs/{job['id']}")
                await asyncio.sleep(3.0)
                after = await get_json(session, f"{b.url}/api/jobs/{job['id']}")
                # The event log too: its history still answers on B.
                events = await get_json(session, f"{b.url}/api/jobs/{job['id']}/events?wait_s=0")
                async with session.post(f"{b.url}/api/jobs/{job['id']}/cancel") as response:
                    assert response.status == 202
        assert after["status"] == "running"
        assert after["last_event_id"] == before["last_event_id"]  # nothing was published
        assert [e["seq"] for e in events["events"]] == list(range(1, before["last_event_id"] + 1))


def log_lines(log: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON lines an instance logged."""
    lines = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


class TestEndedElsewhere:
    """A runner whose job another instance ended learns it, and stops the job."""

    async def test_a_frozen_runner_of_a_quiet_job_stops_answering_running(
        self, redis_server: RedisServer, tmp_path: pathlib.Path
    ) -> None:
        """A frozen past its lease, B ends A's quiet job: once back, A stops it within 3 s."""
        async with contextlib.AsyncExitStack() as stack:
            a, b = await start_instances(
                stack,
                redis_server.url,
                tmp_path,
                FLUSHLINE_RUNNER_LEASE_S="1.5",
                FLUSHLINE_PROGRESS_INTERVAL="60",
                FLUSHLINE_CHUNK_INTERVAL="60",
            )
            admin = Redis.from_url(redis_server.url)
            stack.push_async_callback(admin.aclose)
            async with aiohttp.ClientSession() as session:
                # 4 tokens at 0.1 per second: nothing published for 10 s at a time.
                job = await create(session, a, QUIET_JOB)
                job_id = job["id"]
                on_b = asyncio.create_task(stream(session, b, job_id))
                await asyncio.sleep(1.0)
                assert (await get_json(session, f"{a.url}/healthz"))["active_jobs"] == 1
                a.process.send_signal(signal.SIGSTOP)
                try:
                    ended = await on_b
                finally:
                    a.process.send_signal(signal.SIGCONT)
                resumed = time.monotonic()
                active = 1
                while active and time.monotonic() - resumed < STOPPED_WITHIN_S:
                    await asyncio.sleep(0.1)
                    active = (await get_json(session, f"{a.url}/healthz"))["active_jobs"]
                await asyncio.sleep(1.0)  # a renewal or two more: the lease stays the sweeper's
                on_a = await get_json(session, f"{a.url}/api/jobs/{job_id}")
                replay = await stream(session, b, job_id)
            lease = await admin.exists(f"flushline:job:{job_id}:lease")
            in_leases = await admin.zscore("flushline:leases", job_id)
        assert_ended_by_lost_runner(ended)
        assert active == 0
        assert on_a["status"] == "failed"
        assert on_a["error"].startswith("runner lost")
        assert replay.payloads() == ended.payloads()  # A published nothing after the end
        assert (lease, in_leases) == (0, None)  # A did not take the lease back
        [finished] = [line for line in log_lines(a.log) if line.get("message") == "job finished"]
        assert (finished["status"], finished["job_id"]) == ("failed", job_id)
        assert finished["error"].startswith("runner lost")
