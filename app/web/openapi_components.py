"""The reusable parts of the API description: its ``components`` and the builders of them.

The component schemas (the job snapshot, the events, the error body, the request body),
one shared response per error status with what it means, and the security schemes; and the
small builders the paths in ``app.web.openapi`` use to refer to them.
"""

from __future__ import annotations

from typing import Any

from app.core.events import EVENT_TYPES
from app.jobs.external import (
    EXTERNAL_PIPELINE,
    MAX_COUNT,
    MAX_PRODUCER_SEQ,
    MAX_STEP_NAME,
    MAX_STEPS,
)
from app.jobs.store import JobStatus, StepStatus

__all__ = [
    "Spec",
    "components",
    "error_refs",
    "head_errors",
    "json_response",
    "schema_ref",
]

#: A piece of the OpenAPI document, as JSON.
Spec = dict[str, Any]

#: What each error status means, for every operation that may answer it.
_ERROR_MEANINGS = {
    400: "A bad body, field, query parameter or header; `field` names it.",
    401: "Auth is on and the request carries no credential (`WWW-Authenticate: Bearer`).",
    403: "An API token that is not configured; a stream token for another job, expired or "
    "badly signed; or a state-changing request from an origin that is not allowed (CORS).",
    404: "No such job (it expired, or with auth on it is another token's), or no such route.",
    405: "The method is not allowed on this path (`Allow` lists those that are).",
    408: "The request body did not arrive within `FLUSHLINE_HEADER_TIMEOUT_S` (the "
    "connection is closed).",
    409: "Cancel of a job that has already ended, or that another cancel is ending "
    "(`job_finished`, with the job's `status`); a publish to a finished job (the same), or "
    "one past the next `producer_seq` (`producer_seq_gap`, with `expected_producer_seq`).",
    410: "The resume point is older than the history still kept (`FLUSHLINE_HISTORY_LIMIT`).",
    413: "The body is too large (`FLUSHLINE_MAX_BODY_BYTES`); for a publish, a batch, an "
    "event's text or result, or the job's published bytes past their bound (`field` names it).",
    429: "A producer publishing faster than `FLUSHLINE_PUBLISH_RATE` events per second "
    "to one job; retry after `Retry-After` seconds.",
    415: "A `Content-Encoding` the service does not accept, or a body that does not decode.",
    503: "At capacity, draining after SIGTERM, over the retained byte budget, or Redis "
    "unreachable; retry after `Retry-After` seconds.",
}


def schema_ref(name: str) -> Spec:
    """A reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(schema: Spec, description: str, headers: Spec | None = None) -> Spec:
    """A response whose JSON body is ``schema``, with ``headers`` if any."""
    response: Spec = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def error_refs(*statuses: int) -> Spec:
    """The responses of an operation for these error statuses: the shared ``ErrorNNN``."""
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def head_errors(*statuses: int) -> Spec:
    """Error statuses of a HEAD: the headers of the GET's error, no body."""
    return {str(status): {"description": _ERROR_MEANINGS[status]} for status in statuses}


def components(pipelines: list[str], strategies: list[str]) -> Spec:
    """The ``components`` of the description, for an app with these pipelines and strategies."""
    return {
        "schemas": _schemas(pipelines, strategies),
        "responses": _error_responses(),
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "One of `FLUSHLINE_API_TOKEN` (when auth is on).",
            },
            "publishToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "An external job's `publish_token` (from its `201`); always "
                "needed to publish, whatever the auth setting (or, with auth on, an API "
                "token of the job's owner).",
            },
            "streamToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "A signed per-job token (`links.stream`), valid for "
                "`FLUSHLINE_STREAM_TOKEN_TTL_S` (when auth is on).",
            },
        },
    }


