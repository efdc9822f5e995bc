"""External jobs' producer events: their model, their validation, their translation.

A producer publishes batches of the contract's producer events (``step_started``,
``tokens``, ``progress``, ``insight``, ``step_completed``, ``succeeded``, ``failed``,
``heartbeat``). :func:`parse_batch` checks a batch's shape and bounds without any state
(each problem a 400, or a 413 for a size, naming the field: ``events[3].text``);
:class:`Translator` then turns the events into Flushline's own events against the job's
declared steps and the state the previous batches left, raising the same errors for
what the state refuses (a step that is not running), so a bad batch publishes nothing.

Its state is plain JSON (``ProducerState.emitter``), so any instance continues where
another left off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson

from app.core.errors import InvalidField, TooLarge
from app.jobs.limits import JsonLimits, measure_json

__all__ = [
    "EXTERNAL_PIPELINE",
    "MAX_COUNT",
    "MAX_STEPS",
    "Failed",
    "Heartbeat",
    "Insight",
    "ProducerEvent",
    "Progress",
    "PublishLimits",
    "StepCompleted",
    "StepDecl",
    "StepStarted",
    "Succeeded",
    "Tokens",
    "parse_batch",
    "parse_steps",
    "text_bytes",
]

#: The pipeline name of a job its producer publishes.
EXTERNAL_PIPELINE = "external"
#: Most steps an external job declares.
MAX_STEPS = 100
#: Longest step name, in characters.
MAX_STEP_NAME = 100
#: Most tokens one step may expect, and one ``tokens`` event may count.
MAX_COUNT = 1_000_000_000
#: Highest ``producer_seq`` (JSON numbers stay exact up to 2**53).
MAX_PRODUCER_SEQ = 2**53


@attrs.frozen
class StepDecl:
    """A declared step of an external job."""

    name: str
    expected_tokens: int | None = None


@attrs.frozen
class StepStarted:
    step: str


@attrs.frozen
class Tokens:
    step: str
    count: int
    text: str = ""


@attrs.frozen
class Progress:
    step: str
    pct: float


@attrs.frozen
class Insight:
    text: str
    step: str | None = None


@attrs.frozen
class StepCompleted:
    step: str


@attrs.frozen
class Succeeded:
    result: Any = None


@attrs.frozen
class Failed:
    error: str


@attrs.frozen
class Heartbeat:
    pass


ProducerEvent = (
    StepStarted | Tokens | Progress | Insight | StepCompleted | Succeeded | Failed | Heartbeat
)

#: Each producer event type: its class, its fields (required ones first) and how many
#: of them are required.
_TYPES: dict[str, tuple[type[Any], tuple[str, ...], int]] = {
    "step_started": (StepStarted, ("step",), 1),
    "tokens": (Tokens, ("step", "count", "text"), 2),
    "progress": (Progress, ("step", "pct"), 2),
    "insight": (Insight, ("text", "step"), 1),
    "step_completed": (StepCompleted, ("step",), 1),
    "succeeded": (Succeeded, ("result",), 0),
    "failed": (Failed, ("error",), 1),
    "heartbeat": (Heartbeat, (), 0),
}


@attrs.frozen
class PublishLimits:
    """The bounds of one publish (the settings' ``publish_*``)."""

    max_events: int = 1000
    max_text_bytes: int = 64 * 1024
    #: A ``succeeded`` event's ``result``, encoded (``FLUSHLINE_MAX_BODY_BYTES``).
    max_result_bytes: int = 64 * 1024


def text_bytes(event: ProducerEvent) -> int:
    """What ``event`` counts against the job's published bytes (its text, its result)."""
    match event:
        case Tokens(text=text) | Insight(text=text):
            return utf8_len(text)
        case Failed(error=error):
            return utf8_len(error)
        case Succeeded(result=result):
            return len(orjson.dumps(result))
    return 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(value: object, field: str) -> str:  # a step's name in a declaration
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_STEP_NAME:
        raise InvalidField(field, f"must be a non-empty string of at most {MAX_STEP_NAME} chars")
    return value


def parse_steps(raw: object) -> tuple[StepDecl, ...]:
    """The ``steps`` of a ``POST /api/jobs`` for an external job."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_STEPS:
        raise InvalidField("steps", f"must be a list of 1 to {MAX_STEPS} steps")
    steps: list[StepDecl] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"steps[{i}]"
        if not isinstance(item, dict):
            raise InvalidField(where, 'must be an object {"name", "expected_tokens"?}')
        unknown = sorted(set(item) - {"name", "expected_tokens"})
        if unknown:
            raise InvalidField(
                f"{where}.{unknown[0]}", "unknown field; allowed: name, expected_tokens"
            )
        name = _name(item.get("name"), f"{where}.name")
        if name in seen:
            raise InvalidField(f"{where}.name", f"step {name!r} is declared twice")
        seen.add(name)
        expected = item.get("expected_tokens")
        if expected is not None and (not _is_int(expected) or not 1 <= expected <= MAX_COUNT):
            raise InvalidField(
                f"{where}.expected_tokens", f"must be an integer from 1 to {MAX_COUNT}"
            )
        steps.append(StepDecl(name, expected))
    return tuple(steps)


class _Bad(Exception):
    """A field's value refused (the caller names the field)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_large = too_large


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _check_text(value: object, limits: PublishLimits, *, empty: bool) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _Bad("must be a string" if empty else "must be a non-empty string")
    if len(value) * 4 > limits.max_text_bytes:  # else it fits whatever its characters
        size = utf8_len(value)
        if size > limits.max_text_bytes:
            raise _Bad(
                f"is {size} bytes; at most {limits.max_text_bytes} "
                "(FLUSHLINE_PUBLISH_MAX_TEXT_BYTES)",
                too_large=True,
            )
    return value


def _check(name: str, kind: str, value: object, limits: PublishLimits) -> Any:
    """The checked value of field ``name`` of a ``kind`` event."""
    if name == "step":
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_STEP_NAME:
            raise _Bad(f"must be a non-empty string of at most {MAX_STEP_NAME} chars")
        return value
    if name == "count":
        if not _is_int(value) or not 0 <= value <= MAX_COUNT:  # type: ignore[operator]
            raise _Bad(f"must be an integer from 0 to {MAX_COUNT}")
        return value
    if name == "pct":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not 0 <= value <= 100:  # type: ignore[arg-type,operator]
            raise _Bad("must be a number from 0 to 100")
        return float(value)  # type: ignore[arg-type]
    if name == "result":
        measure_json("result", value, JsonLimits(max_bytes=1 << 62))  # the depth
        size = len(orjson.dumps(value))
        if size > limits.max_result_bytes:
            raise _Bad(
                f"is {size} bytes as JSON; at most {limits.max_result_bytes} "
                "(FLUSHLINE_MAX_BODY_BYTES)",
                too_large=True,
            )
        return value
    # text, error
    return _check_text(value, limits, empty=name == "text" and kind == "tokens")


#: The fields each producer event type allows.
_ALLOWED = {kind: frozenset(("type", *spec[1])) for kind, spec in _TYPES.items()}
_MISSING = object()


def _tokens_fast(raw: dict[str, Any], limits: PublishLimits) -> Tokens | None:
    """The common case, a well-formed ``tokens`` event, checked inline; None otherwise
    (the general path then names what is wrong)."""
    step, count, text = raw.get("step"), raw.get("count"), raw.get("text", "")
    if (
        type(step) is str
        and 0 < len(step) <= MAX_STEP_NAME
        and type(count) is int
        and 0 <= count <= MAX_COUNT
        and type(text) is str
        and len(text) * 4 <= limits.max_text_bytes
        and raw.keys() <= _ALLOWED["tokens"]
        and step.strip()
    ):
        return Tokens(step, count, text)
    return None


def _event(raw: object, i: int, limits: PublishLimits) -> ProducerEvent:
    if type(raw) is dict and raw.get("type") == "tokens":
        fast = _tokens_fast(raw, limits)
        if fast is not None:
            return fast
    if not isinstance(raw, dict):
        raise InvalidField(f"events[{i}]", "must be an object with a type")
    kind = raw.get("type")
    spec = _TYPES.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise InvalidField(f"events[{i}].type", f"must be one of {', '.join(_TYPES)}")
    assert isinstance(kind, str)
    cls, fields, required = spec
    if not raw.keys() <= _ALLOWED[kind]:
        unknown = sorted(set(raw) - _ALLOWED[kind])
        allowed = ", ".join(("type", *fields))
        raise InvalidField(
            f"events[{i}].{unknown[0]}", f"unknown field for {kind}; allowed: {allowed}"
        )
    values: dict[str, Any] = {}
    for n, name in enumerate(fields):
        value = raw.get(name, _MISSING)
        if value is _MISSING or (value is None and name == "step" and kind == "insight"):
            if n < required:
                raise InvalidField(f"events[{i}].{name}", f"is required for {kind}")
            continue
        try:
            values[name] = _check(name, kind, value, limits)
        except _Bad as bad:
            error = TooLarge if bad.too_large else InvalidField
            raise error(f"events[{i}].{name}", bad.message) from None
        except InvalidField as exc:  # the result's depth
            raise InvalidField(
                f"events[{i}].{name}", exc.message.removeprefix("result: ")
            ) from None
    event: ProducerEvent = cls(**values)
    return event


def parse_batch(body: Mapping[str, Any], limits: PublishLimits) -> tuple[int, list[ProducerEvent]]:
    """``producer_seq`` and the events of a publish body, checked whole.

    Raises ``InvalidField`` (400) or ``TooLarge`` (413) naming the first field to blame.
    """
    unknown = sorted(set(body) - {"producer_seq", "events"})
    if unknown:
        raise InvalidField(unknown[0], "unknown field; allowed: producer_seq, events")
    seq = body.get("producer_seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_PRODUCER_SEQ:
        raise InvalidField("producer_seq", "must be an integer from 1 (the first batch) up")
    raw = body.get("events")
    if not isinstance(raw, list) or not raw:
        raise InvalidField("events", "must be a non-empty list of producer events")
    if len(raw) > limits.max_events:
        raise TooLarge(
            "events",
            f"{len(raw)} events in one batch; at most {limits.max_events} "
            "(FLUSHLINE_PUBLISH_MAX_EVENTS)",
        )
    events = [_event(item, i, limits) for i, item in enumerate(raw)]
    return seq, events


def step_names(steps: Sequence[StepDecl]) -> tuple[str, ...]:
    """The declared steps' names, in order."""
    return tuple(step.name for step in steps)
