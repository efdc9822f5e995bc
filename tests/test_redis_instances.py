"""Several ``flushline serve`` processes sharing one Redis (FLUSHLINE_BUS=redis).

Two real service processes, A and B, on one throw-away redis-server: whatever instance a
request lands on, it sees the same jobs, the same events in the same order, and resumes
exactly where a stream on the other instance was cut. Also the start-up failures of the
Redis settings, through the real command.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest

from tests.support.process import (
    clean_env,
    free_port,
    require_flushline_script,
    run_cli,
    server_process,
    wait_accepting,
)
from tests.support.redis import RedisServer, require_redis_server, run_redis
from tests.support.sse_client import StreamRecord, read_stream

#: About 3 s of events: 3 steps x 60 tokens at 60 tokens/s, small chunks every 0.3 s.
RUNNING_JOB: dict[str, Any] = {
    "strategy": "frequency",
    "options": {"steps": 3, "tokens_per_step": 60, "tokens_per_second": 60, "seed": 3},
}
STREAM_TIMEOUT_S = 30.0


@attrs.frozen
class Instance:
    """One running ``flushline serve``."""

    name: str
    url: str
    log: pathlib.Path
    process: asyncio.subprocess.Process


async def start_instances(
    stack: contextlib.AsyncExitStack,
    redis_url: str,
    tmp_path: pathlib.Path,
    names: str = "AB",
    **env: str,
) -> list[Instance]:
    """One ``flushline serve`` per letter of ``names`` on ``redis_url``, killed with ``stack``."""
    script = require_flushline_script()
    environ = clean_env(
        FLUSHLINE_BUS="redis", FLUSHLINE_REDIS_URL=redis_url, FLUSHLINE_LOG_FORMAT="json", **env
    )
    started: list[Instance] = []
    for name in names:
        port = free_port()
        log = tmp_path / f"instance-{name}.log"
        argv = [script, "serve", "--host", "127.0.0.1", "--port", str(port)]
        process = await stack.enter_async_context(server_process(argv, environ, log))
        await wait_accepting(process, port)
        started.append(Instance(name, f"http://127.0.0.1:{port}", log, process))
    return started


@pytest.fixture
async def instances(
    redis_server: RedisServer, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[Instance, Instance]]:
    """Instances A and B: two ``flushline serve`` processes on the session's Redis."""
    async with contextlib.AsyncExitStack() as stack:
        a, b = await start_instances(stack, redis_server.url, tmp_path)
        yield a, b


async def create(session: aiohttp.ClientSession, on: Instance, body: dict[str, Any]) -> Any:
    async with session.post(f"{on.url}/api/jobs", json=body) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def stream(
    session: aiohttp.ClientSession,
    on: Instance,
    job_id: str,
    *,
    last_event_id: int | None = None,
    stop_after: int | None = None,
) -> StreamRecord:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    return await read_stream(
        session,
        f"{on.url}/api/jobs/{job_id}/stream?proxy_buffer=0",
        headers=headers,
        stop_after=stop_after,
        timeout_s=STREAM_TIMEOUT_S,
    )


def assert_whole_log(payloads: list[dict[str, Any]], job_id: str) -> None:
    """seq 1..n once each and in order, from job_started to a succeeded done."""
    assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
    assert all(p["job_id"] == job_id for p in payloads)
    assert payloads[0]["type"] == "job_started"
    assert payloads[-1]["type"] == "done"
    assert payloads[-1]["status"] == "succeeded"


