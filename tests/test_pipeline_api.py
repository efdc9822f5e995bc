"""The pipeline API (app/jobs/steps.py, app/jobs/loader.py) through the real app.

Pipelines are registered with ``init_app(settings, pipelines=[...])`` or loaded from a
``package.module:attribute`` path, and run with ``POST /api/jobs``.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest

from app.jobs.loader import PipelineLoadError, load_pipelines, parse_pipeline_paths
from app.jobs.steps import (
    FunctionStep,
    Input,
    PromptStep,
    StepCancelled,
    StepContext,
    StepPipeline,
    bind_source,
)
from app.jobs.tokens import Piece, SimulatedTokenSource, TokenRequest
from tests.conftest import MakeClient
from tests.support.jobs import (
    Client,
    create_job,
    expect_json_error,
    get_job,
    stream_job,
    wait_for_job,
    wait_until,
)

FAST = SimulatedTokenSource(seed=1, tokens_per_second=5000)


@attrs.define
class EchoSource:
    """A token source answering ``[step] <prompt length>`` word by word; records prompts."""

    prompts: dict[str, str] = attrs.Factory(dict)

    async def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        self.prompts[request.step] = request.prompt
        for word in (f"<{request.step}", f" out:{len(request.prompt)}>"):
            await asyncio.sleep(0)
            yield word


async def run(client: Client, pipeline: str, input: dict[str, Any]) -> list[dict[str, Any]]:
    """Create a job of ``pipeline`` and return its stream's payloads."""
    job = await create_job(client, pipeline=pipeline, input=input)
    record = await stream_job(client, job["id"])
    return record.payloads()


TWO_INPUTS = (Input("topic"), Input("tone", required=False, max_chars=20))


class TestInputs:
    async def test_inputs_are_validated_naming_the_field(self, make_client: MakeClient) -> None:
        """Missing, unknown, non-string, empty and too long inputs and any option: 400 by name."""
        pipeline = StepPipeline(
            "essay", (PromptStep("write", "{input.topic} {input.tone}"),), TWO_INPUTS, FAST
        )
        client = await make_client(pipelines=(pipeline,))
        cases: list[tuple[dict[str, Any], str]] = [
            ({"input": {}}, "input.topic"),
            ({"input": {"topic": "x", "colour": "red"}}, "input.colour"),
            ({"input": {"topic": 3}}, "input.topic"),
            ({"input": {"topic": "  "}}, "input.topic"),
            ({"input": {"topic": "x", "tone": "y" * 21}}, "input.tone"),
            ({"input": {"topic": "x"}, "options": {"steps": 2}}, "options.steps"),
        ]
        for body, field in cases:
            response = await client.post("/api/jobs", json={"pipeline": "essay", **body})
            await expect_json_error(response, 400, field=field)
        ok = await create_job(client, pipeline="essay", input={"topic": "x"})
        assert ok["pipeline"] == "essay"

    async def test_unknown_pipeline_lists_the_known_ones(self, make_client: MakeClient) -> None:
        """An unknown name: 400 on ``pipeline`` listing demo and the registered ones."""
        pipeline = StepPipeline("essay", (PromptStep("write", "hi"),))
        client = await make_client(pipelines=(pipeline,))
        response = await client.post("/api/jobs", json={"pipeline": "esay"})
        error = await expect_json_error(response, 400, field="pipeline")
        assert "demo" in error["message"]
        assert "essay" in error["message"]