def _schemas(pipelines: list[str], strategies: list[str]) -> Spec:
    nullable_number = {"type": ["number", "null"]}
    nullable_string = {"type": ["string", "null"]}
    timestamp = {"type": ["string", "null"], "format": "date-time"}
    event_fields: dict[str, tuple[Spec, list[str]]] = {
        "job_started": (
            {
                "steps": {"type": "array", "items": {"type": "string"}},
                "strategy": {"type": "string"},
            },
            ["steps", "strategy"],
        ),
        "step_started": (
            {
                "step": {"type": "string"},
                "index": {"type": "integer", "minimum": 0},
                "total_steps": {"type": "integer", "minimum": 1},
            },
            ["step", "index", "total_steps"],
        ),
        "chunk": (
            {"step": {"type": "string"}, "text": {"type": "string"}, "tokens": {"type": "integer"}},
            ["step", "text", "tokens"],
        ),
        "insight": ({"text": {"type": "string"}, "step": nullable_string}, ["text"]),
        "step_progress": (
            {
                "step": {"type": "string"},
                "pct": {"type": "number", "minimum": 0, "maximum": 100},
                "overall_pct": {"type": "number", "minimum": 0, "maximum": 100},
                "tokens": {"type": "integer", "minimum": 0},
                "eta_s": nullable_number,
                "job_eta_s": nullable_number,
            },
            ["step", "pct", "overall_pct", "tokens", "eta_s"],
        ),
        "step_completed": (
            {
                "step": {"type": "string"},
                "index": {"type": "integer", "minimum": 0},
                "pct": {"const": 100},
                "overall_pct": {"type": "number", "minimum": 0, "maximum": 100},
                "tokens": {"type": "integer", "minimum": 0},
                "duration_s": {"type": "number", "minimum": 0},
            },
            ["step", "index", "pct", "overall_pct", "tokens", "duration_s"],
        ),
        "error": (
            {
                "message": {"type": "string"},
                "step": nullable_string,
                "code": {
                    "type": "string",
                    "description": "Where Flushline ended the job itself: `producer_lost`.",
                },
            },
            ["message", "step"],
        ),
        "done": (
            {
                "status": {"enum": ["succeeded", "failed", "cancelled"]},
                "overall_pct": {"type": "number", "minimum": 0, "maximum": 100},
                "result": {},
                "error": nullable_string,
            },
            ["status", "overall_pct"],
        ),
    }
    schemas: Spec = {
        "Error": {
            "type": "object",
            "description": "Every error the service answers, whatever its status.",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "minLength": 1, "examples": ["job_not_found"]},
                        "message": {"type": "string", "minLength": 1},
                        "field": {
                            "type": "string",
                            "description": "The body field, query parameter or header to blame.",
                        },
                        "request_id": {
                            "type": "string",
                            "description": "The request id, as in `X-Request-ID` and logs.",
                        },
                        "status": {
                            "enum": ["succeeded", "failed", "cancelled"],
                            "description": "`job_finished`: how the job ended.",
                        },
                        "first_seq": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "`history_truncated`: the oldest seq still kept.",
                        },
                        "expected_producer_seq": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "`producer_seq_gap`: the batch the job expects next.",
                        },
                    },
                }
            },
        },
        "JobRequest": {
            "type": "object",
            "additionalProperties": False,
            "description": "Every field is optional; unknown fields are refused by name.",
            "properties": {
                "pipeline": {
                    "type": "string",
                    "enum": [*pipelines, EXTERNAL_PIPELINE],
                    "default": "demo",
                    "description": f"`{EXTERNAL_PIPELINE}`: a job its producer publishes "
                    "(`POST /api/jobs/{job_id}/events`), with its declared `steps`; it stays "
                    "`queued` until the producer's first publish, then `running`.",
                },
                "steps": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_STEPS,
                    "description": f'Only with `"pipeline": "{EXTERNAL_PIPELINE}"`: its steps, '
                    "in the order they run; names unique.",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": MAX_STEP_NAME},
                            "expected_tokens": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_COUNT,
                            },
                        },
                    },
                },
                "input": {"type": "object", "description": "The pipeline's input."},
                "strategy": {"type": "string", "enum": strategies},
                "options": {
                    "type": "object",
                    "description": "The pipeline's options. `demo`: `steps` (a count up to 50, "
                    "or a list of unique names), `tokens_per_step`, `tokens_per_second`, "
                    "`seed`, `fail_at_step`; unknown options are refused by name.",
                },
            },
        },
        "Step": {
            "type": "object",
            "required": ["name", "status", "pct", "tokens"],
            "properties": {
                "name": {"type": "string"},
                "status": {"enum": [s.value for s in StepStatus]},
                "pct": {"type": "number", "minimum": 0, "maximum": 100},
                "tokens": {"type": "integer", "minimum": 0},
            },
        },
        "Job": {
            "type": "object",
            "description": "A job's snapshot.",
            "required": [
                "id",
                "status",
                "pipeline",
                "strategy",
                "progress",
                "steps",
                "result",
                "error",
                "created_at",
                "started_at",
                "finished_at",
                "last_event_id",
                "options",
                "links",
            ],
            "properties": {
                "id": {"type": "string", "minLength": 1},
                "status": {"enum": [s.value for s in JobStatus]},
                "pipeline": {"type": "string"},
                "strategy": {"type": "string"},
                "progress": {"type": "number", "minimum": 0, "maximum": 100},
                "steps": {"type": "array", "items": schema_ref("Step")},
                "result": {"description": "The pipeline's result once succeeded, else null."},
                "error": nullable_string,
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": timestamp,
                "finished_at": timestamp,
                "last_event_id": {"type": "integer", "minimum": 0},
                "options": {"type": "object"},
                "links": {
                    "type": "object",
                    "required": ["self", "stream", "events", "cancel"],
                    "properties": {
                        "self": {"type": "string"},
                        "stream": {
                            "type": "string",
                            "description": "The stream URL (with auth on, its signed `token`).",
                        },
                        "events": {
                            "type": "string",
                            "description": "The long-poll URL (with auth on, its signed `token`).",
                        },
                        "cancel": {"type": "string"},
                    },
                },
            },
        },
        "CreatedJob": {
            "description": "The new job's snapshot; an external job's also carries its "
            "`publish_token` (in this answer only).",
            "allOf": [
                schema_ref("Job"),
                {
                    "properties": {
                        "publish_token": {
                            "type": "string",
                            "minLength": 1,
                            "description": "The secret its producer publishes with.",
                        }
                    }
                },
            ],
        },
        "PublishRequest": _publish_request(),
        "PublishResult": {
            "type": "object",
            "required": ["accepted", "producer_seq", "duplicate", "last_event_id"],
            "additionalProperties": False,
            "properties": {
                "accepted": {"type": "integer", "minimum": 0, "description": "Events taken."},
                "producer_seq": {"type": "integer", "minimum": 1},
                "duplicate": {
                    "type": "boolean",
                    "description": "The batch had been accepted before: nothing published.",
                },
                "last_event_id": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "The job's newest seq after the batch.",
                },
            },
        },
        "JobList": {
            "type": "object",
            "required": ["jobs", "truncated"],
            "properties": {
                "jobs": {"type": "array", "items": schema_ref("Job")},
                "truncated": {
                    "type": "boolean",
                    "description": "Older jobs were left out: the body reached its size cap.",
                },
            },
        },
        "Event": {
            "type": "object",
            "description": "An event's data, as in the stream's `data:` line.",
            "required": ["type", "job_id", "seq", "ts"],
            "properties": {
                "type": {"enum": list(EVENT_TYPES)},
                "job_id": {"type": "string"},
                "seq": {"type": "integer", "minimum": 1},
                "ts": {"type": "number", "description": "Unix epoch seconds when emitted."},
            },
            "allOf": [
                {
                    "if": {"properties": {"type": {"const": name}}},
                    "then": {"properties": properties, "required": required},
                }
                for name, (properties, required) in event_fields.items()
            ],
        },
        "EventPage": {
            "type": "object",
            "required": ["events", "last_event_id", "done"],
            "additionalProperties": False,
            "properties": {
                "events": {"type": "array", "items": schema_ref("Event")},
                "last_event_id": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "The `after` of the next poll.",
                },
                "done": {"type": "boolean", "description": "The job's last event was returned."},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "active_jobs"],
            "properties": {
                "status": {"const": "ok"},
                "active_jobs": {"type": "integer", "minimum": 0},
            },
        },
        "Ready": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ready"}},
        },
    }
    return schemas


