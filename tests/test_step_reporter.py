"""The step reporter and blocking steps (app/jobs/steps.py, app/jobs/tokens.py), through the app.

What a FunctionStep reports (text with or without tokens, a percentage, insights) becomes
the job's events; a blocking step runs in a thread of its own, never holding one of the
loop's default-executor threads, and stops at its next report once cancelled; the
hand-off from a worker thread to the loop is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterator

import pytest

from app.core.events import AnyEvent
from app.jobs.runner import run_job
from app.jobs.steps import FunctionStep, StepCancelled, StepContext, StepPipeline
from app.jobs.tokens import MAX_PENDING_PIECES, Piece, TokenRequest, threaded
from strategies import build_strategy
from tests.conftest import MakeClient
from tests.support.jobs import create_job, stream_job, wait_for_job, wait_until


def _pipeline(name: str, step: FunctionStep) -> StepPipeline:
    return StepPipeline(name, (step,))


class TestWhatAStepReports:
    async def test_write_counts_tokens_only_when_given(self, make_client: MakeClient) -> None:
        """write(text) counts no token; write(text, tokens=N) counts N."""

        def work(ctx: StepContext) -> None:
            for _ in range(5):
                ctx.report.write("x")
            ctx.report.write("y", tokens=3)

        client = await make_client(pipelines=(_pipeline("w", FunctionStep("s", work)),))
        job = await create_job(client, pipeline="w")
        payloads = (await stream_job(client, job["id"])).payloads()
        completed = next(p for p in payloads if p["type"] == "step_completed")
        assert completed["tokens"] == 3
        assert sum(p["tokens"] for p in payloads if p["type"] == "chunk") == 3
        assert payloads[-1]["result"]["output"] == "xxxxxy"

    async def test_progress_and_insight_become_events(self, make_client: MakeClient) -> None:
        """report.progress(pct) is the step's pct as given; report.insight(text) an insight."""

        def work(ctx: StepContext) -> None:
            ctx.report.insight("looking things up")
            ctx.report.progress(42.5)

        client = await make_client(pipelines=(_pipeline("p", FunctionStep("s", work)),))
        job = await create_job(client, pipeline="p")
        payloads = (await stream_job(client, job["id"])).payloads()
        insights = [p for p in payloads if p["type"] == "insight"]
        assert {"text": "looking things up", "step": "s"}.items() <= insights[-1].items()
        progress = [p for p in payloads if p["type"] == "step_progress"]
        assert [p["pct"] for p in progress] == [42.5]

    async def test_progress_outside_0_to_100_fails_the_step(self, make_client: MakeClient) -> None:
        """report.progress(150) raises ValueError in the step, which fails the job naming it."""

        def work(ctx: StepContext) -> None:
            ctx.report.progress(150)

        client = await make_client(pipelines=(_pipeline("bad", FunctionStep("s", work)),))
        job = await create_job(client, pipeline="bad")
        payloads = (await stream_job(client, job["id"])).payloads()
        assert payloads[-1]["status"] == "failed"
        assert "from 0 to 100" in payloads[-2]["message"]


