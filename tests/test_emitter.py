"""Tests for the job emitter (app/jobs/emitter.py): the cadence rules every producer shares.

The emitter is pure (it returns the events due), so these drive it with chosen times;
the same rules over real sockets are in test_progress_latency.py and test_strategy_wire.py.
"""

from __future__ import annotations

import json

import pytest

from app.core.events import (
    AnyEvent,
    ChunkEvent,
    InsightEvent,
    StepCompletedEvent,
    StepProgressEvent,
    StepStartedEvent,
)
from app.jobs.emitter import EmitterStep, JobEmitter
from strategies import Cadence

CADENCE = Cadence(
    chunk_chars=10, chunk_interval_s=1.0, progress_interval_s=5.0, heartbeat_interval_s=15.0
)


def _types(events: list[AnyEvent]) -> list[str]:
    return [event.type for event in events]


class TestSteps:
    def test_start_step_sends_step_started_and_the_first_insight(self) -> None:
        """start_step gives step_started, then the step's first declared insight."""
        emitter = JobEmitter([EmitterStep("a", 100, ("first", "later"))], CADENCE)
        events = emitter.start_step(0, 0.0)
        assert events == [StepStartedEvent("a", 0, 1), InsightEvent("first", "a")]

    def test_complete_step_flushes_text_and_reports_100(self) -> None:
        """complete_step sends the pending text, one progress and step_completed."""
        emitter = JobEmitter.for_steps([("a", 100)], CADENCE)
        emitter.start_step(0, 0.0)
        assert emitter.tokens(3, "abc", 0.1) == []
        events = emitter.complete_step(0.5)
        assert events[0] == ChunkEvent("a", "abc", 3)
        assert isinstance(events[1], StepProgressEvent)
        assert events[1].pct == pytest.approx(3.0)
        assert events[2] == StepCompletedEvent("a", 0, 100.0, 3, 0.5)


class TestChunks:
    def test_chunk_at_chunk_chars(self) -> None:
        """Text reaching chunk_chars goes out at once with the tokens counted since the last."""
        emitter = JobEmitter.for_steps([("a", 100)], CADENCE)
        emitter.start_step(0, 0.0)
        assert emitter.tokens(2, "hello", 0.1) == []
        events = emitter.tokens(2, "world", 0.2)
        assert events[0] == ChunkEvent("a", "helloworld", 4)

    def test_chunk_at_chunk_interval(self) -> None:
        """Short text goes out chunk_interval_s after the step start; deadline() says when."""
        emitter = JobEmitter.for_steps([("a", 100)], CADENCE)
        emitter.start_step(0, 0.0)
        emitter.tokens(1, "hi", 0.1)
        assert emitter.deadline() == pytest.approx(1.0)
        assert emitter.due(0.9) == []
        assert emitter.due(1.0)[0] == ChunkEvent("a", "hi", 1)


class TestSaving:
    def test_state_round_trips_through_json(self) -> None:
        """An emitter restored from its JSON goes on exactly as the original would."""
        steps = [EmitterStep("a", 100, ("x", "y")), EmitterStep("b", None)]
        original = JobEmitter(steps, CADENCE)
        original.start_step(0, 10.0)
        original.tokens(4, "abcd", 10.5)
        original.progress(40.0, 10.6)
        restored = JobEmitter.from_json(json.loads(json.dumps(original.to_json())), CADENCE)
        assert restored == original
        assert restored.tokens(1, "efghij", 10.7) == original.tokens(1, "efghij", 10.7)
        assert restored.complete_step(11.0) == original.complete_step(11.0)
