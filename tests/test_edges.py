"""Edge inputs found in review: huge numbers, impossible resume points, runaway jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from app.jobs.pipelines import JobPlan
from tests.conftest import MakeClient
from tests.support.jobs import (
    FAST_JOB,
    Client,
    ScriptedPipeline,
    create_job,
    expect_json_error,
    stream_job,
    wait_finished,
)

HUGE = "9" * 5000  # int() refuses digit strings this long with its own ValueError


class TestHugeNumbers:
    """Digit strings too long for int() are a 400 naming the field, never a 500."""

    async def test_list_limit(self, client: Client) -> None:
        """?limit= with 5000 digits is a 400 naming limit."""
        await expect_json_error(await client.get(f"/api/jobs?limit={HUGE}"), 400, field="limit")

    @pytest.mark.parametrize("value", [HUGE, "\u00b2", "\u0663"])
    async def test_last_event_id_header(self, client: Client, value: str) -> None:
        """A huge or non-ASCII-digit Last-Event-ID is a 400 naming the header."""
        job = await create_job(client, FAST_JOB)
        response = await client.get(
            f"/api/jobs/{job['id']}/stream", headers={"Last-Event-ID": value}
        )
        await expect_json_error(response, 400, field="Last-Event-ID")

    async def test_last_event_id_query(self, client: Client) -> None:
        """A huge ?last_event_id= is a 400 naming it."""
        job = await create_job(client, FAST_JOB)
        response = await client.get(f"/api/jobs/{job['id']}/stream?last_event_id={HUGE}")
        await expect_json_error(response, 400, field="last_event_id")

    async def test_diagnostics_parameter(self, client: Client) -> None:
        """A huge diagnostics parameter is a 400 naming it."""
        response = await client.get(f"/api/diagnostics/stream?write_bytes={HUGE}")
        await expect_json_error(response, 400, field="write_bytes")


async def test_resume_beyond_the_newest_event_is_a_400(client: Client) -> None:
    """A Last-Event-ID past the job's last event is refused instead of waiting forever."""
    job = await create_job(client, FAST_JOB)
    done = await wait_finished(client, job["id"])
    last = done["last_event_id"]
    beyond = await client.get(
        f"/api/jobs/{job['id']}/stream", headers={"Last-Event-ID": str(last + 1)}
    )
    await expect_json_error(beyond, 400, field="Last-Event-ID")
    # At the last event itself there is nothing to wait for: 204 ends the stream for good.
    at_end = await stream_job(client, job["id"], headers={"Last-Event-ID": str(last)})
    assert at_end.status == 204, at_end.raw[:200]
    assert at_end.raw == b""


class TestRunawayJobs:
    """Options that would make a job hold memory or a slot without end are refused."""

    async def test_total_tokens_are_capped(self, client: Client) -> None:
        """50 steps x 100000 tokens is a 400 naming tokens_per_step."""
        body = {"options": {"steps": 50, "tokens_per_step": 100_000}}
        response = await client.post("/api/jobs", json=body)
        await expect_json_error(response, 400, field="options.tokens_per_step")

    @pytest.mark.parametrize("rate", [5e-324, 1e-300, 0.01])
    async def test_tokens_per_second_has_a_floor(self, client: Client, rate: float) -> None:
        """A rate that would take forever is a 400 naming tokens_per_second."""
        response = await client.post("/api/jobs", json={"options": {"tokens_per_second": rate}})
        await expect_json_error(response, 400, field="options.tokens_per_second")


class UnencodableResult(ScriptedPipeline):
    """A user pipeline whose result JSON cannot encode."""

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        return {"tags": {"a", "b"}}  # a set: orjson refuses it


async def test_unencodable_result_fails_the_job_cleanly(make_client: MakeClient) -> None:
    """A result that cannot be encoded ends the job as failed, with error then done."""
    pipeline = UnencodableResult(((0.0, "a "), (0.0, "b ")), name="bad-result")
    client = await make_client(pipelines=(pipeline,))
    job = await create_job(client, pipeline="bad-result")
    record = await stream_job(client, job["id"])
    types = [p["type"] for p in record.payloads()]
    assert types[-2:] == ["error", "done"]
    assert record.payloads()[-1]["status"] == "failed"
    assert record.seqs() == list(range(1, len(types) + 1))
    snapshot = await wait_finished(client, job["id"])
    assert snapshot["status"] == "failed"
    assert snapshot["error"]
