"""The REST job API over a real server: snapshots, listing, cancel, failure and every error."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app.web import api
from app.web.keys import MANAGER
from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import (
    FAST_JOB,
    SLOW_JOB,
    Client,
    bus_of,
    create_job,
    expect_json_error,
    get_job,
    stream_job,
    wait_finished,
    wait_for_job,
    wait_until,
)

JOB_STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
STEP_STATUSES = {"pending", "running", "succeeded", "failed", "cancelled"}
_ID = re.compile(r"^[A-Za-z0-9_-]{16,}$")


def parse_utc(value: Any) -> datetime:
    """Parse an ISO 8601 timestamp and assert it is in UTC."""
    assert isinstance(value, str), value
    assert value.endswith(("Z", "+00:00")), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def assert_snapshot_shape(snapshot: dict[str, Any]) -> None:
    """Every field of the contract's job snapshot, with its type."""
    required = {
        "id", "status", "pipeline", "strategy", "progress", "steps", "result", "error",
        "created_at", "started_at", "finished_at", "last_event_id", "links",
    }  # fmt: skip
    assert required <= set(snapshot), sorted(required - set(snapshot))
    assert isinstance(snapshot["id"], str)
    assert _ID.match(snapshot["id"]), snapshot["id"]
    assert snapshot["status"] in JOB_STATUSES
    assert isinstance(snapshot["pipeline"], str)
    assert isinstance(snapshot["strategy"], str)
    assert isinstance(snapshot["progress"], int | float)
    assert 0 <= snapshot["progress"] <= 100
    assert isinstance(snapshot["steps"], list)
    for step in snapshot["steps"]:
        assert set(step) >= {"name", "status", "pct", "tokens"}, step
        assert isinstance(step["name"], str)
        assert step["status"] in STEP_STATUSES
        assert isinstance(step["pct"], int | float)
        assert 0 <= step["pct"] <= 100
        assert isinstance(step["tokens"], int)
    parse_utc(snapshot["created_at"])
    for field in ("started_at", "finished_at"):
        if snapshot[field] is not None:
            parse_utc(snapshot[field])
    assert isinstance(snapshot["last_event_id"], int)
    assert not isinstance(snapshot["last_event_id"], bool)
    job_id = snapshot["id"]
    assert snapshot["links"]["self"] == f"/api/jobs/{job_id}"
    assert snapshot["links"]["stream"] == f"/api/jobs/{job_id}/stream"


class TestCreate:
    """POST /api/jobs."""

    async def test_created_snapshot_has_every_contract_field(self, make_client: MakeClient) -> None:
        """201 with a complete fresh snapshot, a Location header and links to self and stream."""
        client = await make_client({"FLUSHLINE_STRATEGY": "none"})
        before = datetime.now(UTC)
        response = await client.post(
            "/api/jobs", json={"pipeline": "demo", "strategy": "padding", "options": QUICK_JOB}
        )
        assert response.status == 201, await response.text()
        assert response.content_type == "application/json"
        snapshot = await response.json()
        assert_snapshot_shape(snapshot)
        assert response.headers["Location"] == snapshot["links"]["self"]
        assert snapshot["status"] in {"queued", "running"}
        assert snapshot["pipeline"] == "demo"
        assert snapshot["strategy"] == "padding"
        assert snapshot["progress"] == 0
        assert snapshot["result"] is None
        assert snapshot["error"] is None
        assert snapshot["finished_at"] is None
        assert [s["name"] for s in snapshot["steps"]] == ["analyze", "match"]
        for step in snapshot["steps"]:
            assert step["status"] == "pending"
            assert step["pct"] == 0
            assert step["tokens"] == 0
        created = parse_utc(snapshot["created_at"])
        assert before - timedelta(seconds=1) <= created <= datetime.now(UTC) + timedelta(seconds=1)

    async def test_ids_are_unique_and_unguessable(self, client: Client) -> None:
        """Job ids are long random URL-safe strings, not counters."""
        ids = [(await create_job(client, FAST_JOB))["id"] for _ in range(5)]
        assert len(set(ids)) == 5
        for job_id in ids:
            assert _ID.match(job_id), job_id
            assert not job_id.isdigit()
        assert len({job_id[:8] for job_id in ids}) == 5

    @pytest.mark.parametrize("strategy", ["padding", "frequency"])
    async def test_empty_body_uses_defaults(self, make_client: MakeClient, strategy: str) -> None:
        """An empty body runs the demo pipeline (4 default steps) with FLUSHLINE_STRATEGY."""
        client = await make_client({"FLUSHLINE_STRATEGY": strategy})
        for body in (b"", b"{}"):
            response = await client.post("/api/jobs", data=body)
            assert response.status == 201, await response.text()
            snapshot = await response.json()
            assert snapshot["pipeline"] == "demo"
            assert snapshot["strategy"] == strategy
            assert len(snapshot["steps"]) == 4
            await client.post(f"/api/jobs/{snapshot['id']}/cancel")

    async def test_strategy_in_body_overrides_the_default(self, make_client: MakeClient) -> None:
        """A job's "strategy" field wins over FLUSHLINE_STRATEGY, in the snapshot and the stream."""
        client = await make_client({"FLUSHLINE_STRATEGY": "none"})
        job = await create_job(client, FAST_JOB, strategy="combined")
        assert job["strategy"] == "combined"
        record = await stream_job(client, job["id"])
        assert record.payloads()[0]["strategy"] == "combined"

    async def test_named_steps_are_used(self, client: Client) -> None:
        """options.steps as a list of names gives steps with those names, in order."""
        job = await create_job(client, {**FAST_JOB, "steps": ["research", "draft", "review"]})
        assert [s["name"] for s in job["steps"]] == ["research", "draft", "review"]


