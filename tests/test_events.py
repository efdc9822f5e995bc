"""Events survive their own encoding: what another instance reads back is what was published."""

from __future__ import annotations

import pytest

from app.core.events import (
    EVENT_TYPES,
    AnyEvent,
    ChunkEvent,
    DoneEvent,
    ErrorEvent,
    InsightEvent,
    JobStartedEvent,
    StepCompletedEvent,
    StepProgressEvent,
    StepStartedEvent,
    decode_event,
    encode_event,
)

ONE_OF_EACH: list[AnyEvent] = [
    JobStartedEvent(("research", "write"), "aligned"),
    StepStartedEvent("research", 0, 2),
    ChunkEvent("research", "Hello, wörld ✓\nline two", 5),
    InsightEvent("Tailoring the summary…", "write"),
    StepProgressEvent("research", 42.5, 21.25, 120, 3.5, 9.0),
    StepCompletedEvent("research", 0, 50.0, 400, 5.1),
    ErrorEvent("provider said no", "write"),
    DoneEvent("succeeded", 100.0, result={"text": "done", "items": [1, 2]}),
    DoneEvent("failed", 63.0, error="provider said no"),
]


class TestDecode:
    def test_every_type_is_covered(self) -> None:
        """The examples below cover every event type of the contract."""
        assert {event.type for event in ONE_OF_EACH} == set(EVENT_TYPES)

    @pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: e.type)
    def test_decoded_payload_equals_the_published_event(self, event: AnyEvent) -> None:
        """decode_event(encode_event(e).payload) == e, field for field."""
        assert decode_event(encode_event("job-1", 7, event).payload) == event

    @pytest.mark.parametrize(
        "payload", [b'{"type": "heartbeat", "job_id": "j"}', b"[1, 2]", b'{"no": "type"}']
    )
    def test_other_payloads_are_refused(self, payload: bytes) -> None:
        """A payload that is not a contract event raises ValueError."""
        with pytest.raises(ValueError, match="not an event payload"):
            decode_event(payload)