class TestTemplates:
    def test_bad_templates_are_refused_when_the_pipeline_is_built(self) -> None:
        """Unknown fields, later steps, {previous} first, format specs: ValueError naming them."""
        cases = [
            ((PromptStep("a", "{input.nope}"),), "{input.nope}"),
            ((PromptStep("a", "{previous}"),), "{previous} in the first step"),
            ((PromptStep("a", "x"), PromptStep("b", "{steps.c}")), "{steps.c}"),
            ((PromptStep("a", "{input.topic!r}"),), "format spec"),
            ((PromptStep("a", "{topic}"),), "{topic}"),
            ((PromptStep("a", "x"), PromptStep("a", "y")), "unique"),
        ]
        for steps, message in cases:
            with pytest.raises(ValueError, match=r"^pipeline 'p': ") as error:
                StepPipeline("p", steps, (Input("topic"),))
            assert str(error.value).startswith("pipeline 'p': ")
            assert message in str(error.value)

    async def test_prompts_see_input_and_earlier_outputs(self, make_client: MakeClient) -> None:
        """{input.X}, {steps.Y} and {previous} are filled from the job; braces stay literal."""
        source = EchoSource()
        pipeline = StepPipeline(
            "chain",
            (
                PromptStep("first", "Topic: {input.topic} {{literal}}"),
                PromptStep("second", "After {previous}"),
                PromptStep("third", "First was {steps.first}; just now {previous}"),
            ),
            (Input("topic"),),
            source,
        )
        client = await make_client(pipelines=(pipeline,))
        payloads = await run(client, "chain", {"topic": "tea {not a field}"})
        assert payloads[-1]["status"] == "succeeded"
        first_prompt = "Topic: tea {not a field} {literal}"
        first = f"<first out:{len(first_prompt)}>"
        second = f"<second out:{len('After ' + first)}>"
        assert source.prompts == {
            "first": first_prompt,
            "second": f"After {first}",
            "third": f"First was {first}; just now {second}",
        }
        assert payloads[-1]["result"]["steps"]["second"] == second
        assert payloads[-1]["result"]["output"] == payloads[-1]["result"]["steps"]["third"]

    async def test_unbound_prompt_steps_use_the_simulated_source(
        self, make_client: MakeClient
    ) -> None:
        """No source given: the steps stream simulated text of expected_tokens tokens."""
        fast = SimulatedTokenSource(tokens_per_second=5000)
        pipeline = StepPipeline("sim", (PromptStep("a", "hi", expected_tokens=30),), simulated=fast)
        client = await make_client(pipelines=(pipeline,))
        payloads = await run(client, "sim", {})
        assert payloads[-1]["status"] == "succeeded"
        assert len(payloads[-1]["result"]["output"].split()) == 30
        assert bind_source(pipeline, EchoSource()).source is not None  # type: ignore[attr-defined]


