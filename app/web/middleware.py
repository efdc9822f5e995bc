"""HTTP boundary: request ids, the canonical request log line, and JSON errors.

Every error leaves as ``{"error": {"code": ..., "message": ..., "request_id": ...}}``:
domain errors with their own status, aiohttp's HTTP exceptions (unknown route, wrong
method, body too large) with theirs, and anything unexpected as a logged 500 that names
no internals. Every answer, streams and static files included, gets the headers of
:func:`response_headers` before its first byte.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from app.core.errors import FlushlineError, InvalidField, Unauthenticated, backend_outage
from app.web.keys import STREAM_BYTES

__all__ = [
    "SERVER_HEADERS",
    "client_gone",
    "error_response",
    "json_response",
    "middlewares",
    "response_headers",
]

log = structlog.get_logger(__name__)

#: Headers of every answer, the server's own parser errors included: a ``Server`` without
#: versions (they tell an attacker which advisories apply), and no content sniffing.
SERVER_HEADERS = {"Server": "flushline", "X-Content-Type-Options": "nosniff"}
#: Answers under this prefix carry job data (or their errors): no cache may keep them.
_NO_STORE_PREFIX = "/api/jobs"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    431: "header_too_large",
    501: "method_not_implemented",
    429: "too_many_requests",
    503: "unavailable",
}


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    import orjson

    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _current_request_id() -> str | None:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return None if request_id is None else str(request_id)


def _error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """``{"error": {...}}`` with the request id the answer's ``X-Request-ID`` echoes."""
    error: dict[str, Any] = {"code": code, "message": message, **extra}
    request_id = _current_request_id()
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The contract's JSON error body, with the request's id."""
    return json_response(_error_body(code, message), status, headers)


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    status = exc.status
    message = exc.text or exc.reason
    if status == 404:
        message = "no such route"
    elif status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"method {exc.method} not allowed here; allowed: {allowed}"
        return error_response(status, _HTTP_CODES[405], message, {"Allow": allowed})
    elif status == 413:
        message = f"request body too large: {exc.text}"
    code = _HTTP_CODES.get(status, "http_error")
    return error_response(status, code, str(message).removeprefix(f"{status}: "))


def _body_bytes(response: web.StreamResponse | None) -> int | None:
    """The response body's size: a plain response is not written yet when we log it."""
    if isinstance(response, web.Response) and not response.prepared:
        body = response.body
        return len(body) if isinstance(body, bytes | bytearray) else response.content_length
    if response is None:
        return None
    written: int | None = response.get(STREAM_BYTES)
    return response.body_length if written is None else written


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the client has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind ``request_id`` for the request's logs and write one canonical line at its end.

    ``outcome`` says how the request ended: ``completed`` (a response, whatever its
    status), ``client_gone`` (the client left first: status 499, nginx's "client closed
    request", at info level because it is no server error) or ``cancelled`` (the server
    is stopping).
    """
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(8)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.monotonic()
    status, outcome = 500, "error"
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status, outcome = response.status, "completed"
        return response
    except asyncio.CancelledError:
        status, outcome = 499, "client_gone" if client_gone(request) else "cancelled"
        raise
    except ConnectionResetError:
        # Reading the body of a client that left, when aiohttp does not cancel handlers
        # (its default outside ``run_app``). Answering keeps aiohttp from logging it as
        # an error; the answer itself goes nowhere.
        if not client_gone(request):
            raise
        status, outcome = 499, "client_gone"
        return web.Response(status=499)
    finally:
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=status,
            outcome=outcome,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            bytes=_body_bytes(response),
            remote=request.remote,
        )


async def response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers of every answer, streams too (before they go).

    The request id (``X-Request-ID``); ``X-Content-Type-Options: nosniff``; a ``Server``
    without versions; ``Cache-Control: no-store`` on the job API's answers, unless the
    handler set its own (a stream keeps ``no-cache, no-transform``).
    """
    headers = response.headers
    request_id = _current_request_id()
    if request_id:
        headers.setdefault("X-Request-ID", request_id)
    headers.update(SERVER_HEADERS)
    if request.path == _NO_STORE_PREFIX or request.path.startswith(_NO_STORE_PREFIX + "/"):
        headers.setdefault(hdrs.CACHE_CONTROL, "no-store")


def _domain_error(exc: FlushlineError) -> web.Response:
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthenticated):
        headers[hdrs.WWW_AUTHENTICATE] = exc.challenge
    extra: dict[str, Any] = exc.details()
    if isinstance(exc, InvalidField):
        extra["field"] = exc.field
    response = json_response(_error_body(exc.code, exc.message, **extra), exc.status, headers)
    if exc.close_connection:
        response.force_close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate every error into the contract's JSON shape."""
    try:
        return await handler(request)
    except FlushlineError as exc:
        return _domain_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc)
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and client_gone(request):
            raise  # no server error: request_context logs the request as client_gone
        started = request.writer is not None and bool(request.writer.output_size)
        outage = backend_outage(exc)
        if outage is not None and not started:
            log.warning("backend unavailable", error=outage.message)
            return _domain_error(outage)
        log.exception("unhandled error")
        if started:
            raise  # a stream already started: aiohttp drops the connection, the client resumes
        return error_response(500, "internal_error", "internal error; see the server log")


middlewares = [request_context, json_errors]
