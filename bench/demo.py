"""What the fan-out comparisons (``bench.anchor``, ``bench.floor``) share: the demo job.

Each starts the scenario's job with Flushline's own runner, so that every event has the
type, size, cadence and ``ts`` of Flushline's job; only how the events reach the streams
differs between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from app.core.events import AnyEvent
from app.core.settings import Settings
from app.jobs.pipelines import DemoPipeline
from app.jobs.runner import JobOutcome, run_job
from strategies import build_strategy

__all__ = ["start_demo_job"]


def start_demo_job(
    body: Mapping[str, Any],
    settings: Settings,
    publish: Callable[[AnyEvent], Awaitable[object]],
) -> asyncio.Task[JobOutcome]:
    """Run the demo job a ``POST /api/jobs`` ``body`` asks for, handing each event to
    ``publish``; the task runs it (the caller keeps it, and cancels it at shutdown)."""
    strategy = build_strategy(body.get("strategy", "none"), settings.tuning())
    pipeline = DemoPipeline()
    plan = pipeline.plan({}, body.get("options", {}))
    return asyncio.create_task(run_job(plan, pipeline, strategy.name, strategy.cadence, publish))
