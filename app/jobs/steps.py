"""The pipeline API: a pipeline as a list of steps, each a prompt template or a callable.

A :class:`StepPipeline` declares its ``inputs`` (validated on ``POST /api/jobs``: a 400
names the field) and its ``steps``, run in order:

- :class:`PromptStep`: a prompt template sent to the pipeline's token source (the
  configured LLM provider, else the simulated one). Templates use ``{input.NAME}`` for a
  declared input, ``{steps.NAME}`` for an earlier step's output and ``{previous}`` for the
  step just before (``{{`` and ``}}`` are literal braces); they are checked when the
  pipeline is built, so a job can never fail on a bad template.
- :class:`FunctionStep`: a Python callable taking a :class:`StepContext`: plain, ``async``,
  or blocking (``blocking=True`` runs it in a thread of its own). It streams text and
  reports progress (a percentage, or tokens against ``expected_tokens``) and status lines
  through ``context.report`` (a :class:`Reporter`); a string it returns is appended to
  its output. A reported percentage reaches the job's streams within the latency budget,
  whatever the strategy (see :class:`~strategies.base.Cadence`).

Example::

    pipeline = StepPipeline(
        name="summarize",
        inputs=(Input("text"),),
        steps=(
            PromptStep("summary", "Summarize in three sentences:\\n\\n{input.text}"),
            FunctionStep("shout", lambda ctx: ctx.outputs["summary"].upper()),
        ),
    )
"""

from __future__ import annotations

import asyncio
import inspect
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs

from app.core.errors import InvalidField
from app.core.tasks import cancel_and_wait
from app.jobs.pipelines import JobPlan, Pipeline, StepFailed, StepPlan
from app.jobs.reporter import Reporter, StepCancelled, run_in_own_thread
from app.jobs.tokens import (
    END_OF_PIECES,
    Handoff,
    Piece,
    SimulatedTokenSource,
    TokenRequest,
    TokenSource,
)

__all__ = [
    "FunctionStep",
    "Input",
    "PromptStep",
    "Reporter",
    "Step",
    "StepCancelled",
    "StepContext",
    "StepPipeline",
    "bind_source",
]


def _texts(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Input:
    """A declared input field: a string in the job's ``input`` object."""

    name: str
    required: bool = True
    max_chars: int = 50_000
    description: str = ""


@attrs.frozen
class PromptStep:
    """A step that sends a prompt template, filled in when the step starts, to the source.

    ``expected_tokens`` drives the progress estimate; ``max_tokens`` (when set) caps the
    reply. ``insights`` are status lines: the first when the step starts, the others
    spread over its progress.
    """

    name: str
    prompt: str
    system: str = ""
    expected_tokens: int = 300
    max_tokens: int | None = None
    temperature: float | None = None
    insights: tuple[str, ...] = attrs.field(default=(), converter=_texts)


@attrs.frozen
class StepContext:
    """What a :class:`FunctionStep` gets: the job's input, earlier outputs, its reporter."""

    input: Mapping[str, str]
    #: Earlier steps' outputs by step name, in order.
    outputs: Mapping[str, str]
    report: Reporter

    @property
    def previous(self) -> str:
        """The output of the step just before ("" for the first step)."""
        return list(self.outputs.values())[-1] if self.outputs else ""


StepFunction: TypeAlias = Callable[[StepContext], "str | Awaitable[str | None] | None"]


@attrs.frozen
class FunctionStep:
    """A step that runs Python: ``func(context)``, plain, ``async`` or blocking.

    ``blocking=True`` runs a plain function in a worker thread (for blocking SDKs and
    CPU work); it is told to stop through its reporter (:class:`StepCancelled`).
    """

    name: str
    func: StepFunction
    blocking: bool = False
    expected_tokens: int = 100
    insights: tuple[str, ...] = attrs.field(default=(), converter=_texts)


Step: TypeAlias = PromptStep | FunctionStep

_FORMATTER = string.Formatter()


def _template_fields(step: PromptStep, earlier: Sequence[str], inputs: Sequence[str]) -> None:
    """Check ``step.prompt``'s fields (``ValueError`` naming the step and the field)."""
    where = f"step {step.name!r}"
    try:
        parsed = list(_FORMATTER.parse(step.prompt))
    except ValueError as exc:
        raise ValueError(f"{where}: bad prompt template: {exc}") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"{where}: {{{field}}} may not have a format spec or conversion")
        if field == "previous":
            if not earlier:
                raise ValueError(f"{where}: {{previous}} in the first step")
            continue
        root, _, name = field.partition(".")
        if root == "input" and name in inputs:
            continue
        if root == "steps" and name in earlier:
            continue
        raise ValueError(
            f"{where}: unknown template field {{{field}}}; use {{previous}}, "
            f"{{input.NAME}} (declared: {', '.join(inputs) or 'none'}) or {{steps.NAME}} "
            f"(earlier steps: {', '.join(earlier) or 'none'})"
        )


