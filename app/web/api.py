"""The REST job API: create, read, list and cancel jobs (JSON in, JSON out).

``"pipeline": "external"`` with declared ``steps`` creates a job its producer publishes
(``app.web.publish``); the ``201`` answer alone carries its ``publish_token``.

With auth on (``app.web.auth``), the middleware has checked the caller's bearer token
before a handler runs, and a job is created for and listed by its fingerprint. Every
snapshot's ``links.stream`` and ``links.events`` (the long-poll URL) then carry a fresh
stream token for that job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from app.core.errors import BodyTooSlow, InvalidField, UnsupportedEncoding
from app.jobs.external import EXTERNAL_PIPELINE, parse_steps
from app.jobs.manager import JobRequest
from app.jobs.store import JobSnapshot, JobStatus
from app.web.auth import AUTH, STREAM_TOKEN_PARAM, requested_job
from app.web.keys import MANAGER, OWNER, SETTINGS
from app.web.middleware import json_response
from app.web.params import parse_int
from app.web.server import DECODED_CODINGS

__all__ = ["json_body", "routes", "snapshot_json"]

routes = web.RouteTableDef()

_BODY_FIELDS = ("pipeline", "input", "strategy", "options", "steps")
MAX_LIST_LIMIT = 1000
#: A listing stops growing past this many bytes: the older jobs are left out and it says
#: ``"truncated": true``. Kept jobs may hold results of a megabyte; a page of 1,000 of
#: them would otherwise hold as much as the whole memory budget, per request.
MAX_LIST_BODY_BYTES = 4 * 1024 * 1024


async def json_body(request: web.Request, max_bytes: int | None = None) -> dict[str, Any]:
    """The request's JSON object body (``{}`` when empty); at most ``max_bytes`` (default:
    ``FLUSHLINE_MAX_BODY_BYTES``), read within the header timeout."""
    # `flushline serve` refuses these before the app (app.web.server); under another
    # server (a test client, an embedding app) the same answers come from here.
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if coding not in DECODED_CODINGS:
        raise UnsupportedEncoding(coding)
    timeout_s = request.app[SETTINGS].header_timeout_s
    if max_bytes is not None:
        request = request.clone(client_max_size=max_bytes)
    try:
        # A body dripped a byte at a time must not hold the connection for ever.
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise BodyTooSlow(timeout_s) from None
    except RequestPayloadError as exc:
        raise InvalidField("body", f"cannot be read: {exc.__cause__ or exc}") from None
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidField("body", f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidField("body", "must be a JSON object")
    return body


def _optional_str(body: Mapping[str, Any], field: str, default: str) -> str:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise InvalidField(field, "must be a non-empty string")
    return value


def _optional_object(body: Mapping[str, Any], field: str) -> dict[str, Any]:
    value = body.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField(field, "must be a JSON object")
    return value


def snapshot_json(request: web.Request, job: JobSnapshot) -> dict[str, Any]:
    """The job's snapshot as the API answers it: ``links.events`` added, and with auth on
    ``links.stream`` and ``links.events`` carrying a stream token for the job."""
    snapshot = job.to_json()
    links: dict[str, str] = snapshot["links"]
    links.setdefault("events", f"/api/jobs/{job.id}/events")
    auth = request.app[AUTH]
    if auth.enabled:
        query = f"?{STREAM_TOKEN_PARAM}={auth.stream_token(job.id)}"
        for name in ("stream", "events"):
            links[name] += query
    return snapshot


@routes.post("/api/jobs")
async def create_job(request: web.Request) -> web.Response:
    """Create and start a job: ``201`` with its snapshot and ``Location``."""
    body = await json_body(request)
    unknown = sorted(set(body) - set(_BODY_FIELDS))
    if unknown:
        raise InvalidField(unknown[0], f"unknown field; allowed: {', '.join(_BODY_FIELDS)}")
    settings = request.app[SETTINGS]
    pipeline = _optional_str(body, "pipeline", settings.pipeline)
    external = pipeline == EXTERNAL_PIPELINE
    if not external and body.get("steps") is not None:
        raise InvalidField("steps", f'only for "pipeline": "{EXTERNAL_PIPELINE}"')
    job_request = JobRequest(
        pipeline=pipeline,
        strategy=_optional_str(body, "strategy", settings.strategy),
        input=_optional_object(body, "input"),
        options=_optional_object(body, "options"),
        owner=request.get(OWNER),
        steps=parse_steps(body.get("steps")) if external else (),
    )
    manager = request.app[MANAGER]
    if external:
        # The publish token is in this answer only: snapshots never carry it.
        job, token = await manager.create_external(job_request)
        snapshot = snapshot_json(request, job)
        snapshot["publish_token"] = token
    else:
        snapshot = snapshot_json(request, await manager.create(job_request))
    return json_response(snapshot, 201, {"Location": snapshot["links"]["self"]})


@routes.get("/api/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    """``{"jobs": [...], "truncated": bool}`` newest first; ``?limit=`` (1-1000, default
    50), ``?status=``. At most :data:`MAX_LIST_BODY_BYTES` (the newest job always)."""
    limit = parse_int(request.query.get("limit", "50"), "limit", 1, MAX_LIST_LIMIT)
    status = None
    if "status" in request.query:
        try:
            status = JobStatus(request.query["status"])
        except ValueError:
            allowed = ", ".join(s.value for s in JobStatus)
            raise InvalidField("status", f"must be one of {allowed}") from None
    # With auth on the middleware has set the caller's fingerprint: only their jobs.
    owner = request.get(OWNER)
    jobs = await request.app[MANAGER].newest(limit=limit, status=status, owner=owner)
    encoded: list[bytes] = []
    size = 0
    truncated = False
    for job in jobs:
        snapshot = orjson.dumps(snapshot_json(request, job))
        if encoded and size + len(snapshot) > MAX_LIST_BODY_BYTES:
            truncated = True
            break
        encoded.append(snapshot)
        size += len(snapshot) + 1
    body = b'{"jobs":[%b],"truncated":%b}' % (
        b",".join(encoded),
        b"true" if truncated else b"false",
    )
    return web.Response(body=body, content_type="application/json")


@routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    """The job's snapshot."""
    job = await requested_job(request)
    return json_response(snapshot_json(request, job))


@routes.post("/api/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a queued or running job: ``202``; ``409`` if it has already ended."""
    job = await request.app[MANAGER].cancel(request.match_info["job_id"])
    return json_response(snapshot_json(request, job), 202)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok", "active_jobs": request.app[MANAGER].active_jobs})


#: How long ``/readyz`` waits for Redis to answer.
READY_TIMEOUT_S = 1.0


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: ``200 {"status": "ready"}``; ``503`` while draining or Redis is unreachable."""
    await request.app[MANAGER].check_ready(READY_TIMEOUT_S)
    return json_response({"status": "ready"})
