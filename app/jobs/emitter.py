"""A job's emitter: turns what its steps report into Flushline's events, on the cadence.

One set of rules for every producer: the built-in runner (``app.jobs.runner``) feeds it
what a step's token source yields, the publish API feeds it what an external producer
posts. The emitter never waits and never publishes by itself: each call returns the
events due now, in order, and :meth:`JobEmitter.deadline` says when to call
:meth:`JobEmitter.due` next if nothing else happens before.

Calls, per step (``now`` is seconds on one steady clock, the same for every call on
one emitter: the loop's time in a runner; wall-clock time where the state moves between
instances)::

    start_step(index, now)        -> [step_started, insight (the step's first, if any)]
    tokens(count, text, now)      -> text and tokens reported; [chunk, step_progress] if due
    set_tokens(total, now)        -> the source's own count (a provider's ``usage``)
    progress(pct, now)            -> an explicit percentage; [step_progress] if due
    insight(text)                 -> [insight]
    due(now)                      -> what the cadence makes due at ``now`` (timers)
    drain(now)                    -> the pending text as a chunk (before a step fails)
    complete_step(now)            -> [chunk?, step_progress?, step_completed]

``add_tokens``, ``set_tokens`` and ``set_progress`` only record (a batch of reports
then emits once, from :meth:`JobEmitter.due`).

The cadence (:class:`~strategies.base.Cadence`):

- ``chunk``: pending text goes out once it holds ``chunk_chars`` characters, or
  ``chunk_interval_s`` after the previous chunk (or the step's start); its ``tokens``
  are the tokens counted since the previous chunk.
- ``step_progress`` as the step reports it: a visible change (the step's percentage
  up by ``progress_step_pct`` points, or an explicit percentage) at once, or at the end
  of the ``progress_window_s`` that began with the previous ``step_progress`` (changes
  within a window merge into the latest value: none is held longer than the window);
  an invisible one (tokens alone) at most every ``progress_interval_s``, a keep-alive;
  also with the step's first chunk, and with every chunk when ``progress_with_chunks``.
  Insights declared for the step (all but the first) are spread evenly over its
  progress and go out after the ``step_progress`` that passes their share. See
  :class:`~strategies.base.Cadence` for why the window is 90% of the latency budget.

The state is small (numbers, the pending text, the declared steps):
:meth:`JobEmitter.to_json` and :meth:`JobEmitter.from_json` let another instance carry
on where this one stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from app.core.events import (
    AnyEvent,
    ChunkEvent,
    InsightEvent,
    StepCompletedEvent,
    StepProgressEvent,
    StepStartedEvent,
)
from app.jobs.progress import ProgressEstimator
from strategies.base import Cadence

__all__ = ["EmitterStep", "JobEmitter"]


def _texts(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class EmitterStep:
    """A step as the emitter knows it: its name, expected tokens (None: unknown) and
    declared insights (the first goes out when it starts, the others over its progress)."""

    name: str
    expected_tokens: int | None = None
    insights: tuple[str, ...] = attrs.field(default=(), converter=_texts)


def _steps(value: Iterable[EmitterStep]) -> tuple[EmitterStep, ...]:
    return tuple(value)


@attrs.define
class JobEmitter:
    """Emits one job's step events by the cadence's rules (see the module doc)."""

    steps: tuple[EmitterStep, ...] = attrs.field(converter=_steps)
    cadence: Cadence
    estimator: ProgressEstimator = attrs.field()
    index: int = -1
    started_at: float = 0.0
    #: Text reported and not yet sent as a chunk, and its length.
    pending: list[str] = attrs.Factory(list)
    pending_chars: int = 0
    #: The step's token count when the pending text began (``chunk.tokens`` is the difference).
    chunk_base: int = 0
    last_chunk_at: float = 0.0
    #: When the last ``step_progress`` of this step went out (None: none yet).
    last_progress_at: float | None = None
    #: The step's percentage and tokens in the last ``step_progress``.
    sent_pct: float = 0.0
    sent_tokens: int = 0
    #: When a visible change recorded since the last ``step_progress`` is due.
    progress_due_at: float | None = None
    first_progress_sent: bool = False
    insights_sent: int = 0

    @estimator.default
    def _estimator(self) -> ProgressEstimator:
        return ProgressEstimator([step.expected_tokens for step in self.steps])

    @classmethod
    def for_steps(
        cls, steps: Sequence[tuple[str, int | None]] | Sequence[EmitterStep], cadence: Cadence
    ) -> JobEmitter:
        """An emitter for ``steps``: :class:`EmitterStep` s or ``(name, expected_tokens)``."""
        return cls(
            [s if isinstance(s, EmitterStep) else EmitterStep(s[0], s[1]) for s in steps],
            cadence,
        )

    @property
    def step(self) -> EmitterStep:
        """The current step (after :meth:`start_step`)."""
        return self.steps[self.index]

    @property
    def overall_pct(self) -> float:
        """The job's overall percentage as last sent (for ``done``)."""
        return self.estimator.overall_pct

    @property
    def tokens_counted(self) -> int:
        """Tokens counted in the current step."""
        return self.estimator.tokens

    # --- recording -------------------------------------------------------------------

    def add_tokens(self, count: int, text: str = "") -> None:
        """Record ``count`` more tokens and ``text`` (either may be 0 / empty)."""
        self.estimator.add_tokens(count)
        if text:
            self.pending.append(text)
            self.pending_chars += len(text)

    def set_tokens(self, total: int) -> None:
        """Record the step's own token count (replaces the counted one)."""
        self.estimator.set_tokens(total)

    def set_progress(self, pct: float) -> None:
        """Record an explicit percentage (0-100) for the step."""
        self.estimator.set_pct(pct)

    # --- emitting --------------------------------------------------------------------

    def start_step(self, index: int, now: float) -> list[AnyEvent]:
        """Begin step ``index``: ``step_started`` and the step's first insight, if any."""
        self.index, self.started_at = index, now
        self.estimator.start_step(index, now)
        self.pending, self.pending_chars, self.chunk_base, self.insights_sent = [], 0, 0, 0
        self.last_chunk_at = now
        self.last_progress_at = self.progress_due_at = None
        self.sent_pct, self.sent_tokens = 0.0, 0
        # The first estimate goes out with the step's first chunk at the latest.
        self.first_progress_sent = self.cadence.progress_with_chunks
        step = self.step
        events: list[AnyEvent] = [StepStartedEvent(step.name, index, len(self.steps))]
        if step.insights:
            events.append(InsightEvent(step.insights[0], step.name))
        return events

    def tokens(self, count: int, text: str, now: float) -> list[AnyEvent]:
        """Record ``count`` tokens and ``text``; the events then due."""
        self.add_tokens(count, text)
        return self.due(now)

    def progress(self, pct: float, now: float) -> list[AnyEvent]:
        """Record an explicit percentage; the events then due."""
        self.set_progress(pct)
        return self.due(now)

    def insight(self, text: str) -> list[AnyEvent]:
        """A status line for the current step (or the job, before the first step)."""
        return [InsightEvent(text, self.step.name if self.index >= 0 else None)]

    def deadline(self) -> float | None:
        """When :meth:`due` must be called next if nothing is reported before (None: never)."""
        if self.index < 0:
            return None
        deadlines = [self.progress_due_at]
        if self.pending:
            deadlines.append(self.last_chunk_at + self.cadence.chunk_interval_s)
        if self.estimator.tokens != self.sent_tokens:
            deadlines.append(self._keepalive_at())
        return min((d for d in deadlines if d is not None), default=None)

    def _keepalive_at(self) -> float:
        since = self.started_at if self.last_progress_at is None else self.last_progress_at
        return since + self.cadence.progress_interval_s

    def due(self, now: float) -> list[AnyEvent]:
        """The events the cadence makes due at ``now``."""
        events: list[AnyEvent] = []
        cadence = self.cadence
        if self.pending and (
            self.pending_chars >= cadence.chunk_chars
            or now - self.last_chunk_at >= cadence.chunk_interval_s
        ):
            self._chunk(now, events)
            if not self.first_progress_sent:
                self.first_progress_sent = True
                self._progress(now, events)
        if self.progress_due_at is None and self._visible_change():
            last = self.last_progress_at
            self.progress_due_at = (
                now if last is None else max(now, last + cadence.progress_window_s)
            )
        visible_due = self.progress_due_at is not None and now >= self.progress_due_at
        keepalive_due = self.estimator.tokens != self.sent_tokens and now >= self._keepalive_at()
        if visible_due or keepalive_due:
            self._progress(now, events)
        return events

    def _visible_change(self) -> bool:
        pct = self.estimator.step_pct()
        if self.estimator.reported_pct is not None:
            return pct != self.sent_pct
        return pct - self.sent_pct >= self.cadence.progress_step_pct

    def drain(self, now: float) -> list[AnyEvent]:
        """The pending text as a chunk, if any (the text that arrived before a failure)."""
        events: list[AnyEvent] = []
        if self.pending:
            self._chunk(now, events)
        return events

    def complete_step(self, now: float) -> list[AnyEvent]:
        """End the current step: the pending chunk, a first progress if none went out, and
        ``step_completed`` (pct 100, the overall percentage after it)."""
        events = self.drain(now)
        if self.last_progress_at is None:
            # A step shorter than its chunk and progress intervals still reports progress.
            self._progress(now, events)
        overall = self.estimator.complete_step()
        events.append(
            StepCompletedEvent(
                self.step.name,
                self.index,
                overall,
                self.estimator.tokens,
                round(now - self.started_at, 3),
            )
        )
        return events

    def _chunk(self, now: float, events: list[AnyEvent]) -> None:
        tokens = max(self.estimator.tokens - self.chunk_base, 0)
        events.append(ChunkEvent(self.step.name, "".join(self.pending), tokens))
        self.pending, self.pending_chars = [], 0
        self.chunk_base = self.estimator.tokens
        self.last_chunk_at = now
        if self.cadence.progress_with_chunks:
            self._progress(now, events)

    def _progress(self, now: float, events: list[AnyEvent]) -> None:
        est = self.estimator.estimate(now)
        self.last_progress_at, self.progress_due_at = now, None
        self.sent_pct, self.sent_tokens = est.pct, est.tokens
        step = self.step
        events.append(
            StepProgressEvent(
                step.name, est.pct, est.overall_pct, est.tokens, est.eta_s, est.job_eta_s
            )
        )
        later = step.insights[1:]
        due = min(int(est.pct / 100 * (len(later) + 1)), len(later))
        while self.insights_sent < due:
            events.append(InsightEvent(later[self.insights_sent], step.name))
            self.insights_sent += 1

    # --- saving ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-able dict; the cadence is not in it (see :meth:`from_json`)."""
        data: dict[str, Any] = {}
        for field in attrs.fields(JobEmitter):
            if field.name == "cadence":
                continue
            value = getattr(self, field.name)
            if field.name == "steps":
                value = [attrs.asdict(step) for step in value]
            elif field.name == "estimator":
                value = value.to_json()
            elif field.name == "pending":
                value = ["".join(value)] if value else []
            data[field.alias or field.name] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], cadence: Cadence) -> JobEmitter:
        """The emitter saved by :meth:`to_json`, going on with ``cadence`` (the job's)."""
        fields = dict(data)
        fields["steps"] = [EmitterStep(**step) for step in fields["steps"]]
        fields["estimator"] = ProgressEstimator.from_json(fields["estimator"])
        return cls(cadence=cadence, **fields)