class TestFunctionSteps:
    async def test_plain_async_and_blocking_steps(self, make_client: MakeClient) -> None:
        """Plain, async and blocking (in a thread) callables stream text and chain outputs."""
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def plain(ctx: StepContext) -> str:
            return ctx.input["topic"].upper()

        async def later(ctx: StepContext) -> None:
            for word in ctx.previous.split():
                await asyncio.sleep(0.001)
                ctx.report.write(word + "!")

        def blocking(ctx: StepContext) -> str:
            threads.append(threading.get_ident())
            time.sleep(0.05)  # a blocking call: would freeze the loop if run on it
            return f"{ctx.outputs['plain']}|{ctx.outputs['later']}"

        pipeline = StepPipeline(
            "funcs",
            (
                FunctionStep("plain", plain),
                FunctionStep("later", later),
                FunctionStep("blocking", blocking, blocking=True),
            ),
            (Input("topic"),),
        )
        client = await make_client(pipelines=(pipeline,))
        payloads = await run(client, "funcs", {"topic": "a b"})
        assert payloads[-1]["status"] == "succeeded"
        assert payloads[-1]["result"]["steps"] == {
            "plain": "A B",
            "later": "A!B!",
            "blocking": "A B|A!B!",
        }
        assert threads
        assert loop_thread not in threads

    async def test_reporter_progress_drives_the_step(self, make_client: MakeClient) -> None:
        """advance() counts toward expected_tokens: step_progress follows the reported count."""

        async def work(ctx: StepContext) -> str:
            for _ in range(10):
                await asyncio.sleep(0.03)
                ctx.report.advance(5)
            return "done"

        pipeline = StepPipeline("work", (FunctionStep("crunch", work, expected_tokens=100),))
        client = await make_client(
            {"FLUSHLINE_PROGRESS_INTERVAL": "0.05", "FLUSHLINE_STRATEGY": "frequency"},
            pipelines=(pipeline,),
        )
        payloads = await run(client, "work", {})
        progress = [p for p in payloads if p["type"] == "step_progress"]
        assert len(progress) >= 3
        for event in progress:
            assert event["tokens"] % 5 == 0
            assert event["pct"] == pytest.approx(event["tokens"], abs=0.05)
        completed = next(p for p in payloads if p["type"] == "step_completed")
        assert completed["tokens"] == 50
        assert payloads[-1]["result"]["output"] == "done"

    async def test_a_failing_step_fails_the_job(self, make_client: MakeClient) -> None:
        """An exception in a step: error naming it and the step, done failed."""

        def boom(ctx: StepContext) -> str:
            raise RuntimeError("the database is down")

        pipeline = StepPipeline("boom", (FunctionStep("load", boom, blocking=True),))
        client = await make_client(pipelines=(pipeline,))
        payloads = await run(client, "boom", {})
        assert payloads[-2]["type"] == "error"
        assert payloads[-2]["message"] == "the database is down"
        assert payloads[-2]["step"] == "load"
        assert payloads[-1]["status"] == "failed"

    async def test_cancel_stops_a_blocking_step_at_its_next_report(
        self, make_client: MakeClient
    ) -> None:
        """Cancelling the job: the worker thread's next report raises StepCancelled; it ends."""
        stopped = threading.Event()
        reports = 0

        def forever(ctx: StepContext) -> None:
            nonlocal reports
            try:
                while True:
                    time.sleep(0.01)
                    ctx.report.write("x ")
                    reports += 1
            except StepCancelled:
                stopped.set()
                raise

        pipeline = StepPipeline("forever", (FunctionStep("loop", forever, blocking=True),))
        client = await make_client(pipelines=(pipeline,))
        job = await create_job(client, pipeline="forever")
        await wait_until(lambda: reports > 3, 5.0, "the step to report")
        assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202
        await asyncio.to_thread(stopped.wait, 2.0)
        assert stopped.is_set()
        snapshot = await wait_for_job(client, job["id"], lambda s: s["status"] == "cancelled")
        assert snapshot["steps"][0]["status"] == "cancelled"


LOADABLE = """
from app.jobs.steps import FunctionStep, Input, StepPipeline

def _greet(ctx):
    return "hello " + ctx.input["name"]

pipeline = StepPipeline("greet", (FunctionStep("greet", _greet),), (Input("name"),))
more = [StepPipeline("other", (FunctionStep("x", lambda ctx: "x"),))]
not_a_pipeline = 42
"""


