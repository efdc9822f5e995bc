"""The examples in examples/: the pipelines, loaded by import path and run through the real
app, and the plain-HTTP worker (worker_urllib.py) run as a process against the real service."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import attrs
from flushline_client import cancel_job, create_external_job, get_job, watch_job

from app.jobs.llm import LLMConfig, OpenAIChatSource
from app.jobs.loader import load_pipelines
from app.jobs.steps import StepPipeline, bind_source
from app.jobs.tokens import SimulatedTokenSource
from tests.conftest import MakeClient
from tests.support.fake_llm import Reply, fake_llm
from tests.support.jobs import create_job, stream_job
from tests.support.paths import serve
from tests.support.process import ROOT, clean_env
from tests.support.publish_proxy import publish_proxy

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


# ------------------------------------------------------------ examples/worker_urllib.py

URLLIB_WORKER = ROOT / "examples" / "worker_urllib.py"
WORKER_STEPS = ["research", "outline", "draft", "review"]


async def start_urllib_worker(base: str, *args: str) -> asyncio.subprocess.Process:
    """``python examples/worker_urllib.py --url BASE ARGS`` (the standard library only)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(URLLIB_WORKER),
        f"--url={base}",
        *args,
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def job_of(worker: asyncio.subprocess.Process) -> str:
    """The job id the worker prints first."""
    assert worker.stdout is not None
    line = await asyncio.wait_for(worker.stdout.readline(), 15)
    job_id: str = json.loads(line)["job"]
    return job_id


class TestUrllibWorker:
    """The plain-HTTP worker example: create the job, publish, retry, stop on a cancel."""

    async def test_publishes_four_steps_to_the_end(self) -> None:
        """The worker creates an external job and publishes its four steps: the stream holds
        them with rising progress, the text, the result; the worker exits 0."""
        async with serve() as base:
            worker = await start_urllib_worker(base, "--step-seconds=0.4")
            job_id = await job_of(worker)
            async with asyncio.timeout(30):
                events = [e async for e in watch_job(f"{base}/api/jobs/{job_id}/stream")]
            _, err = await asyncio.wait_for(worker.communicate(), 15)
        assert worker.returncode == 0, err.decode()
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [e.data["step"] for e in events if e.type == "step_completed"] == WORKER_STEPS
        overall = [e.data["overall_pct"] for e in events if e.type == "step_progress"]
        assert overall == sorted(overall)
        assert len({p for p in overall if 0 < p < 100}) >= 8, overall
        text = "".join(e.data["text"] for e in events if e.type == "chunk")
        assert text == "".join(f"{s} part {n}. " for s in WORKER_STEPS for n in range(1, 11))
        assert events[-1].data["status"] == "succeeded"
        assert events[-1].data["result"] == {"steps": WORKER_STEPS}

    async def test_lost_answers_are_resent_with_the_same_producer_seq(self) -> None:
        """Through a proxy dropping every third answer: each batch resent byte for byte, each
        event once in the stream."""
        async with serve() as base, publish_proxy(base, drop_every=3) as proxy:
            steps = [{"name": step} for step in WORKER_STEPS]
            job = await create_external_job(base, steps)
            worker = await start_urllib_worker(
                proxy.url,
                "--step-seconds=0.2",
                f"--job={job.id}",
                f"--publish-token={job.publish_token}",
            )
            _, err = await asyncio.wait_for(worker.communicate(), 30)
            events = [e async for e in watch_job(job.stream_url)]
        assert worker.returncode == 0, err.decode()
        assert proxy.dropped >= 10
        for at, post in enumerate(proxy.posts):
            if post.dropped:
                assert proxy.posts[at + 1].body == post.body
        insights = [e.data["text"] for e in events if e.type == "insight"]
        assert insights == [f"Working on the {step}..." for step in WORKER_STEPS]
        text = "".join(e.data["text"] for e in events if e.type == "chunk")
        assert text == "".join(f"{s} part {n}. " for s in WORKER_STEPS for n in range(1, 11))
        assert events[-1].data["status"] == "succeeded"

    async def test_stops_when_the_job_is_cancelled(self) -> None:
        """A cancel through the API mid-job: the worker's next publish is refused (409), it
        stops and exits 3; nothing after the cancel reaches the stream."""
        async with serve() as base:
            worker = await start_urllib_worker(base, "--step-seconds=2")
            job_id = await job_of(worker)
            await asyncio.sleep(1.0)
            await cancel_job(base, job_id)
            cancelled_at = time.monotonic()
            _, err = await asyncio.wait_for(worker.communicate(), 15)
            exited_s = time.monotonic() - cancelled_at
            snapshot = await get_job(base, job_id)
        assert worker.returncode == 3, err.decode()
        assert "cancelled" in err.decode()
        assert exited_s < 2.0
        assert snapshot["status"] == "cancelled"
