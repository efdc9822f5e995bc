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
from strategies import Cadence, Tuning

CADENCE = Cadence(
    chunk_chars=10,
    chunk_interval_s=1.0,
    progress_interval_s=5.0,
    heartbeat_interval_s=15.0,
    progress_window_s=0.05,
)


def _progress(events: list[AnyEvent]) -> list[float]:
    return [event.pct for event in events if isinstance(event, StepProgressEvent)]


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
        emitter = JobEmitter.for_steps([("a", 1000)], CADENCE)
        emitter.start_step(0, 0.0)
        assert emitter.tokens(3, "abc", 0.1) == []  # 0.3%: not a visible change
        events = emitter.complete_step(0.5)
        assert events[0] == ChunkEvent("a", "abc", 3)
        assert isinstance(events[1], StepProgressEvent)
        assert events[1].pct == pytest.approx(0.3)
        assert events[2] == StepCompletedEvent("a", 0, 100.0, 3, 0.5)


class TestProgress:
    def test_visible_token_change_goes_out_at_once(self) -> None:
        """Tokens moving the bar by 1 point or more give a step_progress at once."""
        emitter = JobEmitter.for_steps([("a", 200)], CADENCE)
        emitter.start_step(0, 0.0)
        assert _progress(emitter.tokens(1, "", 0.1)) == []  # 0.5%
        assert _progress(emitter.tokens(1, "", 0.2)) == [1.0]

    def test_changes_within_the_window_merge_into_the_latest(self) -> None:
        """A change right after a step_progress waits for the window's end, merged, no later."""
        emitter = JobEmitter.for_steps([("a", 100)], CADENCE)
        emitter.start_step(0, 0.0)
        assert _progress(emitter.progress(10, 1.0)) == [10.0]
        assert emitter.progress(20, 1.01) == []
        assert emitter.progress(30, 1.02) == []
        assert emitter.deadline() == pytest.approx(1.05)
        assert emitter.due(1.049) == []
        assert _progress(emitter.due(1.05)) == [30.0]
        assert emitter.deadline() is None

    def test_every_explicit_value_apart_by_a_window_goes_out(self) -> None:
        """Explicit percentages reported slower than the window each give their own event."""
        emitter = JobEmitter.for_steps([("a", None)], CADENCE)
        emitter.start_step(0, 0.0)
        sent = []
        for i, pct in enumerate((5.0, 5.5, 50.0, 49.0, 100.0)):
            sent += _progress(emitter.progress(pct, 0.5 * (i + 1)))
        # A lower value does not lower the bar; 100 shows as 99 until the step completes.
        assert sent == [5.0, 5.5, 50.0, 99.0]

    def test_invisible_changes_wait_for_the_keepalive(self) -> None:
        """Tokens that do not move the bar go out every progress_interval_s, not before."""
        emitter = JobEmitter.for_steps([("a", None)], CADENCE)
        emitter.start_step(0, 0.0)
        assert emitter.tokens(500, "", 1.0) == []
        assert emitter.deadline() == pytest.approx(5.0)
        events = emitter.due(5.0)
        assert [(e.pct, e.tokens) for e in events if isinstance(e, StepProgressEvent)] == [
            (0.0, 500)
        ]
        assert emitter.deadline() is None  # nothing changed since

    def test_later_insights_follow_progress(self) -> None:
        """Declared insights after the first go out with the progress passing their share."""
        emitter = JobEmitter([EmitterStep("a", 100, ("start", "half"))], CADENCE)
        emitter.start_step(0, 0.0)
        assert InsightEvent("half", "a") not in emitter.progress(40, 1.0)
        assert emitter.progress(50, 2.0)[-1] == InsightEvent("half", "a")


class TestCadence:
    def test_window_is_90_percent_of_the_latency_budget(self) -> None:
        """The progress window is 90% of FLUSHLINE_MAX_DELAY_MS, at most the interval."""
        assert Cadence.from_tuning(
            Tuning(), chunk_chars=1, chunk_interval_s=1
        ).progress_window_s == pytest.approx(0.09)
        tuned = Cadence.from_tuning(Tuning(max_delay_ms=300), chunk_chars=1, chunk_interval_s=1)
        assert tuned.progress_window_s == pytest.approx(0.27)
        short = Tuning(max_delay_ms=300, progress_interval_s=0.02)
        assert Cadence.from_tuning(
            short, chunk_chars=1, chunk_interval_s=1
        ).progress_window_s == pytest.approx(0.02)


class TestChunks:
    def test_chunk_at_chunk_chars(self) -> None:
        """Text reaching chunk_chars goes out at once with the tokens counted since the last."""
        emitter = JobEmitter.for_steps([("a", 1000)], CADENCE)
        emitter.start_step(0, 0.0)
        assert emitter.tokens(2, "hello", 0.1) == []
        events = emitter.tokens(2, "world", 0.2)
        assert events[0] == ChunkEvent("a", "helloworld", 4)

    def test_chunk_at_chunk_interval(self) -> None:
        """Short text goes out chunk_interval_s after the step start; deadline() says when."""
        emitter = JobEmitter.for_steps([("a", 1000)], CADENCE)
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