@pytest.fixture
def user_module(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``userpipes_<n>.flows`` on sys.path holding ``LOADABLE``; yields its name."""
    name = f"userpipes_{id(tmp_path)}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flows.py").write_text(textwrap.dedent(LOADABLE))
    (package / "broken.py").write_text("raise RuntimeError('cannot start')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


class TestLoader:
    async def test_env_style_import_paths_register_and_run(
        self, make_client: MakeClient, user_module: str
    ) -> None:
        """FLUSHLINE_PIPELINES-style value -> loader -> init_app: the pipeline runs end to end."""
        env = {"FLUSHLINE_PIPELINES": f"{user_module}.flows:pipeline, {user_module}.flows:more"}
        pipelines = load_pipelines(parse_pipeline_paths(env["FLUSHLINE_PIPELINES"]))
        assert [p.name for p in pipelines] == ["greet", "other"]
        client = await make_client(pipelines=pipelines)
        payloads = await run(client, "greet", {"name": "Ada"})
        assert payloads[-1]["status"] == "succeeded"
        assert payloads[-1]["result"]["output"] == "hello Ada"
        job = await create_job(client, pipeline="other")
        assert (await get_job(client, job["id"]))["pipeline"] == "other"

    def test_errors_name_the_path(self, user_module: str) -> None:
        """Each bad path fails with one line naming it and what is wrong."""
        flows = f"{user_module}.flows"
        cases = [
            ("nocolon", "'nocolon' is not of the form package.module:attribute"),
            (f"{user_module}.missing:x", f"'{user_module}.missing:x': cannot import"),
            (f"{user_module}.broken:x", "RuntimeError: cannot start"),
            (f"{flows}:nope", f"'{flows}:nope': '{flows}' has no attribute 'nope'"),
            (f"{flows}:not_a_pipeline", f"'{flows}:not_a_pipeline' is not a pipeline"),
        ]
        for path, message in cases:
            with pytest.raises(PipelineLoadError) as error:
                load_pipelines([path])
            assert message in str(error.value)
            assert "\n" not in str(error.value)
        with pytest.raises(PipelineLoadError, match="'greet' is already taken"):
            load_pipelines([f"{flows}:pipeline", f"{flows}:pipeline"])

    def test_parse_rejects_malformed_lists(self) -> None:
        """A list item without a module or attribute is refused; blanks are skipped."""
        assert parse_pipeline_paths(" a.b:c , ,d:e.f") == ("a.b:c", "d:e.f")
        for bad in ("a.b:", ":c", "a b:c", "a.b:c-d"):
            with pytest.raises(ValueError, match=r"package\.module:attribute"):
                parse_pipeline_paths(bad)


class TestThroughTheEnvironment:
    """FLUSHLINE_PIPELINES and FLUSHLINE_LLM_* through Settings.from_environ and init_app."""

    async def test_pipelines_variable_registers_and_runs(
        self, make_client: MakeClient, user_module: str
    ) -> None:
        """FLUSHLINE_PIPELINES=pkg.mod:attr registers the pipeline; a job runs end to end."""
        client = await make_client({"FLUSHLINE_PIPELINES": f"{user_module}.flows:pipeline"})
        payloads = await run(client, "greet", {"name": "Ada"})
        assert payloads[-1]["status"] == "succeeded"
        assert payloads[-1]["result"]["output"] == "hello Ada"

    def test_a_path_that_does_not_import_stops_the_app(self, user_module: str) -> None:
        """A bad import path stops init_app with the loader's one line naming it."""
        from app.core.settings import Settings
        from app.web.factory import init_app

        settings = Settings.from_environ({"FLUSHLINE_PIPELINES": f"{user_module}.flows:nope"})
        with pytest.raises(PipelineLoadError, match=f"'{user_module}.flows:nope'"):
            init_app(settings)

    async def test_provider_variables_feed_chat_and_prompt_steps(
        self, make_client: MakeClient
    ) -> None:
        """With the three variables set, chat and the example's prompts go to the provider."""
        from tests.support.fake_llm import Reply, fake_llm

        async with fake_llm(Reply(tokens=("hi",))) as fake:
            env = {
                "FLUSHLINE_LLM_BASE_URL": fake.base_url,
                "FLUSHLINE_LLM_MODEL": "fake-model",
                "FLUSHLINE_LLM_API_KEY": "sk-env",
                "FLUSHLINE_PIPELINES": "examples.resume_tailoring:pipeline",
            }
            client = await make_client(env)
            chat = await run(client, "chat", {"prompt": "hello"})
            example = await run(client, "resume-tailoring", {"job_post": "x", "resume": "y"})
            assert len(fake.requests) == 5
            assert fake.requests[0].headers["Authorization"] == "Bearer sk-env"
        assert chat[-1]["result"] == {"text": "hi"}
        assert example[-1]["result"]["output"] == "hi"

    async def test_chat_without_provider_is_a_400(self, make_client: MakeClient) -> None:
        """No FLUSHLINE_LLM_*: a chat job is refused naming the variables; demo still runs."""
        client = await make_client()
        response = await client.post(
            "/api/jobs", json={"pipeline": "chat", "input": {"prompt": "x"}}
        )
        error = await expect_json_error(response, 400, "FLUSHLINE_LLM_BASE_URL", field="pipeline")
        assert "FLUSHLINE_LLM_MODEL" in error["message"]
        assert (await create_job(client))["pipeline"] == "demo"