class TestRead:
    """GET /api/jobs/{id} during and after a job."""

    async def test_snapshot_during_and_after_a_job(self, client: Client) -> None:
        """While running the snapshot shows progress; once succeeded it has result and 100 %."""
        job = await create_job(client, QUICK_JOB)
        running = await wait_for_job(
            client, job["id"], lambda s: s["status"] == "running" and s["last_event_id"] >= 3
        )
        assert_snapshot_shape(running)
        assert running["started_at"] is not None
        assert running["finished_at"] is None
        assert running["result"] is None
        assert running["steps"][0]["status"] == "running"
        assert running["steps"][1]["status"] == "pending"
        assert running["progress"] < 100

        done = await wait_finished(client, job["id"])
        assert_snapshot_shape(done)
        assert done["status"] == "succeeded"
        assert done["progress"] == 100
        assert done["error"] is None
        for step in done["steps"]:
            assert step["status"] == "succeeded"
            assert step["pct"] == 100
            assert step["tokens"] == QUICK_JOB["tokens_per_step"]
        assert isinstance(done["result"], dict)
        assert set(done["result"]["steps"]) == {"analyze", "match"}
        assert all(text for text in done["result"]["steps"].values())
        created = parse_utc(done["created_at"])
        started = parse_utc(done["started_at"])
        finished = parse_utc(done["finished_at"])
        assert created <= started < finished
        assert finished - started >= timedelta(seconds=0.5)

        record = await stream_job(client, job["id"])
        assert done["last_event_id"] == record.seqs()[-1]
        assert done["result"] == record.payloads()[-1]["result"]

    async def test_unknown_job_is_404(self, client: Client) -> None:
        """GET, cancel and stream of an unknown job id answer 404 JSON."""
        await expect_json_error(await client.get("/api/jobs/nope"), 404, "nope")
        await expect_json_error(await client.post("/api/jobs/nope/cancel"), 404, "nope")
        await expect_json_error(await client.get("/api/jobs/nope/stream"), 404, "nope")