def _render(template: str, input: Mapping[str, str], outputs: Mapping[str, str]) -> str:
    """Fill a checked template; values are inserted as they are (never re-parsed)."""
    parts: list[str] = []
    previous = list(outputs.values())[-1] if outputs else ""
    for literal, field, _spec, _conversion in _FORMATTER.parse(template):
        parts.append(literal)
        if field is None:
            continue
        if field == "previous":
            parts.append(previous)
            continue
        root, _, name = field.partition(".")
        parts.append(input.get(name, "") if root == "input" else outputs[name])
    return "".join(parts)


@attrs.define(eq=False)
class _JobState:
    """One job's input and its steps' outputs so far, shared by its step sources."""

    input: Mapping[str, str]
    outputs: dict[str, str] = attrs.Factory(dict)


@attrs.frozen(eq=False)
class _PromptSource:
    """Renders the step's prompt from the job so far, then streams from the inner source."""

    step: PromptStep
    state: _JobState
    inner: TokenSource

    async def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        prompt = _render(self.step.prompt, self.state.input, self.state.outputs)
        text: list[str] = []
        async for piece in self.inner.stream(attrs.evolve(request, prompt=prompt)):
            if isinstance(piece, str):
                text.append(piece)
            yield piece
        self.state.outputs[self.step.name] = "".join(text)


@attrs.frozen(eq=False)
class _FunctionSource:
    """Runs the step's callable; what it reports is streamed as the step's tokens."""

    step: FunctionStep
    state: _JobState

    async def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        handoff = Handoff(asyncio.get_running_loop())
        reporter = Reporter(handoff.put)
        context = StepContext(dict(self.state.input), dict(self.state.outputs), reporter)

        async def call() -> None:
            try:
                if self.step.blocking:
                    result: Any = await run_in_own_thread(
                        self.step.func, context, f"step-{self.step.name}"
                    )
                else:
                    result = self.step.func(context)
                    if inspect.isawaitable(result):
                        result = await result
                if result is not None and not isinstance(result, str):
                    raise StepFailed(
                        f"step {self.step.name!r} returned {type(result).__name__}, "
                        "not a string or None"
                    )
                if result:
                    reporter.write(result)
                handoff.put(END_OF_PIECES)
            except Exception as exc:
                handoff.put(exc)

        task = asyncio.create_task(call(), name=f"step:{self.step.name}")
        text: list[str] = []
        try:
            while (item := await handoff.get()) is not None:
                if isinstance(item, str):
                    text.append(item)
                yield item
        finally:
            # First, so that a blocking step's next report raises StepCancelled.
            reporter.cancel()
            handoff.close()
            await cancel_and_wait(task)
        self.state.outputs[self.step.name] = "".join(text)


def _step_tuple(value: Iterable[Step]) -> tuple[Step, ...]:
    return tuple(value)


def _input_tuple(value: Iterable[Input]) -> tuple[Input, ...]:
    return tuple(value)


