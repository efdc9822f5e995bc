"""The API description: ``GET /openapi.json``, OpenAPI 3.1 of every route the app serves.

Built once per app from the app's own settings and limits: the pipelines and strategies
it accepts, the bounds its parameters are checked against, and whether auth is on (then
the job API needs a bearer token and the stream and long-poll a signed stream token, and
their 401 and 403 answers are listed). ``tests/test_openapi.py`` keeps it true: every
route of ``app.router`` is described, real answers validate against it, and schemathesis
fuzzes the live server from it.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app import __version__
from app.core.events import EVENT_TYPES
from app.jobs.store import JobStatus, StepStatus
from app.web.api import MAX_LIST_LIMIT
from app.web.diagnostics import PATTERN_LIMITS as DIAGNOSTICS_LIMITS
from app.web.keys import MANAGER, SETTINGS
from app.web.params import MAX_SEQ
from app.web.poll import DEFAULT_LIMIT, DEFAULT_WAIT_S, MAX_LIMIT, MAX_WAIT_S
from app.web.stream import MAX_PROXY_BUFFER_BYTES

__all__ = ["build_spec", "install_openapi"]

Spec = dict[str, Any]

#: What each error status means, for every operation that may answer it.
_ERROR_MEANINGS = {
    400: "A bad body, field, query parameter or header; `field` names it.",
    401: "Auth is on and the request carries no credential (`WWW-Authenticate: Bearer`).",
    403: "An API token that is not configured; a stream token for another job, expired or "
    "badly signed; or a state-changing request from an origin that is not allowed (CORS).",
    404: "No such job (it expired, or with auth on it is another token's), or no such route.",
    405: "The method is not allowed on this path (`Allow` lists those that are).",
    409: "Cancel of a job that has already ended, or that another cancel is ending.",
    410: "The resume point is older than the history still kept (`FLUSHLINE_HISTORY_LIMIT`).",
    413: "The body is too large (`FLUSHLINE_MAX_BODY_BYTES`).",
    415: "A `Content-Encoding` the service does not accept, or a body that does not decode.",
    503: "At capacity, draining after SIGTERM, over the retained byte budget, or Redis "
    "unreachable; retry after `Retry-After` seconds.",
}
_EVENT_TYPES = tuple(EVENT_TYPES)


def _ref(name: str) -> Spec:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Spec, description: str, headers: Spec | None = None) -> Spec:
    response: Spec = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: int) -> Spec:
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def _query(name: str, schema: Spec, description: str) -> Spec:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _integer(low: int, high: int, default: int | None = None) -> Spec:
    schema: Spec = {"type": "integer", "minimum": low, "maximum": high}
    if default is not None:
        schema["default"] = default
    return schema


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
        "error": ({"message": {"type": "string"}, "step": nullable_string}, ["message", "step"]),
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
                    },
                }
            },
        },
        "JobRequest": {
            "type": "object",
            "additionalProperties": False,
            "description": "Every field is optional; unknown fields are refused by name.",
            "properties": {
                "pipeline": {"type": "string", "enum": pipelines, "default": "demo"},
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
                "steps": {"type": "array", "items": _ref("Step")},
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
        "JobList": {
            "type": "object",
            "required": ["jobs", "truncated"],
            "properties": {
                "jobs": {"type": "array", "items": _ref("Job")},
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
                "type": {"enum": list(_EVENT_TYPES)},
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
                "events": {"type": "array", "items": _ref("Event")},
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
    special = {401: challenge, 405: allow, 503: retry_after}
    responses = {}
    for status, meaning in _ERROR_MEANINGS.items():
        headers = special.get(status)
        responses[f"Error{status}"] = _json(_ref("Error"), meaning, headers)
    return responses


def build_spec(app: web.Application) -> Spec:
    """The OpenAPI 3.1 description of ``app`` (its settings decide pipelines, limits, auth)."""
    settings = app[SETTINGS]
    manager = app[MANAGER]
    auth_on = bool(settings.api_tokens)
    api_security: list[Spec] = [{"bearerAuth": []}] if auth_on else []
    # A stream or long-poll takes the job's stream token, or the API token of its owner.
    stream_security: list[Spec] = [{"streamToken": []}, {"bearerAuth": []}] if auth_on else []
    auth_errors = (401, 403) if auth_on else ()
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    token = _query(
        "token",
        {"type": "string"},
        "The signed stream token in `links.stream` and `links.events` (auth on); ignored "
        "when auth is off.",
    )
    last_event_id = _query(
        "last_event_id",
        _integer(0, MAX_SEQ),
        "Resume after this seq (for clients that cannot send `Last-Event-ID`).",
    )
    last_event_id_header = {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
        "description": "Resume after this seq; wins over `?last_event_id=`.",
    }
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    job = _json(_ref("Job"), "The job's snapshot.")
    head_ok = {"200": {"description": "As GET, without the body."}}

    def operation(summary: str, responses: Spec, **extra: Any) -> Spec:
        return {"summary": summary, "responses": responses, **extra}

    paths: Spec = {
        "/api/jobs": {
            "post": operation(
                "Create and start a job.",
                {
                    "201": _json(
                        _ref("Job"),
                        "The job's first snapshot.",
                        {"Location": {"required": True, "schema": {"type": "string"}}},
                    ),
                    **_errors(400, *auth_errors, 403, 413, 415, 503),
                },
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": _ref("JobRequest")}},
                },
                security=api_security,
            ),
            "get": operation(
                "Jobs, newest first (with auth on: the caller's only).",
                {
                    "200": _json(_ref("JobList"), "The jobs."),
                    **_errors(400, *auth_errors, 503),
                },
                parameters=[
                    _query("limit", _integer(1, MAX_LIST_LIMIT, 50), "At most this many."),
                    _query("status", {"enum": [s.value for s in JobStatus]}, "Only these."),
                ],
                security=api_security,
            ),
            "head": operation(
                "As GET, without the body.", {**head_ok, **_head_errors(400, *auth_errors, 503)}
            ),
        },
        "/api/jobs/{job_id}": {
            "parameters": [job_id],
            "get": operation(
                "The job's snapshot.",
                {"200": job, **_errors(*auth_errors, 404, 503)},
                security=api_security,
            ),
            "head": operation(
                "As GET, without the body.", {**head_ok, **_head_errors(*auth_errors, 404, 503)}
            ),
        },
        "/api/jobs/{job_id}/cancel": {
            "parameters": [job_id],
            "post": operation(
                "Cancel a queued or running job; its stream ends with `done` `cancelled`.",
                {
                    "202": _json(_ref("Job"), "The job's snapshot as the cancel began."),
                    **_errors(*auth_errors, 403, 404, 409, 503),
                },
                security=api_security,
            ),
        },
        "/api/jobs/{job_id}/stream": {
            "parameters": [job_id],
            "get": operation(
                "The job's events as Server-Sent Events: `retry:`, then each event as "
                "`id:`/`event:`/`data:` (one line of JSON, the `Event` schema), then `done`; "
                "heartbeats (`event: heartbeat`, no `id:`) after a quiet interval; padding "
                "as comment lines.",
                {
                    "200": {"description": "The stream; it ends after `done`.", "content": sse},
                    "204": {"description": "The resume point is the finished job's last event."},
                    **_errors(400, *auth_errors, 404, 410, 503),
                },
                parameters=[
                    last_event_id,
                    last_event_id_header,
                    _query(
                        "proxy_buffer",
                        _integer(0, MAX_PROXY_BUFFER_BYTES),
                        "Shape this stream with `aligned` at this block size (0: no padding).",
                    ),
                    token,
                ],
                security=stream_security,
            ),
        },
        "/api/jobs/{job_id}/events": {
            "parameters": [job_id],
            "get": operation(
                "Long-poll: the events after `after`, at once if any, else when the next is "
                "published, else an empty list after `wait_s`.",
                {
                    "200": _json(
                        _ref("EventPage"),
                        "The events (at most `limit`).",
                        {"Cache-Control": {"schema": {"const": "no-store"}}},
                    ),
                    **_errors(400, *auth_errors, 404, 410, 503),
                },
                parameters=[
                    _query("after", _integer(0, MAX_SEQ, 0), "The last seq already seen."),
                    _query("wait_s", _integer(0, MAX_WAIT_S, DEFAULT_WAIT_S), "Wait at most."),
                    _query("limit", _integer(1, MAX_LIMIT, DEFAULT_LIMIT), "At most this many."),
                    token,
                ],
                security=stream_security,
            ),
        },
        "/api/diagnostics/stream": {
            "get": operation(
                "The timed write pattern `flushline probe` reads (at most 60 s).",
                {"200": {"description": "The pattern.", "content": sse}, **_errors(400)},
                parameters=[
                    _query(name, _integer(low, high, default), f"See `flushline probe`: {name}.")
                    for name, (low, high, default) in DIAGNOSTICS_LIMITS.items()
                ],
            ),
        },
        "/healthz": {
            "get": operation(
                "Liveness: the process answers.", {"200": _json(_ref("Health"), "Up.")}
            ),
            "head": operation("As GET, without the body.", head_ok),
        },
        "/readyz": {
            "get": operation(
                "Readiness: not while draining or while Redis is unreachable.",
                {"200": _json(_ref("Ready"), "Ready to take jobs."), **_errors(503)},
            ),
            "head": operation("As GET, without the body.", {**head_ok, **_head_errors(503)}),
        },
        "/metrics": {
            "get": operation(
                "The instance's metrics in the Prometheus text format.",
                {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
        },
        "/openapi.json": {
            "get": operation(
                "This description.",
                {"200": _json({"type": "object", "required": ["openapi"]}, "OpenAPI 3.1.")},
            ),
        },
        "/": {
            "get": operation(
                "The live progress page (`?job=ID` opens an existing job).",
                {"200": {"description": "HTML.", "content": {"text/html": {"schema": {}}}}},
            ),
            "head": operation("As GET, without the body.", head_ok),
        },
        "/static/{filename}": {
            "parameters": [
                {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": operation(
                "The page's files and the browser client `flushline.js`.",
                {
                    "200": {
                        "description": "The file.",
                        "content": {
                            "application/javascript": {"schema": {}},
                            "text/css": {"schema": {}},
                            "text/html": {"schema": {}},
                        },
                    },
                    **_errors(403, 404),
                },
            ),
            "head": operation("As GET, without the body.", {**head_ok, **_head_errors(403, 404)}),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Flushline",
            "version": __version__,
            "description": "Long jobs with live progress over Server-Sent Events that get "
            "through buffering proxies. Every error is the `Error` object: any path answers "
            "404 for an unknown route and 405 (with `Allow`) for a wrong method, and under "
            "`flushline serve` any request may get 400 (a malformed request or body), 408 "
            "(its head or body too slow), 413 (body too large), 415 (a `Content-Encoding` "
            "other than gzip or deflate), 431 (headers too large) or 501 (an unknown method) "
            "from the server before it reaches a route. A browser's preflight (`OPTIONS` "
            "with `Access-Control-Request-Method`) from an allowed origin gets 204; from any "
            "other, 403. "
            + (
                "Auth is on: the job API needs `Authorization: Bearer <token>`, the stream "
                "and long-poll the signed `token` of `links.stream`."
                if auth_on
                else "Auth is off on this instance (no `FLUSHLINE_API_TOKEN`): no credential "
                "is asked for."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(sorted(manager.pipelines), sorted(manager.strategies)),
            "responses": _error_responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of `FLUSHLINE_API_TOKEN` (when auth is on).",
                },
                "streamToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "A signed per-job token (`links.stream`), valid for "
                    "`FLUSHLINE_STREAM_TOKEN_TTL_S` (when auth is on).",
                },
            },
        },
    }


def _head_errors(*statuses: int) -> Spec:
    """Error statuses of a HEAD: the headers of the GET's error, no body."""
    return {str(status): {"description": _ERROR_MEANINGS[status]} for status in statuses}


def install_openapi(app: web.Application) -> None:
    """Add the ``/openapi.json`` route to ``app``."""
    encoded: list[bytes] = []

    async def openapi_json(request: web.Request) -> web.Response:
        """``GET /openapi.json``: the app's OpenAPI 3.1 description."""
        if not encoded:  # built at the first request: every route is registered by then
            encoded.append(orjson.dumps(build_spec(request.app)))
        return web.Response(
            body=encoded[0], content_type="application/json", headers={"Cache-Control": "no-cache"}
        )

    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
