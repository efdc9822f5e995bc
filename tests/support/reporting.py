"""A blocking worker that reports its progress on a fixed beat, and what a watcher saw of it.

For the "progress as it is reported" tests and ``bench.progress_cadence``: a pipeline
whose one blocking :class:`~app.jobs.steps.FunctionStep` calls ``report.progress(pct)``
every ``interval_s`` and records when (``time.time()``, the clock of the events' ``ts``),
and the matching of those reports against the ``step_progress`` events a stream delivered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping

import attrs

from app.jobs.pipelines import Pipeline
from app.jobs.steps import FunctionStep, StepContext, StepPipeline
from tests.support.paths import serve
from tests.support.sse_client import StreamRecord

__all__ = ["Report", "ReportingWorker", "report_delays", "serve_pipelines"]


@attrs.frozen
class Report:
    """One ``report.progress(pct)`` call: when, and the value."""

    at: float
    pct: float


@attrs.define
class ReportingWorker:
    """A pipeline named ``name``: one blocking step reporting ``pcts`` every ``interval_s``."""

    name: str
    pcts: tuple[float, ...] = tuple(float(10 * i) for i in range(1, 9))
    interval_s: float = 0.5
    reports: list[Report] = attrs.Factory(list)

    def work(self, ctx: StepContext) -> str:
        """The step: sleep, report, repeat; the reports are recorded just before each call."""
        for pct in self.pcts:
            time.sleep(self.interval_s)
            self.reports.append(Report(time.time(), pct))
            ctx.report.progress(pct)
        time.sleep(self.interval_s)
        return "done"

    def pipeline(self) -> StepPipeline:
        """The pipeline to register (``init_app(..., pipelines=[...])``)."""
        step = FunctionStep("work", self.work, blocking=True, expected_tokens=100)
        return StepPipeline(self.name, (step,))


def report_delays(reports: list[Report], record: StreamRecord) -> list[float | None]:
    """For each report: seconds until the watcher read a ``step_progress`` showing it (or
    a later value it was merged into, ``step_completed``'s 100 included), None if never."""
    shown = [
        (arrival.at, float(arrival.data["pct"]))
        for arrival in record.events
        if arrival.message.event in ("step_progress", "step_completed")
    ]
    delays: list[float | None] = []
    for report in reports:
        seen = [at for at, pct in shown if pct >= report.pct and at >= report.at]
        delays.append(min(seen) - report.at if seen else None)
    return delays


def serve_pipelines(
    env: Mapping[str, str], pipelines: Iterable[Pipeline]
) -> contextlib.AbstractAsyncContextManager[str]:
    """Run the app with ``pipelines`` registered on a free port; yield its base URL."""
    return serve(env, pipelines)
