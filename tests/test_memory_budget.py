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

from typing import Any

import aiohttp
import orjson
import pytest

from app.jobs.limits import MAX_JSON_DEPTH, JsonLimits, measure_json
from app.jobs.manager import JOB_BASE_BYTES, STEP_BYTES, JobManager
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
from tests.support.redis import RedisServer


@pytest.fixture(params=["memory", "redis"])
def bus_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The settings of the parametrised bus (Redis: the session's throw-away server)."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": server.url}


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


def reservation(options: dict[str, Any], steps: int, history_bytes: int = HISTORY_BYTES) -> int:
    """What a running job with ``options`` and no input counts against the budget."""
    limits = JsonLimits()
    fixed = JOB_BASE_BYTES + measure_json("input", {}, limits)
    fixed += measure_json("options", options, limits) + STEP_BYTES * steps
    return fixed + history_bytes


class TestRetainedBudget:
    """Every kept job counts; oldest finished forgotten first; 503 when only running remain."""

    async def test_only_running_jobs_left_a_new_job_is_503(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """Three running jobs fill the budget: the fourth is 503 + Retry-After, counted nowhere;
        once one has ended (small), a new job fits again."""
        each = reservation(SLOW_JOB, 1)
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

    async def test_no_finished_job_is_forgotten_for_a_job_that_is_refused(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """When running jobs alone leave no room, the 503 comes first: finished jobs stay."""
        each = reservation(SLOW_JOB, 1)
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
