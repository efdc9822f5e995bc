"""The example pipelines in examples/, loaded by import path and run through the real app."""

from __future__ import annotations

from typing import Any

import attrs

from app.jobs.llm import LLMConfig, OpenAIChatSource
from app.jobs.loader import load_pipelines
from app.jobs.steps import StepPipeline, bind_source
from app.jobs.tokens import SimulatedTokenSource
from tests.conftest import MakeClient
from tests.support.fake_llm import Reply, fake_llm
from tests.support.jobs import create_job, stream_job

PATH = "examples.resume_tailoring:pipeline"
INPUT = {
    "job_post": "Senior platform engineer: Kubernetes, Go, on-call, observability.",
    "resume": "Jane Doe. Backend engineer, 7 years. Built a job scheduler in Go.",
}
STEPS = ["analyse", "summary", "bullets", "review"]


def example() -> StepPipeline:
    """The resume-tailoring pipeline, loaded as FLUSHLINE_PIPELINES would."""
    (pipeline,) = load_pipelines([PATH])
    assert isinstance(pipeline, StepPipeline)
    return pipeline


async def run(client: Any) -> list[dict[str, Any]]:
    job = await create_job(client, pipeline="resume-tailoring", input=INPUT)
    record = await stream_job(client, job["id"])
    return record.payloads()


async def test_resume_tailoring_against_a_provider(make_client: MakeClient) -> None:
    """Against the fake provider: four requests, each prompt holding the previous output."""
    async with fake_llm(Reply(usage="final", delay_s=0.005)) as fake:
        llm = LLMConfig(base_url=fake.base_url, model="fake-model", api_key="sk-x")
        pipeline = bind_source(example(), OpenAIChatSource(llm))
        client = await make_client(pipelines=(pipeline,))
        payloads = await run(client)
        requests = fake.requests
    done = payloads[-1]
    assert done["status"] == "succeeded", payloads[-3:]
    assert [p["step"] for p in payloads if p["type"] == "step_completed"] == STEPS
    outputs = done["result"]["steps"]
    assert list(outputs) == STEPS
    assert len(requests) == 4
    assert INPUT["job_post"] in requests[0].prompt
    for i in range(1, 4):
        previous = outputs[STEPS[i - 1]]
        assert previous == f"reply {i} to {len(requests[i - 1].prompt)} chars"
        assert previous in requests[i].prompt, (i, requests[i].prompt)
    assert all(r.body["messages"][0]["role"] == "system" for r in requests)
    assert done["result"]["output"] == outputs["review"]


async def test_resume_tailoring_runs_simulated_without_a_provider(
    make_client: MakeClient,
) -> None:
    """Unbound, it runs on the simulated source (no network): four steps, every insight."""
    pipeline = attrs.evolve(example(), simulated=SimulatedTokenSource(tokens_per_second=20_000))
    client = await make_client(pipelines=(pipeline,))
    payloads = await run(client)
    assert payloads[-1]["status"] == "succeeded"
    assert list(payloads[-1]["result"]["steps"]) == STEPS
    insights = {p["text"] for p in payloads if p["type"] == "insight"}
    assert {"Analyzing the job description...", "Final review..."} <= insights
    completed = [p for p in payloads if p["type"] == "step_completed"]
    assert [c["tokens"] for c in completed] == [250, 150, 400, 300]