def _publish_request() -> Spec:
    step: Spec = {"type": "string", "minLength": 1, "maxLength": MAX_STEP_NAME}
    text: Spec = {"type": "string"}
    kinds: dict[str, tuple[Spec, list[str]]] = {
        "step_started": ({"step": step}, ["step"]),
        "tokens": (
            {
                "step": step,
                "count": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
                "text": text,
            },
            ["step", "count"],
        ),
        "progress": (
            {"step": step, "pct": {"type": "number", "minimum": 0, "maximum": 100}},
            ["step", "pct"],
        ),
        "insight": (
            {
                "text": {"type": "string", "minLength": 1},
                "step": {**step, "type": ["string", "null"]},
            },
            ["text"],
        ),
        "step_completed": ({"step": step}, ["step"]),
        "succeeded": ({"result": {}}, []),
        "failed": ({"error": {"type": "string", "minLength": 1}}, ["error"]),
        "heartbeat": ({}, []),
    }
    return {
        "type": "object",
        "required": ["producer_seq", "events"],
        "additionalProperties": False,
        "properties": {
            "producer_seq": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_PRODUCER_SEQ,
                "description": "1 for the first batch, one more for each next one; a retry "
                "sends the same.",
            },
            "events": {
                "type": "array",
                "minItems": 1,
                "description": "Producer events, in order (at most "
                "`FLUSHLINE_PUBLISH_MAX_EVENTS`).",
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["type", *required],
                            "additionalProperties": False,
                            "properties": {"type": {"const": kind}, **properties},
                        }
                        for kind, (properties, required) in kinds.items()
                    ]
                },
            },
        },
    }


def _error_responses() -> Spec:
    retry_after = {
        "Retry-After": {
            "required": True,
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    allow = {"Allow": {"required": True, "schema": {"type": "string"}}}
    challenge = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
    special = {401: challenge, 405: allow, 429: retry_after, 503: retry_after}
    responses = {}
    for status, meaning in _ERROR_MEANINGS.items():
        headers = special.get(status)
        responses[f"Error{status}"] = json_response(schema_ref("Error"), meaning, headers)
    return responses
