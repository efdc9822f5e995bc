"""The API description: ``GET /openapi.json``, OpenAPI 3.1 of every route the app serves.

Built once per app from the app's own settings and limits: the pipelines and strategies
it accepts, the bounds its parameters are checked against, and whether auth is on (then
the job API needs a bearer token and the stream and long-poll a signed stream token, and
their 401 and 403 answers are listed). ``tests/test_openapi.py`` keeps it true: every
route of ``app.router`` is described, real answers validate against it, and schemathesis
fuzzes the live server from it.

This module holds the paths; the component schemas and shared error responses they refer to
are in ``app.web.openapi_components``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app import __version__
from app.jobs.store import JobStatus
from app.web.api import MAX_LIST_LIMIT
from app.web.diagnostics import PATTERN_LIMITS as DIAGNOSTICS_LIMITS
from app.web.keys import MANAGER, SETTINGS
from app.web.openapi_components import (
    Spec,
    components,
    error_refs,
    head_errors,
    json_response,
    schema_ref,
)
from app.web.params import MAX_SEQ
from app.web.poll import DEFAULT_LIMIT, DEFAULT_WAIT_S, MAX_LIMIT, MAX_WAIT_S
from app.web.stream import MAX_PROXY_BUFFER_BYTES

__all__ = ["build_spec", "install_openapi"]


def _query_parameter(name: str, schema: Spec, description: str) -> Spec:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _bounded_integer(low: int, high: int, default: int | None = None) -> Spec:
    schema: Spec = {"type": "integer", "minimum": low, "maximum": high}
    if default is not None:
        schema["default"] = default
    return schema


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
    token = _query_parameter(
        "token",
        {"type": "string"},
        "The signed stream token in `links.stream` and `links.events` (auth on); ignored "
        "when auth is off.",
    )
    last_event_id = _query_parameter(
        "last_event_id",
        _bounded_integer(0, MAX_SEQ),
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
    job = json_response(schema_ref("Job"), "The job's snapshot.")
    head_ok = {"200": {"description": "As GET, without the body."}}

    def operation(summary: str, responses: Spec, **extra: Any) -> Spec:
        return {"summary": summary, "responses": responses, **extra}

    paths: Spec = {
        "/api/jobs": {
            "post": operation(
                "Create and start a job.",
                {
                    "201": json_response(
                        schema_ref("CreatedJob"),
                        "The job's first snapshot (an external job's with its `publish_token`).",
                        {"Location": {"required": True, "schema": {"type": "string"}}},
                    ),
                    **error_refs(400, *auth_errors, 403, 408, 413, 415, 503),
                },
                requestBody={
                    "required": False,
                    "content": {"application/json": {"schema": schema_ref("JobRequest")}},
                },
                security=api_security,
            ),
            "get": operation(
                "Jobs, newest first (with auth on: the caller's only).",
                {
                    "200": json_response(schema_ref("JobList"), "The jobs."),
                    **error_refs(400, *auth_errors, 503),
                },
                parameters=[
                    _query_parameter(
                        "limit", _bounded_integer(1, MAX_LIST_LIMIT, 50), "At most this many."
                    ),
                    _query_parameter(
                        "status", {"enum": [s.value for s in JobStatus]}, "Only these."
                    ),
                ],
                security=api_security,
            ),
            "head": operation(
                "As GET, without the body.", {**head_ok, **head_errors(400, *auth_errors, 503)}
            ),
        },
        "/api/jobs/{job_id}": {
            "parameters": [job_id],
            "get": operation(
                "The job's snapshot.",
                {"200": job, **error_refs(*auth_errors, 404, 503)},
                security=api_security,
            ),
            "head": operation(
                "As GET, without the body.", {**head_ok, **head_errors(*auth_errors, 404, 503)}
            ),
        },
        "/api/jobs/{job_id}/cancel": {
            "parameters": [job_id],
            "post": operation(
                "Cancel a queued or running job; its stream ends with `done` `cancelled`.",
                {
                    "202": json_response(
                        schema_ref("Job"), "The job's snapshot as the cancel began."
                    ),
                    **error_refs(*auth_errors, 403, 404, 409, 503),
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
                    **error_refs(400, *auth_errors, 404, 410, 503),
                },
                parameters=[
                    last_event_id,
                    last_event_id_header,
                    _query_parameter(
                        "proxy_buffer",
                        _bounded_integer(0, MAX_PROXY_BUFFER_BYTES),
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
                    "200": json_response(
                        schema_ref("EventPage"),
                        "The events (at most `limit`).",
                        {"Cache-Control": {"schema": {"const": "no-store"}}},
                    ),
                    **error_refs(400, *auth_errors, 404, 410, 503),
                },
                parameters=[
                    _query_parameter(
                        "after", _bounded_integer(0, MAX_SEQ, 0), "The last seq already seen."
                    ),
                    _query_parameter(
                        "wait_s", _bounded_integer(0, MAX_WAIT_S, DEFAULT_WAIT_S), "Wait at most."
                    ),
                    _query_parameter(
                        "limit", _bounded_integer(1, MAX_LIMIT, DEFAULT_LIMIT), "At most this many."
                    ),
                    token,
                ],
                security=stream_security,
            ),
            "post": operation(
                "Publish a batch of an external job's producer events, exactly once per "
                "`producer_seq`: validated whole, then turned into the job's events (its "
                "strategy's cadence, token-based progress and ETA).",
                {
                    "200": json_response(
                        schema_ref("PublishResult"),
                        "Published (or, `duplicate`, accepted before: nothing published).",
                    ),
                    **error_refs(400, 401, 403, 404, 408, 409, 413, 415, 429, 503),
                },
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": schema_ref("PublishRequest")}},
                },
                security=[{"publishToken": []}, *([{"bearerAuth": []}] if auth_on else [])],
            ),
        },
        "/api/diagnostics/stream": {
            "get": operation(
                "The timed write pattern `flushline probe` reads (at most 60 s and 512 KiB;"
                " counted against FLUSHLINE_MAX_CONNECTIONS).",
                {
                    "200": {"description": "The pattern.", "content": sse},
                    **error_refs(400, *auth_errors, 503),
                },
                security=api_security,
                parameters=[
                    _query_parameter(
                        name,
                        _bounded_integer(low, high, default),
                        f"See `flushline probe`: {name}.",
                    )
                    for name, (low, high, default) in DIAGNOSTICS_LIMITS.items()
                ],
            ),
        },
        "/healthz": {
            "get": operation(
                "Liveness: the process answers.",
                {"200": json_response(schema_ref("Health"), "Up.")},
            ),
            "head": operation("As GET, without the body.", head_ok),
        },
        "/readyz": {
            "get": operation(
                "Readiness: not while draining or while Redis is unreachable.",
                {
                    "200": json_response(schema_ref("Ready"), "Ready to take jobs."),
                    **error_refs(503),
                },
            ),
            "head": operation("As GET, without the body.", {**head_ok, **head_errors(503)}),
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
                {"200": json_response({"type": "object", "required": ["openapi"]}, "OpenAPI 3.1.")},
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
                    **error_refs(403, 404),
                },
            ),
            "head": operation("As GET, without the body.", {**head_ok, **head_errors(403, 404)}),
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
        "components": components(sorted(manager.pipelines), sorted(manager.strategies)),
    }


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
