"""Pipelines: what a job does, as an ordered list of token-streaming steps.

A :class:`Pipeline` validates a job's ``input`` and ``options`` and returns a
:class:`JobPlan`; the runner (``app.jobs.runner``) executes the plan and emits the events.
Users add their own with ``init_app(settings, pipelines=[...])``. The built-in ``demo``
pipeline simulates a multi-step LLM job with :class:`~app.jobs.tokens.SimulatedTokenSource`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import attrs

from app.core.errors import InvalidField
from app.jobs.tokens import Piece, SimulatedTokenSource, TokenRequest, TokenSource

__all__ = ["DemoPipeline", "JobPlan", "Pipeline", "StepFailed", "StepPlan"]


class StepFailed(Exception):
    """A step's work failed; the job ends as ``failed`` with this message."""


@attrs.frozen
class StepPlan:
    """One step: its name, how many tokens it is expected to produce, and where from.

    ``insights`` are status lines: the first is sent when the step starts, the others
    spread evenly over its progress.
    """

    name: str
    expected_tokens: int
    source: TokenSource
    request: TokenRequest
    insights: tuple[str, ...] = ()


@attrs.frozen
class JobPlan:
    """The steps of one job, in order."""

    steps: tuple[StepPlan, ...]


class Pipeline(Protocol):
    """A named kind of job."""

    @property
    def name(self) -> str:
        """The name jobs use (``"pipeline"`` in ``POST /api/jobs``)."""
        ...

    def plan(self, input: Mapping[str, Any], options: Mapping[str, Any]) -> JobPlan:
        """Validate ``input`` and ``options`` (raise ``InvalidField``) and plan the steps."""
        ...

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        """The job's JSON result from each step's generated text."""
        ...


DEFAULT_STEPS = (
    ("analyze", "Analyzing the job description..."),
    ("match", "Matching experience to the role..."),
    ("tailor", "Tailoring professional summary..."),
    ("polish", "Polishing the final wording..."),
)
MAX_STEPS = 50
#: Bounds one job's memory (its text is kept in its history and result until it expires).
MAX_JOB_TOKENS = 200_000
_DEMO_OPTIONS = ("steps", "tokens_per_step", "tokens_per_second", "seed", "fail_at_step")


@attrs.frozen
class _FailingSource:
    """Streams half of the inner source's tokens, then raises (``fail_at_step``)."""

    inner: TokenSource
    after_tokens: int

    async def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        count = 0
        async for token in self.inner.stream(request):
            if count >= self.after_tokens:
                break
            count += 1
            yield token
        raise StepFailed(f"step {request.step!r} failed (simulated by fail_at_step)")


def _int_option(options: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(f"options.{name}", f"must be an integer from {low} to {high}")
    return value


@attrs.frozen
class DemoPipeline:
    """Simulates a multi-step LLM job; see the contract for its ``options``."""

    name: ClassVar[str] = "demo"

    def _steps(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        raw = options.get("steps", len(DEFAULT_STEPS))
        if isinstance(raw, int) and not isinstance(raw, bool):
            if not 1 <= raw <= MAX_STEPS:
                raise InvalidField("options.steps", f"a count must be from 1 to {MAX_STEPS}")
            return [
                DEFAULT_STEPS[i]
                if i < len(DEFAULT_STEPS)
                else (f"step-{i + 1}", f"Working on step {i + 1}...")
                for i in range(raw)
            ]
        if isinstance(raw, list) and 1 <= len(raw) <= MAX_STEPS:
            names_ok = all(isinstance(n, str) and 0 < len(n.strip()) <= 100 for n in raw)
            if names_ok and len({n.strip() for n in raw}) == len(raw):
                return [(n.strip(), f"Working on {n.strip()}...") for n in raw]
        raise InvalidField(
            "options.steps",
            f"must be a step count (1-{MAX_STEPS}) or a list of 1-{MAX_STEPS} "
            "unique non-empty names",
        )

    def plan(self, input: Mapping[str, Any], options: Mapping[str, Any]) -> JobPlan:
        unknown = sorted(set(options) - set(_DEMO_OPTIONS))
        if unknown:
            raise InvalidField(
                f"options.{unknown[0]}", f"unknown option; allowed: {', '.join(_DEMO_OPTIONS)}"
            )
        steps = self._steps(options)
        tokens = _int_option(options, "tokens_per_step", 400, 1, 100_000)
        if tokens * len(steps) > MAX_JOB_TOKENS:
            raise InvalidField(
                "options.tokens_per_step",
                f"steps x tokens_per_step is {tokens * len(steps)}; at most {MAX_JOB_TOKENS}",
            )
        rate = options.get("tokens_per_second", 80)
        is_number = isinstance(rate, int | float) and not isinstance(rate, bool)
        if not is_number or not 0.1 <= rate <= 100_000:
            raise InvalidField("options.tokens_per_second", "must be a number from 0.1 to 100000")
        seed = options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int | str):
            raise InvalidField("options.seed", "must be an integer or a string")
        fail_at = options.get("fail_at_step")
        if fail_at is not None:
            fail_at = _int_option(options, "fail_at_step", 0, 0, len(steps) - 1)
        source: TokenSource = SimulatedTokenSource(seed=seed, tokens_per_second=float(rate))
        prompt = str(input.get("prompt", "")) if input else ""
        plans = []
        for i, (name, insight) in enumerate(steps):
            step_source = _FailingSource(source, tokens // 2) if i == fail_at else source
            plans.append(
                StepPlan(
                    name=name,
                    expected_tokens=tokens,
                    source=step_source,
                    request=TokenRequest(prompt=prompt, max_tokens=tokens, step=name),
                    insights=(insight, f"{name}: halfway there..."),
                )
            )
        return JobPlan(tuple(plans))

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        return {
            "steps": {step.name: text for step, text in zip(plan.steps, outputs, strict=True)},
            "tokens": sum(len(text.split()) for text in outputs),
        }