class TestBlockingSteps:
    async def test_blocking_steps_leave_the_default_executor_free(
        self, make_client: MakeClient
    ) -> None:
        """More blocking steps than default-executor threads: to_thread still runs at once,
        and cancelled they end their jobs at once though they never report."""
        workers = min(32, (os.cpu_count() or 1) + 4) + 2
        release = threading.Event()
        running = 0

        def silent(ctx: StepContext) -> None:
            nonlocal running
            running += 1
            release.wait(10.0)  # never reports, so it cannot be interrupted

        client = await make_client(
            pipelines=(_pipeline("silent", FunctionStep("s", silent, blocking=True)),)
        )
        try:
            jobs = [await create_job(client, pipeline="silent") for _ in range(workers)]
            await wait_until(lambda: running == workers, 5.0, "every step to start")
            started = time.monotonic()
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 1.0)
            assert time.monotonic() - started < 1.0
            for job in jobs:
                assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202
            for job in jobs:
                await wait_for_job(client, job["id"], lambda s: s["status"] == "cancelled", 2.0)
        finally:
            release.set()

    async def test_a_writer_far_ahead_of_the_loop_stops_on_cancel(
        self, make_client: MakeClient
    ) -> None:
        """A blocking step writing without pause waits on the bound, and a cancel stops it."""
        stopped = threading.Event()
        writes = 0

        def flood(ctx: StepContext) -> None:
            nonlocal writes
            try:
                while True:
                    ctx.report.write("x", tokens=1)
                    writes += 1
            except StepCancelled:
                stopped.set()
                raise

        client = await make_client(
            pipelines=(_pipeline("flood", FunctionStep("s", flood, blocking=True)),)
        )
        job = await create_job(client, pipeline="flood")
        await wait_until(lambda: writes > 1000, 5.0, "the step to write")
        assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202
        assert await asyncio.to_thread(stopped.wait, 2.0)


class TestBoundedHandoff:
    async def test_a_function_step_thread_waits_for_the_loop(self) -> None:
        """A blocking step's thread gets at most MAX_PENDING_PIECES ahead of its consumer."""
        written = 0

        def flood(ctx: StepContext) -> None:
            nonlocal written
            while True:
                ctx.report.write("x")  # two pieces: the text and the count
                written += 1

        pipeline = _pipeline("flood", FunctionStep("s", flood, blocking=True))
        source = pipeline.plan({}, {}).steps[0].source
        stream = source.stream(TokenRequest(prompt="", max_tokens=1, step="s"))
        assert isinstance(await anext(stream), str)
        await asyncio.sleep(0.3)  # the consumer takes nothing meanwhile
        assert written <= MAX_PENDING_PIECES // 2 + 2, written
        await stream.aclose()

    async def test_a_slow_publish_holds_a_blocking_step_back(self) -> None:
        """A job whose events publish slowly: the step's thread waits, its writes bounded."""
        written = 0

        def flood(ctx: StepContext) -> None:
            nonlocal written
            while True:
                ctx.report.write("x", tokens=1)
                written += 1

        async def slow_publish(event: AnyEvent) -> None:
            await asyncio.sleep(0.2)  # a bus far slower than the step

        pipeline = _pipeline("flood", FunctionStep("s", flood, blocking=True))
        plan = pipeline.plan({}, {})
        cadence = build_strategy("none").cadence
        job = asyncio.create_task(run_job(plan, pipeline, "none", cadence, slow_publish))
        await asyncio.sleep(1.0)
        # At most 5 publishes in that second, each letting through a queue's worth of
        # pieces (2 a write), plus the two queues full: about 900 writes (unbounded: 13,000).
        assert written < 8 * MAX_PENDING_PIECES, written
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    async def test_a_threaded_source_waits_for_the_loop(self) -> None:
        """A blocking token source's thread gets at most MAX_PENDING_PIECES ahead, then stops."""
        produced = 0
        done = concurrent.futures.Future[None]()

        class Endless:
            def stream_sync(self, request: TokenRequest) -> Iterator[Piece]:
                nonlocal produced
                try:
                    while True:
                        produced += 1
                        yield "x"
                finally:
                    done.set_result(None)

        stream = threaded(Endless()).stream(TokenRequest(prompt="", max_tokens=1))
        assert await anext(stream) == "x"
        await asyncio.sleep(0.3)
        assert produced <= MAX_PENDING_PIECES + 2, produced
        await stream.aclose()
        await asyncio.wait_for(asyncio.wrap_future(done), 2.0)


@pytest.fixture(autouse=True)
def _no_leftover_step_threads() -> Iterator[None]:
    """Each test's step threads end within a few seconds of it (none left spinning)."""
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith(("step-", "tokens-"))]:
            return
        time.sleep(0.05)
    leftover = [t.name for t in threading.enumerate() if t.name.startswith(("step-", "tokens-"))]
    raise AssertionError(f"threads still running: {leftover}")
