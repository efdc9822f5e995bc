"""Runs one job's plan: streams each step's tokens and emits the job's events.

The cadence (when ``chunk`` and ``step_progress`` go out, and the step's insight lines)
is the job's :class:`~app.jobs.emitter.JobEmitter`'s, the same rules as for jobs
published from elsewhere; the runner feeds it and keeps its deadlines. Tokens are read
by a pump task into a queue, so the emission deadlines are kept even while the token
source is silent. Each text piece counts as one token until the source yields a
:class:`~app.jobs.tokens.TokenCount` (a provider's ``usage``), which replaces the count;
progress and ``chunk.tokens`` follow it. A :class:`~app.jobs.tokens.ReportedProgress`
sets the step's percentage, a :class:`~app.jobs.tokens.ReportedInsight` is sent as an
``insight`` at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from app.core.events import AnyEvent, DoneEvent, ErrorEvent, JobStartedEvent
from app.core.tasks import cancel_and_wait
from app.jobs.emitter import EmitterStep, JobEmitter
from app.jobs.pipelines import JobPlan, Pipeline, StepPlan
from app.jobs.tokens import MAX_PENDING_PIECES, ReportedInsight, ReportedProgress, TokenCount
from strategies import Cadence

__all__ = ["JobOutcome", "run_job"]

Publish = Callable[[AnyEvent], Awaitable[object]]

_END = object()


@attrs.frozen
class JobOutcome:
    """How a job ended (for the canonical log line)."""

    status: str
    error: str | None = None


@attrs.define
class _StepRun:
    """Runs one step: pumps its token source into a queue and feeds the job's emitter."""

    plan: StepPlan
    index: int
    emitter: JobEmitter
    publish: Publish
    text: list[str] = attrs.Factory(list)

    async def _send(self, events: list[AnyEvent]) -> None:
        for event in events:
            await self.publish(event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._send(self.emitter.start_step(self.index, loop.time()))
        # Bounded, so that a slow publish holds the source back (down to a worker
        # thread's hand-off) instead of queueing its tokens here.
        queue: asyncio.Queue[object] = asyncio.Queue(MAX_PENDING_PIECES)
        pump = asyncio.create_task(self._pump(queue), name=f"tokens:{self.plan.name}")
        try:
            await self._consume(queue, loop)
        finally:
            await cancel_and_wait(pump)
        await self._send(self.emitter.complete_step(loop.time()))

    async def _pump(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for token in self.plan.source.stream(self.plan.request):
                await queue.put(token)
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(_END)

    async def _consume(self, queue: asyncio.Queue[object], loop: asyncio.AbstractEventLoop) -> None:
        emitter = self.emitter
        while True:
            items: list[object] = []
            try:
                async with asyncio.timeout_at(emitter.deadline()):
                    items.append(await queue.get())
            except TimeoutError:
                pass
            while not queue.empty():
                items.append(queue.get_nowait())
            ended = False
            for item in items:
                if item is _END:
                    ended = True
                elif isinstance(item, BaseException):
                    # The text that did arrive goes out before the step fails.
                    await self._send(emitter.drain(loop.time()))
                    raise item
                elif isinstance(item, TokenCount):
                    emitter.set_tokens(item.tokens)
                elif isinstance(item, ReportedProgress):
                    emitter.set_progress(item.pct)
                elif isinstance(item, ReportedInsight):
                    await self._send(emitter.insight(item.text))
                else:
                    token = str(item)
                    self.text.append(token)
                    emitter.add_tokens(1, token)
            if ended:
                return
            await self._send(emitter.due(loop.time()))


async def run_job(
    plan: JobPlan,
    pipeline: Pipeline,
    strategy_name: str,
    cadence: Cadence,
    publish: Publish,
    stop_reason: Callable[[], str | None] = lambda: None,
) -> JobOutcome:
    """Run ``plan`` to its end, publishing every event; the last one is always ``done``.

    Cancellation publishes ``done`` with status ``cancelled`` and then propagates; when
    ``stop_reason()`` gives a reason (the service is stopping), it publishes ``error`` and
    ``done`` status ``failed`` with that reason instead.
    """
    emitter = JobEmitter.for_steps(
        [EmitterStep(step.name, step.expected_tokens, step.insights) for step in plan.steps],
        cadence,
    )
    names = tuple(step.name for step in plan.steps)
    outputs: list[str] = []
    current: str | None = None
    try:
        # Inside the try: a cancel that lands while the first event is being published
        # (a bus that waits on a network) still ends the job with `done`.
        await publish(JobStartedEvent(names, strategy_name))
        for index, step in enumerate(plan.steps):
            current = step.name
            run = _StepRun(step, index, emitter, publish)
            await run.run()
            outputs.append("".join(run.text))
        result: Any = pipeline.result(plan, outputs)
        # Inside the try: a result that cannot be encoded fails the job like any error.
        await publish(DoneEvent("succeeded", 100.0, result=result))
    except asyncio.CancelledError:
        reason = stop_reason()
        if reason is None:
            await publish(DoneEvent("cancelled", emitter.overall_pct, error="cancelled"))
        else:
            await publish(ErrorEvent(reason, current))
            await publish(DoneEvent("failed", emitter.overall_pct, error=reason))
        raise
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        await publish(ErrorEvent(message, current))
        await publish(DoneEvent("failed", emitter.overall_pct, error=message))
        return JobOutcome("failed", message)
    return JobOutcome("succeeded")
