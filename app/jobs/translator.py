"""Turns an external job's producer events into Flushline's events, through its emitter.

The job's :class:`~app.jobs.emitter.JobEmitter` is the one the built-in runner uses, so
``tokens`` feed the same token-based progress and ETA (``expected_tokens`` declared or
not), ``progress`` sets the step's percentage, and chunks and ``step_progress`` follow
the job's strategy cadence. Within a batch the cadence applies as events arrive; at the
end of each batch the pending text goes out as a chunk (the producer's batching window
is its cadence: text never waits for the next batch, which may be a while). Consecutive
``tokens`` events of a batch count as one report: they arrived at the same instant.

Steps run in their declared order, one at a time. A translation is pure: it works on a
copy of the state and raises ``InvalidField`` naming the event to blame
(``events[3].step``), so a batch that fails publishes nothing. The state is JSON
(``ProducerState.emitter``), so any instance continues the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from app.core.errors import InvalidField
from app.core.events import AnyEvent, DoneEvent, ErrorEvent, JobStartedEvent
from app.jobs.emitter import EmitterStep, JobEmitter
from app.jobs.external import (
    Failed,
    Heartbeat,
    Insight,
    ProducerEvent,
    Progress,
    StepCompleted,
    StepDecl,
    StepStarted,
    Succeeded,
    Tokens,
)
from app.jobs.progress import STEP_CAP_PCT
from strategies.base import Cadence

__all__ = ["Translation", "Translator"]


@attrs.frozen
class Translation:
    """What one batch becomes: the events to publish, and the job's end if it ended."""

    events: list[AnyEvent]
    #: ``succeeded`` or ``failed`` when the batch ended the job.
    final_status: str | None
    #: The translator's state after the batch (:meth:`Translator.to_json`).
    state: dict[str, Any]
    #: When the cadence wants :meth:`Translator.due` called if no batch comes first (a
    #: visible progress change held to the end of its window; a keep-alive), or None.
    deadline: float | None = None


@attrs.define
class Translator:
    """One external job's translation state: started, the running step, its emitter."""

    emitter: JobEmitter
    strategy: str
    #: ``job_started`` has been published (the first accepted batch does).
    started: bool = False
    #: A step has started and not completed.
    running: bool = False

    @classmethod
    def new(cls, steps: Sequence[StepDecl], strategy: str, cadence: Cadence) -> Translator:
        """The translator of a new job with these declared steps."""
        emitter = JobEmitter.for_steps(
            [EmitterStep(step.name, step.expected_tokens) for step in steps], cadence
        )
        return cls(emitter, strategy)

    def to_json(self) -> dict[str, Any]:
        """The state as JSON (the cadence is the job's strategy's: not saved)."""
        return {
            "started": self.started,
            "running": self.running,
            "strategy": self.strategy,
            "emitter": self.emitter.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], cadence: Cadence) -> Translator:
        """The translator :meth:`to_json` saved, with the job's ``cadence``."""
        return cls(
            JobEmitter.from_json(data["emitter"], cadence),
            data["strategy"],
            started=data["started"],
            running=data["running"],
        )

    @property
    def overall_pct(self) -> float:
        """The job's overall percentage as last published."""
        return self.emitter.overall_pct

    @property
    def current_step(self) -> str | None:
        """The running step's name, if a step runs."""
        return self.emitter.step.name if self.running else None

    def _names(self) -> list[str]:
        return [step.name for step in self.emitter.steps]

    def _running_step(self, step: str, field: str) -> None:
        if self.running and step == self.emitter.step.name:
            return
        if step not in self._names():
            raise InvalidField(field, f"{step!r} is not a declared step")
        now = f"{self.emitter.step.name!r} is running" if self.running else "no step is running"
        raise InvalidField(field, f"step {step!r} is not running ({now})")

    def _start(self, step: str, field: str, now: float) -> list[AnyEvent]:
        names = self._names()
        if step not in names:
            raise InvalidField(field, f"{step!r} is not a declared step ({', '.join(names)})")
        if self.running:
            raise InvalidField(
                field, f"step {self.emitter.step.name!r} is still running: complete it first"
            )
        expected = self.emitter.index + 1
        if names.index(step) != expected:
            want = repr(names[expected]) if expected < len(names) else "none (all have run)"
            raise InvalidField(field, f"steps run in their declared order: the next is {want}")
        self.running = True
        return self.emitter.start_step(expected, now)

    def translate(self, events: Sequence[ProducerEvent], now: float) -> Translation:
        """The Flushline events of one batch (``now``: wall-clock seconds).

        Call on a fresh translator (:meth:`from_json`) per batch: it raises on the first
        event the job's state refuses, and its state is then not to be kept.
        """
        out: list[AnyEvent] = []
        if not self.started:
            self.started = True
            out.append(JobStartedEvent(tuple(self._names()), self.strategy))
        final: str | None = None
        # Consecutive tokens of the running step, not yet given to the emitter: a batch
        # arrives at one instant, so they count as one report (one chunk, one check).
        count, texts = 0, []
        for i, event in enumerate(events):
            where = f"events[{i}]"
            if final is not None:
                raise InvalidField(where, f"comes after the event that ended the job ({final})")
            if isinstance(event, Tokens):
                self._running_step(event.step, f"{where}.step")
                count += event.count
                if event.text:
                    texts.append(event.text)
                continue
            if count or texts:
                out += self.emitter.tokens(count, "".join(texts), now)
                count, texts = 0, []
            match event:
                case StepStarted(step=step):
                    out += self._start(step, f"{where}.step", now)
                case Progress(step=step, pct=pct):
                    self._running_step(step, f"{where}.step")
                    # 100 belongs to step_completed: until then a step stays below it.
                    out += self.emitter.progress(min(pct, STEP_CAP_PCT), now)
                case Insight(text=text, step=step):
                    if step is not None:
                        self._running_step(step, f"{where}.step")
                    out += self.emitter.insight(text)
                case StepCompleted(step=step):
                    self._running_step(step, f"{where}.step")
                    out += self.emitter.complete_step(now)
                    self.running = False
                case Succeeded(result=result):
                    if self.running:
                        out += self.emitter.complete_step(now)
                        self.running = False
                    out.append(DoneEvent("succeeded", 100.0, result=result))
                    final = "succeeded"
                case Failed(error=error):
                    out += self.ending(error, now)
                    final = "failed"
                case Heartbeat():
                    pass
        if count or texts:
            out += self.emitter.tokens(count, "".join(texts), now)
        if final is None and self.running:
            # The batch is the producer's cadence: its text goes out now, not next batch.
            out += self.emitter.drain(now)
        return Translation(out, final, self.to_json(), self.deadline())

    def deadline(self) -> float | None:
        """When :meth:`due` is next wanted (wall-clock seconds), while a step runs."""
        return self.emitter.deadline() if self.running else None

    def due(self, now: float) -> list[AnyEvent]:
        """What the cadence makes due at ``now`` between batches (a held progress value)."""
        return self.emitter.due(now) if self.running else []

    def ending(self, error: str, now: float, code: str | None = None) -> list[AnyEvent]:
        """``error`` and ``done`` failed with ``error`` (a producer's failure, or its loss,
        whose ``code`` the error event carries)."""
        # The text that did arrive goes out before the step fails.
        out = self.emitter.drain(now) if self.running else []
        return [
            *out,
            ErrorEvent(error, self.current_step, code),
            DoneEvent("failed", self.overall_pct, error=error),
        ]
