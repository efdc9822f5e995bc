"""Runs one job's plan: streams each step's tokens and emits the job's events.

The runner owns the producer side of the cadence: ``chunk`` events every
``chunk_chars`` characters or ``chunk_interval_s`` seconds, ``step_progress`` every
``progress_interval_s`` (and with every chunk when the strategy asks for it), and the
step's insight lines. Tokens are read by a pump task into a queue, so the emission
deadlines are kept even while the token source is silent. Each text piece counts as one
token until the source yields a :class:`~app.jobs.tokens.TokenCount` (a provider's
``usage``), which replaces the count; progress and ``chunk.tokens`` follow it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from app.core.events import (
    AnyEvent,
    ChunkEvent,
    DoneEvent,
    ErrorEvent,
    InsightEvent,
    JobStartedEvent,
    StepCompletedEvent,
    StepProgressEvent,
    StepStartedEvent,
)
from app.core.tasks import cancel_and_wait
from app.jobs.pipelines import JobPlan, Pipeline, StepPlan
from app.jobs.progress import ProgressEstimator
from app.jobs.tokens import TokenCount
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
    """Emits one step's events according to the cadence."""

    plan: StepPlan
    index: int
    total: int
    cadence: Cadence
    estimator: ProgressEstimator
    publish: Publish
    text: list[str] = attrs.Factory(list)
    _pending: list[str] = attrs.Factory(list)
    _pending_chars: int = 0
    #: The step's token count when the pending text began (``chunk.tokens`` is the difference).
    _chunk_base: int = 0
    _insights_sent: int = 0
    _progress_sent: bool = False

    async def _chunk(self, now: float) -> None:
        text = "".join(self._pending)
        tokens = max(self.estimator.tokens - self._chunk_base, 0)
        await self.publish(ChunkEvent(self.plan.name, text, tokens))
        self._pending, self._pending_chars = [], 0
        self._chunk_base = self.estimator.tokens
        if self.cadence.progress_with_chunks:
            await self._progress(now)

    async def _progress(self, now: float) -> None:
        self._progress_sent = True
        est = self.estimator.estimate(now)
        await self.publish(
            StepProgressEvent(
                self.plan.name, est.pct, est.overall_pct, est.tokens, est.eta_s, est.job_eta_s
            )
        )
        # Later insights are spread evenly over the step's progress.
        later = self.plan.insights[1:]
        due = min(int(est.pct / 100 * (len(later) + 1)), len(later))
        while self._insights_sent < due:
            await self.publish(InsightEvent(later[self._insights_sent], self.plan.name))
            self._insights_sent += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.publish(StepStartedEvent(self.plan.name, self.index, self.total))
        if self.plan.insights:
            await self.publish(InsightEvent(self.plan.insights[0], self.plan.name))
        self.estimator.start_step(self.index, started)
        queue: asyncio.Queue[object] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(queue), name=f"tokens:{self.plan.name}")
        try:
            await self._consume(queue, loop, started)
        finally:
            await cancel_and_wait(pump)
        now = loop.time()
        if self._pending:
            await self._chunk(now)
        if not self._progress_sent:
            # A step shorter than its chunk and progress intervals still reports progress.
            await self._progress(now)
        overall = self.estimator.complete_step()
        await self.publish(
            StepCompletedEvent(
                self.plan.name, self.index, overall, self.estimator.tokens, round(now - started, 3)
            )
        )

    async def _pump(self, queue: asyncio.Queue[object]) -> None:
        try:
            async for token in self.plan.source.stream(self.plan.request):
                queue.put_nowait(token)
        except Exception as exc:
            queue.put_nowait(exc)
        else:
            queue.put_nowait(_END)

    async def _consume(
        self, queue: asyncio.Queue[object], loop: asyncio.AbstractEventLoop, started: float
    ) -> None:
        cadence = self.cadence
        last_chunk_at = started
        # The first estimate goes out with the step's first chunk, then every interval.
        next_progress_at = started + cadence.progress_interval_s
        first_progress_sent = cadence.progress_with_chunks
        while True:
            deadline = next_progress_at
            if self._pending:
                deadline = min(deadline, last_chunk_at + cadence.chunk_interval_s)
            items: list[object] = []
            try:
                async with asyncio.timeout_at(deadline):
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
                    if self._pending:
                        # The text that did arrive goes out before the step fails.
                        await self._chunk(loop.time())
                    raise item
                elif isinstance(item, TokenCount):
                    self.estimator.set_tokens(item.tokens)
                else:
                    token = str(item)
                    self._pending.append(token)
                    self._pending_chars += len(token)
                    self.text.append(token)
                    self.estimator.add_tokens(1)
            now = loop.time()
            if ended:
                return
            if self._pending and (
                self._pending_chars >= cadence.chunk_chars
                or now - last_chunk_at >= cadence.chunk_interval_s
            ):
                await self._chunk(now)
                last_chunk_at = now
                if not first_progress_sent:
                    first_progress_sent = True
                    await self._progress(now)
                    next_progress_at = now + cadence.progress_interval_s
            if now >= next_progress_at:
                await self._progress(now)
                next_progress_at = now + cadence.progress_interval_s


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
    estimator = ProgressEstimator([step.expected_tokens for step in plan.steps])
    names = tuple(step.name for step in plan.steps)
    outputs: list[str] = []
    current: str | None = None
    try:
        # Inside the try: a cancel that lands while the first event is being published
        # (a bus that waits on a network) still ends the job with `done`.
        await publish(JobStartedEvent(names, strategy_name))
        for index, step in enumerate(plan.steps):
            current = step.name
            run = _StepRun(step, index, len(plan.steps), cadence, estimator, publish)
            await run.run()
            outputs.append("".join(run.text))
        result: Any = pipeline.result(plan, outputs)
        # Inside the try: a result that cannot be encoded fails the job like any error.
        await publish(DoneEvent("succeeded", 100.0, result=result))
    except asyncio.CancelledError:
        reason = stop_reason()
        if reason is None:
            await publish(DoneEvent("cancelled", estimator.overall_pct, error="cancelled"))
        else:
            await publish(ErrorEvent(reason, current))
            await publish(DoneEvent("failed", estimator.overall_pct, error=reason))
        raise
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        await publish(ErrorEvent(message, current))
        await publish(DoneEvent("failed", estimator.overall_pct, error=message))
        return JobOutcome("failed", message)
    return JobOutcome("succeeded")