class TestList:
    """GET /api/jobs."""

    async def test_newest_first_with_limit_and_status(self, client: Client) -> None:
        """Jobs are listed newest first; ?limit= caps the list and ?status= filters it."""
        done = await create_job(client, FAST_JOB)
        await wait_finished(client, done["id"])
        cancelled = await create_job(client, SLOW_JOB)
        response = await client.post(f"/api/jobs/{cancelled['id']}/cancel")
        assert response.status == 202
        running = await create_job(client, SLOW_JOB)
        await wait_for_job(client, running["id"], lambda s: s["status"] == "running")

        response = await client.get("/api/jobs")
        assert response.status == 200
        listing = await response.json()
        assert set(listing) == {"jobs", "truncated"}
        assert listing["truncated"] is False
        ids = [job["id"] for job in listing["jobs"]]
        assert ids == [running["id"], cancelled["id"], done["id"]]
        for job in listing["jobs"]:
            assert_snapshot_shape(job)

        limited = await (await client.get("/api/jobs?limit=2")).json()
        assert [job["id"] for job in limited["jobs"]] == [running["id"], cancelled["id"]]
        one = await (await client.get("/api/jobs?limit=1")).json()
        assert [job["id"] for job in one["jobs"]] == [running["id"]]

        for status, expected in (
            ("succeeded", [done["id"]]),
            ("cancelled", [cancelled["id"]]),
            ("running", [running["id"]]),
            ("failed", []),
        ):
            filtered = await (await client.get(f"/api/jobs?status={status}")).json()
            assert [job["id"] for job in filtered["jobs"]] == expected, status
            assert all(job["status"] == status for job in filtered["jobs"])

    async def test_a_listing_stops_at_its_byte_cap(
        self, client: Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past MAX_LIST_BODY_BYTES the older jobs are left out and truncated is true."""
        jobs = [await create_job(client, QUICK_JOB) for _ in range(3)]
        one = len(orjson.dumps((await (await client.get("/api/jobs?limit=1")).json())["jobs"][0]))
        monkeypatch.setattr(api, "MAX_LIST_BODY_BYTES", 2 * one + 200)
        listing = await (await client.get("/api/jobs")).json()
        assert listing["truncated"] is True
        assert [job["id"] for job in listing["jobs"]] == [jobs[2]["id"], jobs[1]["id"]]
        monkeypatch.setattr(api, "MAX_LIST_BODY_BYTES", 10)
        newest_only = await (await client.get("/api/jobs")).json()
        assert [job["id"] for job in newest_only["jobs"]] == [jobs[2]["id"]]
        assert newest_only["truncated"] is True

    async def test_empty_list(self, client: Client) -> None:
        """With no jobs the list is empty, not an error."""
        response = await client.get("/api/jobs")
        assert response.status == 200
        assert await response.json() == {"jobs": [], "truncated": False}


class TestCancel:
    """POST /api/jobs/{id}/cancel."""

    async def test_cancel_running_job(self, client: Client) -> None:
        """202 with a cancelled snapshot; the open stream ends with done cancelled."""
        job = await create_job(client, SLOW_JOB)
        stream = asyncio.create_task(stream_job(client, job["id"]))
        await wait_until(lambda: bus_of(client).subscriber_count(job["id"]) == 1, 5)
        await wait_for_job(client, job["id"], lambda s: s["last_event_id"] >= 3)

        response = await client.post(f"/api/jobs/{job['id']}/cancel")
        assert response.status == 202, await response.text()
        snapshot = await response.json()
        assert_snapshot_shape(snapshot)
        assert snapshot["status"] == "cancelled"
        assert snapshot["finished_at"] is not None
        assert [s["status"] for s in snapshot["steps"]] == ["cancelled"]
        assert snapshot["result"] is None

        record = await asyncio.wait_for(stream, 5)
        last = record.payloads()[-1]
        assert last["type"] == "done"
        assert last["status"] == "cancelled"
        assert last["overall_pct"] < 100
        assert record.seqs() == list(range(1, len(record.seqs()) + 1))
        assert (await get_job(client, job["id"]))["status"] == "cancelled"

    async def test_cancel_marks_pending_steps_cancelled(self, client: Client) -> None:
        """Cancelling mid-job marks the running step and every pending step cancelled."""
        job = await create_job(client, {**SLOW_JOB, "steps": 3})
        await wait_for_job(client, job["id"], lambda s: s["status"] == "running")
        response = await client.post(f"/api/jobs/{job['id']}/cancel")
        assert response.status == 202
        snapshot = await get_job(client, job["id"])
        assert snapshot["status"] == "cancelled"
        assert [s["status"] for s in snapshot["steps"]] == ["cancelled"] * 3

    async def test_cancel_finished_job_is_409(self, client: Client) -> None:
        """Cancelling a succeeded job answers 409 and leaves it succeeded."""
        job = await create_job(client, FAST_JOB)
        await wait_finished(client, job["id"])
        error = await expect_json_error(await client.post(f"/api/jobs/{job['id']}/cancel"), 409)
        assert error["status"] == "succeeded"  # how it ended, as the publish API's 409 says
        assert (await get_job(client, job["id"]))["status"] == "succeeded"

    async def test_cancel_twice_is_409(self, client: Client) -> None:
        """A second cancel of an already cancelled job answers 409."""
        job = await create_job(client, SLOW_JOB)
        assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202
        await expect_json_error(await client.post(f"/api/jobs/{job['id']}/cancel"), 409)
        assert (await get_job(client, job["id"]))["status"] == "cancelled"

    async def test_cancel_failed_job_is_409(self, client: Client) -> None:
        """Cancelling a failed job answers 409."""
        job = await create_job(client, {**FAST_JOB, "fail_at_step": 0})
        assert (await wait_finished(client, job["id"]))["status"] == "failed"
        await expect_json_error(await client.post(f"/api/jobs/{job['id']}/cancel"), 409)


class TestFailure:
    """options.fail_at_step exercises the failure path."""

    async def test_failing_step(self, client: Client) -> None:
        """The stream has error then done failed; the snapshot is failed with the error."""
        job = await create_job(client, {**QUICK_JOB, "fail_at_step": 1})
        record = await stream_job(client, job["id"])
        payloads = record.payloads()
        assert [p["type"] for p in payloads[-2:]] == ["error", "done"]
        error, done = payloads[-2:]
        assert error["step"] == "match"
        assert isinstance(error["message"], str)
        assert error["message"]
        assert done["status"] == "failed"
        assert done["error"] == error["message"]
        assert done["overall_pct"] < 100
        assert "result" not in done
        assert [p["type"] for p in payloads].count("step_completed") == 1

        snapshot = await get_job(client, job["id"])
        assert snapshot["status"] == "failed"
        assert snapshot["error"] == error["message"]
        assert snapshot["result"] is None
        assert snapshot["finished_at"] is not None
        assert snapshot["progress"] < 100
        assert [s["status"] for s in snapshot["steps"]] == ["succeeded", "failed"]

    async def test_failing_first_step(self, client: Client) -> None:
        """fail_at_step 0 fails the first step and leaves the later ones pending."""
        job = await create_job(client, {**FAST_JOB, "steps": 2, "fail_at_step": 0})
        snapshot = await wait_finished(client, job["id"])
        assert snapshot["status"] == "failed"
        assert [s["status"] for s in snapshot["steps"]] == ["failed", "pending"]


TPS = "options.tokens_per_second"
#: (test id, body, the error's ``field``, which its message names too).
INVALID_BODIES: list[tuple[str, bytes | dict[str, Any] | list[Any], str]] = [
    ("invalid-json", b'{"pipeline": ', "body"),
    ("array-body", [1, 2], "body"),
    ("string-body", b'"demo"', "body"),
    ("number-body", b"42", "body"),
    ("unknown-field", {"pipline": "demo"}, "pipline"),
    ("unknown-pipeline", {"pipeline": "nope"}, "pipeline"),
    ("pipeline-not-string", {"pipeline": 5}, "pipeline"),
    ("pipeline-empty", {"pipeline": ""}, "pipeline"),
    ("unknown-strategy", {"strategy": "turbo"}, "strategy"),
    ("strategy-not-string", {"strategy": ["none"]}, "strategy"),
    ("input-not-object", {"input": [1]}, "input"),
    ("input-string", {"input": "hello"}, "input"),
    ("options-not-object", {"options": "fast"}, "options"),
    ("options-list", {"options": [1]}, "options"),
    ("steps-zero", {"options": {"steps": 0}}, "options.steps"),
    ("steps-51", {"options": {"steps": 51}}, "options.steps"),
    ("steps-empty-list", {"options": {"steps": []}}, "options.steps"),
    ("steps-empty-name", {"options": {"steps": [""]}}, "options.steps"),
    ("steps-duplicates", {"options": {"steps": ["a", "a"]}}, "options.steps"),
    ("steps-string", {"options": {"steps": "x"}}, "options.steps"),
    ("steps-bool", {"options": {"steps": True}}, "options.steps"),
    ("tokens-per-step-zero", {"options": {"tokens_per_step": 0}}, "options.tokens_per_step"),
    ("tokens-per-step-string", {"options": {"tokens_per_step": "9"}}, "options.tokens_per_step"),
    ("tokens-per-second-zero", {"options": {"tokens_per_second": 0}}, TPS),
    ("tokens-per-second-negative", {"options": {"tokens_per_second": -1}}, TPS),
    ("tokens-per-second-string", {"options": {"tokens_per_second": "fast"}}, TPS),
    ("seed-list", {"options": {"seed": []}}, "options.seed"),
    ("fail-at-step-too-big", {"options": {"steps": 2, "fail_at_step": 2}}, "options.fail_at_step"),
    ("fail-at-step-negative", {"options": {"fail_at_step": -1}}, "options.fail_at_step"),
    ("fail-at-step-string", {"options": {"fail_at_step": "1"}}, "options.fail_at_step"),
    ("unknown-option", {"options": {"speed": 3}}, "options.speed"),
]


class TestBadInput:
    """Every bad input of the contract: the right status and a JSON error naming the field."""

    @pytest.mark.parametrize(
        ("body", "field"),
        [pytest.param(body, field, id=name) for name, body, field in INVALID_BODIES],
    )
    async def test_bad_body_is_400(
        self, client: Client, body: bytes | dict[str, Any] | list[Any], field: str
    ) -> None:
        """A bad POST /api/jobs body is a 400 whose `field` (named in the message) is to blame."""
        if isinstance(body, bytes):
            response = await client.post(
                "/api/jobs", data=body, headers={"Content-Type": "application/json"}
            )
        else:
            response = await client.post("/api/jobs", json=body)
        await expect_json_error(response, 400, field=field)
        assert await (await client.get("/api/jobs")).json() == {"jobs": [], "truncated": False}

    @pytest.mark.parametrize(
        "query",
        ["limit=0", "limit=-1", "limit=abc", "limit=1.5", "limit=", "limit=1001", "limit=99999999"],
    )
    async def test_bad_limit_is_400(self, client: Client, query: str) -> None:
        """A ?limit= that is not an integer in range is a 400 whose field is limit."""
        await expect_json_error(await client.get(f"/api/jobs?{query}"), 400, field="limit")

    @pytest.mark.parametrize("query", ["status=done", "status=", "status=RUNNING!"])
    async def test_bad_status_is_400(self, client: Client, query: str) -> None:
        """A ?status= that is not a job status is a 400 whose field is status."""
        await expect_json_error(await client.get(f"/api/jobs?{query}"), 400, field="status")

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/nope"),
            ("GET", "/api"),
            ("GET", "/api/jobs/x/y"),
            ("POST", "/api/jobs/x/y"),
            ("GET", "/api/jobs/x/cancel/z"),
        ],
    )
    async def test_unknown_route_is_404(self, client: Client, method: str, path: str) -> None:
        """An unknown route is a 404 JSON error, not an HTML page."""
        await expect_json_error(await client.request(method, path), 404)

    @pytest.mark.parametrize(
        ("method", "path", "allowed"),
        [
            ("DELETE", "/api/jobs", {"GET", "POST"}),
            ("PUT", "/api/jobs", {"GET", "POST"}),
            ("PUT", "/api/jobs/{id}", {"GET"}),
            ("DELETE", "/api/jobs/{id}", {"GET"}),
            ("POST", "/api/jobs/{id}", {"GET"}),
            ("GET", "/api/jobs/{id}/cancel", {"POST"}),
            ("POST", "/api/jobs/{id}/stream", {"GET"}),
            ("POST", "/healthz", {"GET"}),
        ],
    )
    async def test_wrong_method_is_405_with_allow(
        self, client: Client, method: str, path: str, allowed: set[str]
    ) -> None:
        """A wrong method is a 405 JSON error whose Allow lists the route's methods, not it."""
        job = await create_job(client, FAST_JOB)
        for job_id in (job["id"], "unknown"):
            response = await client.request(method, path.format(id=job_id))
            await expect_json_error(response, 405, method)
            allow = {m.strip() for m in response.headers.get("Allow", "").split(",")}
            assert allowed <= allow, response.headers.get("Allow")
            assert method not in allow, response.headers.get("Allow")

    async def test_body_too_large_is_413(self, make_client: MakeClient) -> None:
        """A body over FLUSHLINE_MAX_BODY_BYTES is a 413 JSON error; one under it is accepted."""
        client = await make_client({"FLUSHLINE_MAX_BODY_BYTES": "1024"})
        big = {"input": {"prompt": "x" * 2000}, "options": FAST_JOB}
        await expect_json_error(await client.post("/api/jobs", json=big), 413)
        small = {"input": {"prompt": "x" * 500}, "options": FAST_JOB}
        assert (await client.post("/api/jobs", json=small)).status == 201

    async def test_at_capacity_is_503_with_retry_after(self, make_client: MakeClient) -> None:
        """With FLUSHLINE_MAX_ACTIVE_JOBS=1 a second job while one runs is a 503 + Retry-After."""
        client = await make_client({"FLUSHLINE_MAX_ACTIVE_JOBS": "1"})
        first = await create_job(client, SLOW_JOB)
        response = await client.post("/api/jobs", json={"options": FAST_JOB})
        await expect_json_error(response, 503)
        retry_after = response.headers["Retry-After"]
        assert retry_after.isdigit()
        assert int(retry_after) >= 1
        listing = await (await client.get("/api/jobs")).json()
        assert [job["id"] for job in listing["jobs"]] == [first["id"]]
        # Once the running job ends there is room again.
        assert (await client.post(f"/api/jobs/{first['id']}/cancel")).status == 202
        await wait_until(lambda: client.app[MANAGER].active_jobs == 0, 5)
        assert (await client.post("/api/jobs", json={"options": FAST_JOB})).status == 201

    async def test_bad_input_never_answers_html_or_500(self, client: Client) -> None:
        """A batch of odd requests is answered with JSON errors below 500 every time."""
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/api/jobs", {"data": b"\xff\xfe\x00", "headers": {"Content-Type": "x/y"}}),
            ("POST", "/api/jobs", {"data": b"{" * 5000}),
            ("POST", "/api/jobs", {"data": b"null"}),
            ("POST", "/api/jobs", {"json": {"options": {"steps": [1, 2]}}}),
            ("POST", "/api/jobs", {"json": {"options": {"tokens_per_second": float("1e308")}}}),
            ("POST", "/api/jobs", {"json": {"options": {"steps": 10**30}}}),
            ("GET", "/api/jobs?limit=%00", {}),
            ("GET", "/api/jobs/%2e%2e", {}),
            ("GET", "/api/jobs/" + "a" * 2000, {}),
            ("HEAD", "/nope", {}),
        ]
        for method, path, kwargs in requests:
            response = await client.request(method, path, **kwargs)
            assert 400 <= response.status < 500, (method, path, response.status)
            if method != "HEAD":
                await expect_json_error(response, response.status)


class TestIndependentOfWatchers:
    """Jobs run the same whether or not anyone watches."""

    async def test_job_completes_with_nobody_watching(self, client: Client) -> None:
        """A job nobody streams still runs every step to success in its normal time."""
        started = time.monotonic()
        job = await create_job(client, QUICK_JOB)
        snapshot = await wait_finished(client, job["id"])
        assert snapshot["status"] == "succeeded"
        assert time.monotonic() - started < 5
        record = await stream_job(client, job["id"])
        assert record.payloads()[-1]["status"] == "succeeded"
        assert record.seqs() == list(range(1, snapshot["last_event_id"] + 1))

    async def test_disconnecting_watcher_does_not_cancel(self, client: Client) -> None:
        """A stream client that leaves mid-job does not cancel it: the job still succeeds."""
        job = await create_job(client, QUICK_JOB)
        partial = await stream_job(client, job["id"], stop_after=3)
        assert len(partial.events) >= 3
        assert partial.payloads()[-1]["type"] != "done"
        assert (await get_job(client, job["id"]))["status"] == "running"
        snapshot = await wait_finished(client, job["id"])
        assert snapshot["status"] == "succeeded"
        assert [s["status"] for s in snapshot["steps"]] == ["succeeded", "succeeded"]