class TestTwoInstances:
    """A job belongs to the service, not to the instance that created it."""

    async def test_job_created_on_a_streams_whole_and_in_order_from_b(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """B streams A's running job live: every event once, in order, the same bytes as A."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, RUNNING_JOB)
            from_b = await stream(session, b, job["id"])
            assert from_b.status == 200
            assert_whole_log(from_b.payloads(), job["id"])
            # Live, not a replay after the end: the ~3 s job's events arrived over seconds.
            assert from_b.events[-1].at - from_b.events[0].at > 1.0
            assert len(from_b.events) > 10
            replay_on_a = await stream(session, a, job["id"])
        assert [e.message.data for e in from_b.events] == [
            e.message.data for e in replay_on_a.events
        ]

    async def test_stream_cut_on_a_resumes_on_b_without_gap_or_duplicate(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """Cut after 5 events on A, resumed with Last-Event-ID on B: exactly the rest."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, RUNNING_JOB)
            first = await stream(session, a, job["id"], stop_after=5)
            seen = first.seqs()
            assert seen == [1, 2, 3, 4, 5]
            status = await get_json(session, f"{b.url}/api/jobs/{job['id']}")
            assert status["status"] == "running"  # the resume lands while the job runs
            rest = await stream(session, b, job["id"], last_event_id=seen[-1])
            assert rest.status == 200
            whole = first.payloads()[:5] + rest.payloads()
            assert_whole_log(whole, job["id"])
            replay = await stream(session, a, job["id"])
        assert whole == replay.payloads()

    async def test_b_lists_and_reads_a_job_created_on_a_at_once(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """A job created on A is in B's GET /api/jobs and GET /api/jobs/{id} at once, alike."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, RUNNING_JOB)
            listed = await get_json(session, f"{b.url}/api/jobs?limit=1000")
            assert job["id"] in [j["id"] for j in listed["jobs"]]
            on_b = await get_json(session, f"{b.url}/api/jobs/{job['id']}")
            assert on_b["id"] == job["id"]
            assert on_b["created_at"] == job["created_at"]
            await stream(session, b, job["id"])  # until done
            finished_a = await get_json(session, f"{a.url}/api/jobs/{job['id']}")
            finished_b = await get_json(session, f"{b.url}/api/jobs/{job['id']}")
            assert finished_a == finished_b
            assert finished_b["status"] == "succeeded"
            succeeded_b = await get_json(session, f"{b.url}/api/jobs?status=succeeded&limit=1000")
            assert job["id"] in [j["id"] for j in succeeded_b["jobs"]]

    async def test_finished_job_ends_on_b_as_on_a(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """On B, A's finished job: 204 at its last event, 400 past it, the rest after a seq."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, RUNNING_JOB)
            whole = (await stream(session, a, job["id"])).payloads()
            last = whole[-1]["seq"]
            at_end = await stream(session, b, job["id"], last_event_id=last)
            assert at_end.status == 204
            past = await stream(session, b, job["id"], last_event_id=last + 1)
            assert past.status == 400
            tail = await stream(session, b, job["id"], last_event_id=last - 3)
        assert tail.status == 200
        assert tail.payloads() == whole[-3:]

    async def test_a_burst_of_streams_on_b_is_served_not_refused(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """400 streams of A's job opened at once on B all answer 200 (no pool exhaustion)."""
        a, b = instances
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            job = await create(session, a, RUNNING_JOB)
            records = await asyncio.gather(
                *(stream(session, b, job["id"], stop_after=1) for _ in range(400))
            )
        assert sorted({record.status for record in records}) == [200], [
            record.raw[:200] for record in records if record.status != 200
        ][:3]
        assert all(record.payloads()[0]["seq"] == 1 for record in records)

    async def test_events_long_polled_from_b(self, instances: tuple[Instance, Instance]) -> None:
        """Long-polling A's job on B returns its events in order until done."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, RUNNING_JOB)
            after, seqs, done = 0, [], False
            async with asyncio.timeout(STREAM_TIMEOUT_S):
                while not done:
                    answer = await get_json(
                        session, f"{b.url}/api/jobs/{job['id']}/events?after={after}&wait_s=5"
                    )
                    seqs += [e["seq"] for e in answer["events"]]
                    after, done = answer["last_event_id"], answer["done"]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) > 10


#: About 8 s of events: long enough that a cancel always lands while it runs.
LONG_JOB: dict[str, Any] = {
    "strategy": "frequency",
    "options": {"steps": 4, "tokens_per_step": 120, "tokens_per_second": 60, "seed": 5},
}


async def wait_running(session: aiohttp.ClientSession, on: Instance, job_id: str) -> None:
    """Wait until the job has published its first events (it is running, not queued)."""
    async with asyncio.timeout(STREAM_TIMEOUT_S):
        while True:
            job = await get_json(session, f"{on.url}/api/jobs/{job_id}")
            if job["last_event_id"] >= 3:
                return
            await asyncio.sleep(0.05)


class TestCancelAnywhere:
    """A cancel lands on whichever instance; the runner ends the job at once."""

    async def test_cancel_on_b_stops_a_job_running_on_a_within_a_second(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """Cancel on B: 202 with the cancelled job; A's and B's streams end with done cancelled."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, LONG_JOB)
            on_a = asyncio.create_task(stream(session, a, job["id"]))
            on_b = asyncio.create_task(stream(session, b, job["id"]))
            await wait_running(session, a, job["id"])
            asked = time.time()
            async with session.post(f"{b.url}/api/jobs/{job['id']}/cancel") as response:
                assert response.status == 202, await response.text()
                answer = await response.json()
            assert answer["status"] == "cancelled"
            records = await asyncio.gather(on_a, on_b)
            again = await session.post(f"{a.url}/api/jobs/{job['id']}/cancel")
            assert again.status == 409
            assert (await again.json())["error"]["code"] == "job_finished"
        for record in records:
            done = record.events[-1]
            assert done.data["type"] == "done"
            assert done.data["status"] == "cancelled"
            assert done.data["ts"] - asked < 1.0  # the runner ended it within a second
            assert record.seqs() == list(range(1, len(record.events) + 1))
        assert records[0].payloads() == records[1].payloads()

    async def test_concurrent_cancels_on_both_instances_accept_exactly_one(
        self, instances: tuple[Instance, Instance]
    ) -> None:
        """Three cancels on A and three on B at once: one 202, five 409; the job ends cancelled."""
        a, b = instances
        async with aiohttp.ClientSession() as session:
            job = await create(session, a, LONG_JOB)
            await wait_running(session, a, job["id"])

            async def cancel(on: Instance) -> int:
                async with session.post(f"{on.url}/api/jobs/{job['id']}/cancel") as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(cancel(on) for on in (a, b, a, b, a, b)))
            assert sorted(statuses) == [202, 409, 409, 409, 409, 409]
            final = (await stream(session, b, job["id"])).payloads()[-1]
        assert (final["type"], final["status"]) == ("done", "cancelled")


async def wait_exit(instance: Instance, timeout_s: float) -> int:
    """The instance's exit status; fails if it still runs after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await instance.process.wait()
    except TimeoutError:
        raise AssertionError(f"{instance.name} still runs {timeout_s} s after SIGTERM") from None


class TestSigterm:
    """SIGTERM drains an instance: no new job, running ones finish or fail `shutdown`."""

    async def test_job_past_the_grace_fails_with_shutdown_and_streams_move_on(
        self, redis_server: RedisServer, tmp_path: pathlib.Path
    ) -> None:
        """Grace 2 s, an 8 s job on A: A's stream hands off, B's ends error/done shutdown."""
        grace_s = 2.0
        async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
            a, b = await start_instances(
                stack, redis_server.url, tmp_path, FLUSHLINE_SHUTDOWN_GRACE_S=str(grace_s)
            )
            job = await create(session, a, LONG_JOB)
            on_a = asyncio.create_task(stream(session, a, job["id"]))
            on_b = asyncio.create_task(stream(session, b, job["id"]))
            await wait_running(session, a, job["id"])
            sent_at = time.monotonic()
            a.process.send_signal(signal.SIGTERM)
            from_a = await on_a
            handed_off_in_s = time.monotonic() - sent_at
            async with session.post(f"{a.url}/api/jobs", json=LONG_JOB) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"].isdigit()
                assert (await refused.json())["error"]["code"] == "draining"
            # The browser's reconnect, landing on B, resumes where A's stream stopped (from
            # the start if the SIGTERM came before A's stream had written an event).
            last_on_a = from_a.seqs()[-1] if from_a.seqs() else 0
            resumed = await stream(session, b, job["id"], last_event_id=last_on_a)
            from_b = await on_b
            assert await wait_exit(a, grace_s + 2.0) == 0
        assert handed_off_in_s < 1.0
        assert from_a.raw.endswith(b"retry: 500\n\n")
        assert "done" not in [p["type"] for p in from_a.payloads()]
        payloads = from_b.payloads()
        assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
        assert [(p["type"], p.get("message")) for p in payloads[-2:]] == [
            ("error", "shutdown"),
            ("done", None),
        ]
        assert (payloads[-1]["status"], payloads[-1]["error"]) == ("failed", "shutdown")
        assert from_a.payloads() + resumed.payloads() == payloads

    async def test_job_within_the_grace_finishes(
        self, redis_server: RedisServer, tmp_path: pathlib.Path
    ) -> None:
        """Grace 8 s, a 3 s job on A: B's stream sees it succeed; A then exits 0 at once."""
        async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
            a, b = await start_instances(stack, redis_server.url, tmp_path)
            job = await create(session, a, RUNNING_JOB)
            on_b = asyncio.create_task(stream(session, b, job["id"]))
            await wait_running(session, a, job["id"])
            a.process.send_signal(signal.SIGTERM)
            from_b = await on_b
            ended_at = time.monotonic()
            assert await wait_exit(a, 8.0 + 2.0) == 0
            exited_in_s = time.monotonic() - ended_at
        assert_whole_log(from_b.payloads(), job["id"])
        assert exited_in_s < 2.0  # it waited for the job, not for the whole grace


class TestRedisLost:
    """Redis goes away under a running service and comes back."""

    async def test_503_json_while_redis_is_down_then_recovers_by_itself(
        self, tmp_path: pathlib.Path
    ) -> None:
        """Redis stopped: JSON 503s (/readyz too); restarted: ready again by itself, a job runs."""
        binary = require_redis_server()
        with run_redis(tmp_path / "redis", binary=binary) as redis:
            async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
                (a,) = await start_instances(stack, redis.url, tmp_path, "A")
                job = await create(session, a, RUNNING_JOB)
                await stream(session, a, job["id"])
                redis.stop()
                for method, path in [
                    ("GET", f"/api/jobs/{job['id']}"),
                    ("GET", "/api/jobs"),
                    ("POST", "/api/jobs"),
                    ("GET", "/readyz"),
                ]:
                    async with session.request(method, a.url + path, json={}) as response:
                        body = await response.json()
                        assert response.status == 503, (path, body)
                        assert body["error"]["code"] == "backend_unavailable", (path, body)
                        assert response.headers["Retry-After"].isdigit()
                redis.start()
                async with asyncio.timeout(STREAM_TIMEOUT_S):
                    while True:
                        async with session.get(f"{a.url}/readyz") as response:
                            if response.status == 200:
                                break
                        await asyncio.sleep(0.2)
                async with session.get(f"{a.url}/api/jobs?limit=1") as response:
                    assert response.status == 200
                again = await create(session, a, RUNNING_JOB)
                record = await stream(session, a, again["id"])
        assert_whole_log(record.payloads(), again["id"])


class TestStartup:
    """The Redis settings' failures stop ``flushline serve`` with one line and status 2."""

    async def test_unreachable_redis_exits_2_naming_the_variable(self) -> None:
        """Nothing listening at FLUSHLINE_REDIS_URL: one line naming it, exit status 2."""
        url = f"redis://127.0.0.1:{free_port()}/0"
        env = clean_env(
            FLUSHLINE_BUS="redis", FLUSHLINE_REDIS_URL=url, FLUSHLINE_LOG_FORMAT="console"
        )
        code, out, err = await run_cli("serve", "--port", str(free_port()), env=env)
        assert code == 2, out + err
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"flushline: cannot reach Redis at {url} (FLUSHLINE_REDIS_URL)")

    async def test_password_is_not_printed(self) -> None:
        """The start-up line shows the URL with its password hidden."""
        url = f"redis://app:s3cret@127.0.0.1:{free_port()}/0"
        env = clean_env(
            FLUSHLINE_BUS="redis", FLUSHLINE_REDIS_URL=url, FLUSHLINE_LOG_FORMAT="console"
        )
        code, out, err = await run_cli("serve", "--port", str(free_port()), env=env)
        assert code == 2
        assert "s3cret" not in out + err
        assert "redis://app:***@127.0.0.1" in err

    @pytest.mark.parametrize("bad", ["http://127.0.0.1:6379", "redis://host:99999/0", "127.0.0.1"])
    async def test_bad_url_exits_2_naming_the_variable(self, bad: str) -> None:
        """A FLUSHLINE_REDIS_URL that is not a Redis URL stops start-up in one line."""
        env = clean_env(FLUSHLINE_BUS="redis", FLUSHLINE_REDIS_URL=bad)
        code, out, err = await run_cli("serve", "--port", str(free_port()), env=env)
        assert code == 2
        assert err.strip().splitlines() == [
            f"flushline: invalid FLUSHLINE_REDIS_URL={bad!r}: a Redis URL like "
            "redis://host:6379/0 (also rediss:// for TLS, unix:///path/to/redis.sock)"
        ]
        assert out == ""
