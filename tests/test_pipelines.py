"""User pipelines through the real API: a blocking SDK in a thread, registration, expiry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from app.jobs.pipelines import JobPlan, StepPlan
from app.jobs.tokens import TokenRequest, threaded
from tests.conftest import MakeClient
from tests.support.jobs import FAST_JOB, create_job, get_job, stream_job, wait_finished, wait_until


@attrs.define
class BlockingSDK:
    """Stands in for a synchronous LLM SDK: blocks between tokens, records its thread."""

    tokens: tuple[str, ...]
    delay_s: float = 0.01
    threads: set[int] = attrs.Factory(set)

    def stream_sync(self, request: TokenRequest) -> Iterator[str]:
        for token in self.tokens:
            self.threads.add(threading.get_ident())
            time.sleep(self.delay_s)  # a blocking call: would freeze the loop if run on it
            yield token


@attrs.frozen
class SummarizePipeline:
    """A two-step user pipeline whose steps stream from a blocking SDK."""

    sdk: BlockingSDK
    name: str = "summarize"

    def plan(self, input: Mapping[str, Any], options: Mapping[str, Any]) -> JobPlan:
        source = threaded(self.sdk)
        steps = tuple(
            StepPlan(
                name,
                len(self.sdk.tokens),
                source,
                TokenRequest(prompt=str(input.get("text", "")), max_tokens=100, step=name),
                (f"{name}...",),
            )
            for name in ("read", "summarize")
        )
        return JobPlan(steps)

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        return {"summary": outputs[-1]}


TOKENS = tuple(f"t{i} " for i in range(40))


async def test_blocking_sdk_streams_in_order_from_a_worker_thread(make_client: MakeClient) -> None:
    """A registered pipeline's blocking source runs off the loop; its tokens arrive in order."""
    sdk = BlockingSDK(TOKENS)
    client = await make_client(
        {"FLUSHLINE_STRATEGY": "frequency"}, pipelines=(SummarizePipeline(sdk),)
    )
    loop_thread = threading.get_ident()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        job = await create_job(client, pipeline="summarize", input={"text": "hello"})
        record = await stream_job(client, job["id"])
    finally:
        ticker.cancel()
    payloads = record.payloads()
    assert payloads[-1]["type"] == "done"
    assert payloads[-1]["status"] == "succeeded"
    for step in ("read", "summarize"):
        text = "".join(p["text"] for p in payloads if p["type"] == "chunk" and p["step"] == step)
        assert text == "".join(TOKENS)
    assert payloads[-1]["result"] == {"summary": "".join(TOKENS)}
    assert sdk.threads
    assert loop_thread not in sdk.threads
    # 2 x 40 tokens x 10 ms of blocking: the loop kept ticking meanwhile.
    assert ticks > 40


async def test_user_pipeline_sits_beside_demo(make_client: MakeClient) -> None:
    """Registering a pipeline keeps demo; an unknown name lists both in the 400."""
    client = await make_client(pipelines=(SummarizePipeline(BlockingSDK(TOKENS[:3])),))
    demo = await create_job(client, FAST_JOB)
    assert demo["pipeline"] == "demo"
    response = await client.post("/api/jobs", json={"pipeline": "nope"})
    assert response.status == 400
    message = (await response.json())["error"]["message"]
    assert "demo" in message
    assert "summarize" in message


class TestRetention:
    """Finished jobs are forgotten after their TTL, and beyond the retention limit."""

    async def test_finished_job_expires_after_its_ttl(self, make_client: MakeClient) -> None:
        """A finished job answers 404 (snapshot and stream) once its TTL has passed."""
        client = await make_client({"FLUSHLINE_JOB_TTL": "0.3"})
        job = await create_job(client, FAST_JOB)
        await wait_finished(client, job["id"])

        async def gone() -> bool:
            return (await client.get(f"/api/jobs/{job['id']}")).status == 404

        await wait_until(gone, timeout_s=5.0, what="the job to expire")
        stream = await client.get(f"/api/jobs/{job['id']}/stream")
        assert stream.status == 404

    async def test_running_job_does_not_expire(self, make_client: MakeClient) -> None:
        """Expiry only takes finished jobs: a job running past the TTL stays."""
        client = await make_client({"FLUSHLINE_JOB_TTL": "0.2"})
        job = await create_job(client, {"steps": 1, "tokens_per_step": 60, "tokens_per_second": 60})
        await asyncio.sleep(0.6)
        assert (await get_job(client, job["id"]))["status"] == "running"

    async def test_oldest_finished_job_makes_room(self, make_client: MakeClient) -> None:
        """With FLUSHLINE_MAX_RETAINED_JOBS=2, a third job pushes out the oldest finished one."""
        client = await make_client({"FLUSHLINE_MAX_RETAINED_JOBS": "2"})
        first = await create_job(client, FAST_JOB)
        await wait_finished(client, first["id"])
        second = await create_job(client, FAST_JOB)
        await wait_finished(client, second["id"])
        third = await create_job(client, FAST_JOB)
        assert (await client.get(f"/api/jobs/{first['id']}")).status == 404
        ids = [j["id"] for j in (await (await client.get("/api/jobs")).json())["jobs"]]
        assert ids == [third["id"], second["id"]]
