"""Redis lost under a running job, then back: the job buffers its events and loses none.

Real processes: two ``flushline serve`` instances on a ``redis-server`` that keeps its data
across a restart (append-only file, as a restarted or failed-over Redis does). Redis is
stopped while A runs a job and started again a couple of seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from typing import Any

import aiohttp

from app.jobs.manager import REDIS_LOST_REASON
from tests.support.process import json_lines, read_log
from tests.support.redis import require_redis_server, run_redis
from tests.test_redis_instances import (
    RUNNING_JOB,
    STREAM_TIMEOUT_S,
    assert_whole_log,
    create,
    get_json,
    start_instances,
    stream,
)

#: About 6 s of events: 3 steps x 120 tokens at 60 tokens/s, small chunks every 0.3 s.
LONG_JOB: dict[str, Any] = {
    "strategy": "frequency",
    "options": {"steps": 3, "tokens_per_step": 120, "tokens_per_second": 60, "seed": 5},
}
#: How long Redis stays away (well under FLUSHLINE_REDIS_GRACE_S and the job's length).
OUTAGE_S = 2.0


async def wait_finished(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Poll the job's snapshot until it has finished (503s while Redis is away are skipped)."""
    async with asyncio.timeout(STREAM_TIMEOUT_S):
        while True:
            async with session.get(url) as response:
                if response.status == 200:
                    job: dict[str, Any] = await response.json()
                    if job["status"] not in ("queued", "running"):
                        return job
            await asyncio.sleep(0.2)


class TestRedisLostUnderARunningJob:
    """A job outlives a short Redis outage with its whole event log."""

    async def test_job_buffers_through_a_redis_restart_and_its_log_has_no_gap(
        self, tmp_path: pathlib.Path
    ) -> None:
        """Redis restarted mid-job: 503s meanwhile, B's stream ends with retry:, log 1..N whole."""
        binary = require_redis_server()
        with run_redis(tmp_path / "redis", binary=binary, persistent=True) as redis:
            async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
                a, b = await start_instances(stack, redis.url, tmp_path)
                job = await create(session, a, LONG_JOB)
                job_url = f"{a.url}/api/jobs/{job['id']}"
                # B follows the job live; its reader is the one that loses Redis.
                watching = asyncio.create_task(stream(session, b, job["id"]))
                before = await stream(session, a, job["id"], stop_after=3)
                assert len(before.payloads()) == 3

                redis.stop()
                # B needs Redis for A's job (A answers its own running job from memory).
                async with session.get(f"{b.url}/api/jobs/{job['id']}") as response:
                    body = await response.json()
                    assert response.status == 503, body
                    assert body["error"]["code"] == "backend_unavailable"
                async with session.get(f"{b.url}/readyz") as response:
                    assert response.status == 503
                cut = await asyncio.wait_for(watching, STREAM_TIMEOUT_S)
                await asyncio.sleep(OUTAGE_S)
                redis.start()

                finished = await wait_finished(session, job_url)
                assert finished["status"] == "succeeded", finished
                record = await stream(session, a, job["id"])
                on_b = await get_json(session, f"{b.url}/api/jobs/{job['id']}")
            a_log = json_lines(read_log(a.log))

        payloads = record.payloads()
        assert_whole_log(payloads, job["id"])
        # The snapshot followed every event, the buffered ones included.
        assert on_b["status"] == "succeeded"
        assert on_b["last_event_id"] == payloads[-1]["seq"]
        # B's stream did not hang: it ended with a short retry: and a prefix of the log.
        assert cut.status == 200
        assert cut.raw.rstrip().endswith(b"retry: 1000"), cut.raw[-200:]
        assert cut.payloads() == payloads[: len(cut.payloads())]
        assert cut.payloads()[-1]["type"] != "done"
        # The events published during the outage went through the buffer.
        flushed = [
            line for line in a_log if line.get("message") == "redis back; buffered events written"
        ]
        assert len(flushed) == 1, flushed
        assert isinstance(flushed[0]["events"], int)
        assert flushed[0]["events"] > 0

    async def test_job_fails_when_redis_outlasts_the_grace_and_nothing_hangs(
        self, tmp_path: pathlib.Path
    ) -> None:
        """Redis away past the grace (within the lease): the job ends failed saying why."""
        binary = require_redis_server()
        with run_redis(tmp_path / "redis", binary=binary, persistent=True) as redis:
            async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
                a, b = await start_instances(
                    stack,
                    redis.url,
                    tmp_path,
                    FLUSHLINE_REDIS_GRACE_S="1",
                    # Longer than the outage: the runner, not a sweeper, ends the job.
                    FLUSHLINE_RUNNER_LEASE_S="8",
                )
                job = await create(session, a, LONG_JOB)
                before = await stream(session, a, job["id"], stop_after=3)
                assert len(before.payloads()) == 3
                redis.stop()
                await asyncio.sleep(3 * 1.0)  # three graces: the job has given up
                redis.start()
                finished = await wait_finished(session, f"{b.url}/api/jobs/{job['id']}")
                record = await stream(session, b, job["id"])
                # The instance that gave the job up still works.
                again = await create(session, a, RUNNING_JOB)
                again_record = await stream(session, a, again["id"])
            a_log = json_lines(read_log(a.log))

        assert finished["status"] == "failed", finished
        payloads = record.payloads()
        assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
        assert payloads[:3] == before.payloads()
        assert [p["type"] for p in payloads[-2:]] == ["error", "done"]
        assert payloads[-1]["status"] == "failed"
        assert payloads[-1]["error"] == finished["error"] == REDIS_LOST_REASON
        assert payloads[-2]["message"] == REDIS_LOST_REASON
        assert_whole_log(again_record.payloads(), again["id"])
        given_up = [line for line in a_log if line.get("message") == "job events lost with redis"]
        assert len(given_up) == 1, given_up
        assert "Redis unreachable" in str(given_up[0]["reason"])
