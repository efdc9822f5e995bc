"""Memory that cannot be exhausted: input bounds, the retained-bytes budget, worst-case RSS.

Over HTTP with the app factory on both buses: a deeply nested ``input`` or ``options`` is
a 400 naming the field (it was a ``RecursionError`` 500 at about 1,000 levels, in the
demo pipeline's ``str(prompt)``); every job this process keeps counts against
``FLUSHLINE_MAX_RETAINED_BYTES`` (running jobs reserve their history cap); the oldest
finished jobs are forgotten first; when only running jobs are left a new job is a 503
with ``Retry-After``. Then the issue's proof, in a real ``flushline serve``: 200 of the
largest jobs the API accepts leave the process's peak RSS under the stated bound, and the
201st is refused or makes room, never growth.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

import aiohttp
import attrs
import orjson
import pytest

from app.bus.redis_client import connect_redis
from app.jobs.budget import JOB_BASE_BYTES, RESULT_BYTES_PER_TOKEN, STEP_BYTES
from app.jobs.limits import MAX_JSON_DEPTH, JsonLimits, measure_json
from app.jobs.manager import JobManager
from app.jobs.pipelines import MAX_JOB_TOKENS, MAX_STEPS
from app.web.keys import MANAGER
from tests.conftest import MakeClient
from tests.support.jobs import (
    FINISHED,
    SLOW_JOB,
    Client,
    create_job,
    expect_json_error,
    wait_finished,
    wait_until,
)
from tests.support.process import (
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)


def nested(levels: int) -> str:
    """JSON of ``levels`` levels of objects, ``{"a":{"a":...1}}`` (the outermost is level 1).

    Built as text: encoders refuse such depths (orjson past 254 levels).
    """
    return '{"a":' * levels + "1" + "}" * levels


def nested_lists(levels: int) -> str:
    """JSON of ``levels`` levels of lists: ``[[[...]]]``."""
    return "[" * levels + "]" * levels


async def post_raw(client: Client, body: str) -> aiohttp.ClientResponse:
    """POST /api/jobs with ``body`` as it is."""
    headers = {"Content-Type": "application/json"}
    return await client.post("/api/jobs", data=body.encode(), headers=headers)


def manager_of(client: Client) -> JobManager:
    """The job manager of the app the client talks to."""
    return client.app[MANAGER]


async def settled(client: Client) -> None:
    """Wait until no job of the app is running (each has also done its end's bookkeeping)."""
    await wait_until(lambda: manager_of(client).active_jobs == 0, 15, "no running job")


class TestInputBounds:
    """``input`` and ``options`` bounded in depth before anything reads them."""

    async def test_a_thousand_levels_of_input_is_400_naming_input(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """The issue's 500 (a prompt nested 1,000 lists deep): now a 400 naming input."""
        client = await make_client(bus_env)
        for value in (nested_lists(1000), nested(1000)):
            response = await post_raw(client, '{"input": {"prompt": ' + value + "}}")
            error = await expect_json_error(response, 400, "nested", field="input")
            assert error["code"] == "invalid_field"

    async def test_deep_options_are_400_naming_options(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """Options one level past the bound: 400 naming options (not the pipeline's check)."""
        client = await make_client(bus_env)
        response = await post_raw(client, '{"options": {"seed": ' + nested(MAX_JSON_DEPTH) + "}}")
        await expect_json_error(response, 400, "nested", field="options")

    async def test_input_at_the_depth_bound_is_accepted(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """``input`` exactly MAX_JSON_DEPTH levels deep is a job like any other."""
        client = await make_client(bus_env)
        job = await create_job(
            client,
            {"steps": 1, "tokens_per_step": 5, "tokens_per_second": 1000},
            input=orjson.loads(nested(MAX_JSON_DEPTH)),
        )
        assert (await wait_finished(client, job["id"]))["status"] == "succeeded"

    def test_size_is_bounded_and_measured(self) -> None:
        """Past max_bytes encoded, 400 naming the field; within, what it costs the budget."""
        limits = JsonLimits(max_bytes=100)
        assert (
            measure_json("input", {"p": "x" * 50}, limits)
            == len(b'{"p":"' + b"x" * 50 + b'"}') + 2 * 64
        )
        with pytest.raises(Exception, match="input: is 113 bytes as JSON; at most 100"):
            measure_json("input", {"p": "x" * 105}, limits)


#: A job that runs for about 50 s unless cancelled, and its bytes before history.
HISTORY_BYTES = 64 * 1024


def reservation(options: dict[str, Any], history_bytes: int = HISTORY_BYTES) -> int:
    """What a running demo job with ``options`` (a step count) and no input counts."""
    limits = JsonLimits()
    fixed = JOB_BASE_BYTES + measure_json("input", {}, limits)
    fixed += measure_json("options", options, limits) + STEP_BYTES * options["steps"]
    tokens = options["steps"] * options["tokens_per_step"]
    return fixed + history_bytes + RESULT_BYTES_PER_TOKEN * tokens


class TestRetainedBudget:
    """Every kept job counts; oldest finished forgotten first; 503 when only running remain."""

    async def test_only_running_jobs_left_a_new_job_is_503(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """Three running jobs fill the budget: the fourth is 503 + Retry-After, counted nowhere;
        once one has ended (small), a new job fits again."""
        each = reservation(SLOW_JOB)
        budget = 3 * each + each // 2
        client = await make_client(
            {
                **bus_env,
                "FLUSHLINE_MAX_HISTORY_BYTES": str(HISTORY_BYTES),
                "FLUSHLINE_MAX_RETAINED_BYTES": str(budget),
            }
        )
        jobs = [await create_job(client, SLOW_JOB) for _ in range(3)]
        assert manager_of(client).retained_bytes == 3 * each
        response = await client.post("/api/jobs", json={"options": SLOW_JOB})
        error = await expect_json_error(response, 503)
        assert error["code"] == "at_capacity"
        assert int(response.headers["Retry-After"]) > 0
        assert manager_of(client).retained_bytes == 3 * each
        for job in jobs:  # still there: running jobs are never forgotten
            assert (await client.get(f"/api/jobs/{job['id']}")).status == 200
        assert (await client.post(f"/api/jobs/{jobs[0]['id']}/cancel")).status == 202
        await create_job(client, SLOW_JOB)
        assert manager_of(client).retained_bytes <= budget
        for job in jobs[1:]:
            assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202

    async def test_the_oldest_finished_jobs_are_forgotten_first(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """Jobs larger than their reservation, one after another: the kept ones are always
        the newest, the rest 404, and the retained bytes never pass the budget."""
        budget = 256 * 1024
        client = await make_client(
            {
                **bus_env,
                "FLUSHLINE_MAX_HISTORY_BYTES": str(16 * 1024),
                "FLUSHLINE_MAX_RETAINED_BYTES": str(budget),
            }
        )
        # About 18 KB of text: history past its cap, and a result as large again.
        options = {"steps": 1, "tokens_per_step": 3000, "tokens_per_second": 100_000}
        ids: list[str] = []
        for _ in range(10):
            job = await create_job(client, options)
            ids.append(job["id"])
            assert (await wait_finished(client, job["id"]))["status"] == "succeeded"
            await settled(client)
            assert manager_of(client).retained_bytes <= budget
        kept = [(await client.get(f"/api/jobs/{job_id}")).status == 200 for job_id in ids]
        assert kept == sorted(kept), kept  # forgotten ones first, kept ones after
        assert 2 <= kept.count(True) < len(ids), kept
        listed = await (await client.get("/api/jobs?limit=1000")).json()
        mine = [job["id"] for job in listed["jobs"] if job["id"] in ids]
        assert mine == [job_id for job_id, k in zip(ids, kept, strict=True) if k][::-1]

    async def test_expired_jobs_stop_counting(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """Past the job TTL a finished job counts no more (with Redis too, whose keys expire
        by themselves): the count cannot leak."""
        client = await make_client(bus_env)
        job = await create_job(
            client, {"steps": 1, "tokens_per_step": 5, "tokens_per_second": 1000}
        )
        await wait_finished(client, job["id"])
        await settled(client)
        manager = manager_of(client)
        assert manager.retained_bytes > 0
        await manager.expire(now=time.time() + manager.job_ttl_s - 60)
        assert manager.retained_bytes > 0
        await manager.expire(now=time.time() + manager.job_ttl_s + 1)
        assert manager.retained_bytes == 0

    async def test_no_finished_job_is_forgotten_for_a_job_that_is_refused(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """When running jobs alone leave no room, the 503 comes first: finished jobs stay."""
        each = reservation(SLOW_JOB)
        client = await make_client(
            {
                **bus_env,
                "FLUSHLINE_MAX_HISTORY_BYTES": str(HISTORY_BYTES),
                "FLUSHLINE_MAX_RETAINED_BYTES": str(2 * each + each // 2),
            }
        )
        done = await create_job(
            client, {"steps": 1, "tokens_per_step": 5, "tokens_per_second": 1000}
        )
        await wait_finished(client, done["id"])
        await settled(client)
        running = [await create_job(client, SLOW_JOB) for _ in range(2)]
        response = await client.post("/api/jobs", json={"options": SLOW_JOB})
        assert (await expect_json_error(response, 503))["code"] == "at_capacity"
        assert (await client.get(f"/api/jobs/{done['id']}")).status == 200
        for job in running:
            snapshot = await (await client.post(f"/api/jobs/{job['id']}/cancel")).json()
            assert snapshot["status"] in FINISHED


# --- the proof: 200 maximum-size jobs in a real process --------------------------

#: The largest job the API accepts: every token the demo allows, produced as fast as it
#: allows, and an input filling the request body with the JSON that costs the most memory
#: per byte (empty lists: 3 bytes of JSON, a 56-byte object each).
MAX_OPTIONS: dict[str, Any] = {
    "steps": MAX_STEPS,
    "tokens_per_step": MAX_JOB_TOKENS // MAX_STEPS,
    "tokens_per_second": 100_000,
}
BODY_LIMIT = 64 * 1024
RSS_HISTORY_BYTES = 16 * 1024
RSS_RETAINED_BYTES = 16 * 1024 * 1024
#: The stated bound: RSS grows by at most RSS_FACTOR x FLUSHLINE_MAX_RETAINED_BYTES +
#: RSS_SLACK_BYTES (interpreter arenas, requests and encodings in flight). Measured on
#: this machine (2 cores): +23 MiB at a 16 MiB budget, +40 MiB at 32 MiB; +315 MiB for
#: the same 200 jobs with the budget effectively off (1 GiB).
RSS_FACTOR = 1.25
RSS_SLACK_BYTES = 16 * 1024 * 1024
#: With Redis, what the Redis client holds on top: its connections' read buffers and
#: parsers, and the snapshots and event frames in flight to and from Redis (the idle
#: process is already 7 MiB larger). Measured peaks: +26.9 MiB (200 jobs), +31.4 MiB
#: (60 jobs) against the memory bus's +21.5 to +25 MiB.
REDIS_CLIENT_SLACK_BYTES = 8 * 1024 * 1024
#: 200 jobs, as the issue asks. With Redis every event also goes through redis-server on
#: the same two cores: the same 200 take about a minute here (+26.9 MiB, within the same
#: bound), so the suite's variant runs 60 (90 MiB of inputs alone were they all kept).
RSS_JOBS = {"memory": 200, "redis": 60}
#: Jobs that run to their end (3.5 s of CPU alone), so a result is counted too; the others
#: are cancelled once their history has passed its cap (their input is most of them).
COMPLETED_JOBS = 1
WORKERS = 4


def max_body() -> bytes:
    """The largest POST /api/jobs body within BODY_LIMIT: max options, a list-heavy input."""
    head = orjson.dumps({"options": MAX_OPTIONS, "input": {"prompt": "hello", "data": []}})
    room = BODY_LIMIT - len(head) - 16
    data = ",".join(["[]"] * (room // 3))
    body = head[:-3] + data.encode() + b"]}}"
    assert len(body) <= BODY_LIMIT
    orjson.loads(body)
    return body


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``field`` of /proc/<pid>/status in KiB (VmRSS now, VmHWM the peak)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


#: Events after which a job's history has passed RSS_HISTORY_BYTES (about 700 bytes each).
FILL_EVENTS = 30
POLL_S = 0.02
#: Pause before a 503 is retried (its Retry-After, 5 s, would make the test long).
RETRY_S = 0.5
JOB_TIMEOUT_S = 60.0


@attrs.define
class Load:
    """What the load saw: jobs accepted, 503s answered (and retried)."""

    accepted: list[str] = attrs.Factory(list)
    refused: int = 0
    #: Jobs found forgotten while the load still polled them (only ended ones can be).
    forgotten: int = 0


async def run_max_job(
    session: aiohttp.ClientSession, base: str, body: bytes, load: Load, *, complete: bool
) -> str:
    """Create one maximum-size job (retrying its 503s); let it fill its history, or end."""
    headers = {"Content-Type": "application/json"}
    while True:
        async with session.post(f"{base}/api/jobs", data=body, headers=headers) as response:
            if response.status == 503:
                assert int(response.headers["Retry-After"]) > 0
                load.refused += 1
                await asyncio.sleep(RETRY_S)
                continue
            assert response.status == 201, await response.text()
            job_id: str = (await response.json())["id"]
            break
    load.accepted.append(job_id)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        async with session.get(f"{base}/api/jobs/{job_id}") as response:
            if response.status == 404:  # ended, and already forgotten to make room
                load.forgotten += 1
                return job_id
            assert response.status == 200, await response.text()
            snapshot = await response.json()
        if snapshot["status"] in FINISHED:
            return job_id
        if not complete and snapshot["last_event_id"] >= FILL_EVENTS:
            async with session.post(f"{base}/api/jobs/{job_id}/cancel") as response:
                # 404: it ended meanwhile and was forgotten already.
                assert response.status in (202, 404, 409), await response.text()
            return job_id
        assert time.monotonic() < deadline, f"job {job_id} still {snapshot['status']}"
        await asyncio.sleep(POLL_S)


async def listed_ids(session: aiohttp.ClientSession, base: str, mine: set[str]) -> list[str]:
    """The ids of the kept jobs among ``mine``, one ``GET`` each.

    Not one listing: a page of 1,000 kept jobs (results of a megabyte) would itself
    hold megabytes while it is encoded, and a shared Redis has other tests' jobs too.
    """
    kept = []
    for job_id in sorted(mine):
        async with session.get(f"{base}/api/jobs/{job_id}") as response:
            assert response.status in (200, 404), await response.text()
            if response.status == 200:
                kept.append(job_id)
    return kept


async def used_memory(redis_url: str | None) -> int:
    """Redis's ``used_memory`` (bytes); 0 without Redis."""
    if redis_url is None:
        return 0
    client = connect_redis(redis_url)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


def cancelled_job_bytes(body: bytes) -> int:
    """What one cancelled maximum-size job still counts (no result; a full history)."""
    request = orjson.loads(body)
    limits = JsonLimits(max_bytes=BODY_LIMIT)
    fixed = JOB_BASE_BYTES + STEP_BYTES * MAX_STEPS
    fixed += measure_json("input", request["input"], limits)
    return fixed + measure_json("options", request["options"], limits)


class TestWorstCaseRss:
    """The issue's proof, in a ``flushline serve`` process."""

    async def test_200_maximum_size_jobs_stay_under_the_rss_bound(
        self, tmp_path: pathlib.Path, bus_env: dict[str, str]
    ) -> None:
        """200 of the largest jobs: peak RSS (and Redis's kept memory) grow by at most
        RSS_FACTOR x the budget + RSS_SLACK; the 201st is a 503 or makes room."""
        script = require_flushline_script()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = clean_env(
            **bus_env,
            FLUSHLINE_MAX_BODY_BYTES=str(BODY_LIMIT),
            FLUSHLINE_MAX_HISTORY_BYTES=str(RSS_HISTORY_BYTES),
            FLUSHLINE_MAX_RETAINED_BYTES=str(RSS_RETAINED_BYTES),
            FLUSHLINE_LOG_FORMAT="json",
        )
        argv = [script, "serve", "--host", "127.0.0.1", "--port", str(port)]
        body = max_body()
        slack = RSS_SLACK_BYTES + (
            REDIS_CLIENT_SLACK_BYTES if "FLUSHLINE_REDIS_URL" in bus_env else 0
        )
        bound_kib = int(RSS_FACTOR * RSS_RETAINED_BYTES + slack) // 1024
        redis_url = bus_env.get("FLUSHLINE_REDIS_URL")
        log = tmp_path / "serve.log"
        async with server_process(argv, env, log) as process, aiohttp.ClientSession() as session:
            await wait_accepting(process, port)
            # Warm up (lazy imports, first allocations) with one small job, then measure.
            small = orjson.dumps({"options": {"steps": 1, "tokens_per_step": 5}})
            await run_max_job(session, base, small, Load(), complete=True)
            idle_kib = rss_kib(process.pid)
            redis_idle = await used_memory(redis_url)
            load = Load()
            queue: asyncio.Queue[bool] = asyncio.Queue()
            jobs = RSS_JOBS["redis" if redis_url else "memory"]
            for i in range(jobs):
                queue.put_nowait(i < COMPLETED_JOBS)

            async def worker() -> None:
                while not queue.empty():
                    await run_max_job(session, base, body, load, complete=queue.get_nowait())

            await asyncio.gather(*(worker() for _ in range(WORKERS)))
            assert len(load.accepted) == jobs
            before = await listed_ids(session, base, set(load.accepted))
            # The 201st: a 503, or accepted within the budget (older jobs forgotten).
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{base}/api/jobs", data=body, headers=headers) as response:
                assert response.status in (201, 503), await response.text()
                if response.status == 503:
                    assert int(response.headers["Retry-After"]) > 0
                else:
                    extra = (await response.json())["id"]
                    load.accepted.append(extra)
                    async with session.post(f"{base}/api/jobs/{extra}/cancel") as cancelled:
                        assert cancelled.status in (202, 409)
            after = await listed_ids(session, base, set(load.accepted))
            peak_kib = rss_kib(process.pid, "VmHWM")
            redis_growth = await used_memory(redis_url) - redis_idle
            growth_kib = peak_kib - idle_kib
            print(
                f"{jobs} jobs: RSS idle {idle_kib} KiB, peak {peak_kib} KiB:"
                f" +{growth_kib / 1024:.1f} MiB (bound +{bound_kib / 1024:.0f} MiB);"
                f" Redis +{redis_growth >> 10} KiB;"
                f" jobs kept {len(before)} then {len(after)}; 503s retried {load.refused}"
            )
            assert growth_kib <= bound_kib, read_log(log)[-2000:]
            assert redis_growth <= bound_kib * 1024
        # What is kept fits the budget: most of the 200 were forgotten.
        most = RSS_RETAINED_BYTES // cancelled_job_bytes(body) + 1
        assert len(before) <= most
        assert len(after) <= most
