"""The job event model: one frozen class per event type of the contract, and their encoding.

A producer builds an event without ``seq`` or ``ts``; the job's event bus assigns ``seq``
when it publishes and stamps ``ts`` at that moment, then encodes the event exactly once
into an :class:`EncodedEvent` whose bytes every subscriber shares.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Protocol

import attrs
import orjson

from app.core.sse import encode_frame

__all__ = [
    "ChunkEvent",
    "DoneEvent",
    "EncodedEvent",
    "ErrorEvent",
    "Event",
    "InsightEvent",
    "JobStartedEvent",
    "StepCompletedEvent",
    "StepProgressEvent",
    "StepStartedEvent",
    "decode_event",
    "encode_event",
    "heartbeat_frame",
]


class Event(Protocol):
    """What every event class has: its wire ``type`` and its type-specific fields."""

    type: ClassVar[str]


@attrs.frozen
class JobStartedEvent:
    """The pipeline began. ``steps`` lists the step names in order."""

    type: ClassVar[str] = "job_started"
    steps: tuple[str, ...]
    strategy: str


@attrs.frozen
class StepStartedEvent:
    """A step began (``index`` is 0-based)."""

    type: ClassVar[str] = "step_started"
    step: str
    index: int
    total_steps: int


@attrs.frozen
class ChunkEvent:
    """New generated text since the last chunk of this step."""

    type: ClassVar[str] = "chunk"
    step: str
    text: str
    tokens: int


@attrs.frozen
class InsightEvent:
    """A short human-readable status line."""

    type: ClassVar[str] = "insight"
    text: str
    step: str | None = None


@attrs.frozen
class StepProgressEvent:
    """A token-based progress estimate. ``eta_s`` is for the step, ``job_eta_s`` the job."""

    type: ClassVar[str] = "step_progress"
    step: str
    pct: float
    overall_pct: float
    tokens: int
    eta_s: float | None
    job_eta_s: float | None = None


@attrs.frozen
class StepCompletedEvent:
    """A step ended successfully; ``pct`` is always 100."""

    type: ClassVar[str] = "step_completed"
    step: str
    index: int
    overall_pct: float
    tokens: int
    duration_s: float
    pct: float = 100.0


@attrs.frozen
class ErrorEvent:
    """The job failed; a ``done`` event follows."""

    type: ClassVar[str] = "error"
    message: str
    step: str | None
    #: A machine-readable reason where Flushline ended the job itself (``producer_lost``);
    #: left out of the event when None.
    code: str | None = None


@attrs.frozen
class DoneEvent:
    """The last event of every job, whatever its outcome."""

    type: ClassVar[str] = "done"
    status: str
    overall_pct: float
    result: Any = None
    error: str | None = None


AnyEvent = (
    JobStartedEvent
    | StepStartedEvent
    | ChunkEvent
    | InsightEvent
    | StepProgressEvent
    | StepCompletedEvent
    | ErrorEvent
    | DoneEvent
)


@attrs.frozen
class EncodedEvent:
    """A published event: its ``seq`` and its SSE frame, encoded once.

    Only the frame is kept (history is held for every job): the JSON payload is its
    single ``data:`` line, sliced out on demand.
    """

    seq: int
    type: str
    ts: float
    frame: bytes
    event: AnyEvent | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def payload(self) -> bytes:
        """The event's JSON data (the frame's one ``data:`` line)."""
        start = self.frame.index(b"\ndata: ") + len(b"\ndata: ")
        return self.frame[start:-2]


def event_fields(event: AnyEvent) -> dict[str, Any]:
    """The type-specific fields of ``event`` as a JSON-ready dict (done omits the unused one,
    error its ``code`` when it has none)."""
    fields = attrs.asdict(event, recurse=False)
    if isinstance(event, DoneEvent):
        fields.pop("error" if event.status == "succeeded" else "result")
    elif isinstance(event, ErrorEvent) and event.code is None:
        del fields["code"]
    return fields


def encode_event(job_id: str, seq: int, event: AnyEvent, ts: float | None = None) -> EncodedEvent:
    """Stamp ``event`` with ``job_id``, ``seq`` and ``ts`` (now) and encode it once."""
    stamp = time.time() if ts is None else ts
    payload = orjson.dumps(
        {"type": event.type, "job_id": job_id, "seq": seq, "ts": stamp, **event_fields(event)}
    )
    frame = encode_frame(payload, event=event.type, id=seq)
    return EncodedEvent(seq=seq, type=event.type, ts=stamp, frame=frame, event=event)


def heartbeat_frame(job_id: str, ts: float | None = None) -> bytes:
    """A keep-alive frame: ``event: heartbeat``, no ``id:`` line and no ``seq``."""
    stamp = time.time() if ts is None else ts
    payload = orjson.dumps({"type": "heartbeat", "job_id": job_id, "ts": stamp})
    return encode_frame(payload, event="heartbeat")


#: Every event class by its wire ``type``.
EVENT_TYPES: dict[str, type[AnyEvent]] = {
    cls.type: cls
    for cls in (
        JobStartedEvent,
        StepStartedEvent,
        ChunkEvent,
        InsightEvent,
        StepProgressEvent,
        StepCompletedEvent,
        ErrorEvent,
        DoneEvent,
    )
}


def decode_event(payload: bytes) -> AnyEvent:
    """The event a payload of :func:`encode_event` carries (its stamp fields left out).

    For events published elsewhere (read back from Redis as frames only). Raises
    ``ValueError`` for a payload that is not one of the contract's events.
    """
    data = orjson.loads(payload)
    cls = EVENT_TYPES.get(str(data.get("type"))) if isinstance(data, dict) else None
    if cls is None:
        raise ValueError(f"not an event payload: {payload[:80]!r}")
    fields = {f.name: data[f.name] for f in attrs.fields(cls) if f.name in data}
    if cls is JobStartedEvent:
        fields["steps"] = tuple(fields["steps"])
    return cls(**fields)