def _check_steps(steps: Sequence[Step], inputs: Sequence[Input]) -> None:
    if not steps:
        raise ValueError("a pipeline needs at least one step")
    input_names = [field.name for field in inputs]
    if len(set(input_names)) != len(input_names):
        raise ValueError(f"input names must be unique: {', '.join(input_names)}")
    earlier: list[str] = []
    for step in steps:
        if not isinstance(step, PromptStep | FunctionStep):
            raise ValueError(f"{step!r} is not a PromptStep or a FunctionStep")
        if not step.name.strip() or step.name in earlier:
            raise ValueError(f"step names must be unique and not empty: {step.name!r}")
        if step.expected_tokens < 1:
            raise ValueError(f"step {step.name!r}: expected_tokens must be at least 1")
        if isinstance(step, PromptStep):
            _template_fields(step, earlier, input_names)
        elif not callable(step.func):
            raise ValueError(f"step {step.name!r}: func is not callable")
        earlier.append(step.name)


@attrs.frozen
class StepPipeline:
    """A user pipeline: declared ``inputs`` and ``steps`` run in order (see the module doc).

    ``source`` feeds the prompt steps; left ``None``, the app binds the configured LLM
    provider at registration (:func:`bind_source`), else the steps use ``simulated``.
    The job's result is ``{"steps": {name: output}, "output": last output}``.
    """

    name: str
    steps: tuple[Step, ...] = attrs.field(converter=_step_tuple)
    inputs: tuple[Input, ...] = attrs.field(default=(), converter=_input_tuple)
    source: TokenSource | None = None
    simulated: SimulatedTokenSource = attrs.Factory(SimulatedTokenSource)
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("a pipeline needs a name")
        try:
            _check_steps(self.steps, self.inputs)
        except ValueError as exc:
            raise ValueError(f"pipeline {self.name!r}: {exc}") from None

    def with_source(self, source: TokenSource) -> StepPipeline:
        """This pipeline with its prompt steps fed by ``source``."""
        return attrs.evolve(self, source=source)

    def _input(self, input: Mapping[str, Any]) -> dict[str, str]:
        declared = {field.name: field for field in self.inputs}
        for key in sorted(set(input) - set(declared)):
            raise InvalidField(
                f"input.{key}",
                f"unknown input; pipeline {self.name!r} takes: {', '.join(declared) or 'none'}",
            )
        values: dict[str, str] = {}
        for field in self.inputs:
            value = input.get(field.name)
            if value is None:
                if field.required:
                    raise InvalidField(f"input.{field.name}", "required")
                continue
            if not isinstance(value, str):
                raise InvalidField(f"input.{field.name}", "must be a string")
            if field.required and not value.strip():
                raise InvalidField(f"input.{field.name}", "must not be empty")
            if len(value) > field.max_chars:
                raise InvalidField(f"input.{field.name}", f"at most {field.max_chars} characters")
            values[field.name] = value
        return values

    def plan(self, input: Mapping[str, Any], options: Mapping[str, Any]) -> JobPlan:
        values = self._input(input)
        for key in sorted(options):
            raise InvalidField(f"options.{key}", f"unknown option; {self.name!r} takes none")
        state = _JobState(values)
        simulated = self.source is None
        inner: TokenSource = self.simulated if self.source is None else self.source
        plans: list[StepPlan] = []
        for step in self.steps:
            source: TokenSource
            if isinstance(step, PromptStep):
                source = _PromptSource(step, state, inner)
                max_tokens = step.expected_tokens if simulated else (step.max_tokens or 0)
                request = TokenRequest(
                    prompt=step.prompt,
                    max_tokens=max_tokens,
                    step=step.name,
                    system=step.system,
                    temperature=step.temperature,
                )
            else:
                source = _FunctionSource(step, state)
                request = TokenRequest(prompt="", max_tokens=step.expected_tokens, step=step.name)
            plans.append(StepPlan(step.name, step.expected_tokens, source, request, step.insights))
        return JobPlan(tuple(plans))

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        by_name = {step.name: text for step, text in zip(plan.steps, outputs, strict=True)}
        return {"steps": by_name, "output": outputs[-1] if outputs else ""}


def bind_source(pipeline: Pipeline, source: TokenSource) -> Pipeline:
    """``pipeline`` with ``source`` feeding its prompt steps, unless it chose its own."""
    if isinstance(pipeline, StepPipeline) and pipeline.source is None:
        return pipeline.with_source(source)
    return pipeline
