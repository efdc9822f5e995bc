"""``POST /api/jobs/{id}/events``: an external job's producer publishes a batch.

The credential is ``Authorization: Bearer <publish_token>`` (the one the job's ``201``
carried), or, with auth on, an API token of the job's owner, whatever the auth setting:
knowing a job id never lets anyone forge its events, and a stream token (``?token=``)
opens streams, not this. The body is ``{"producer_seq": N, "events": [...]}``, checked
whole (:func:`app.jobs.external.parse_batch`) before the manager publishes anything; the
answer is ``200 {"accepted", "producer_seq", "duplicate", "last_event_id"}``.

A ``409`` carries what the producer needs to go on: ``status`` for a finished job
(``job_finished``: stop working), ``expected_producer_seq`` for a gap
(``producer_seq_gap``: resend from there).
"""

from __future__ import annotations

from aiohttp import hdrs, web

from app.core.errors import (
    InvalidApiToken,
    InvalidPublishToken,
    JobNotFound,
    TooLarge,
    Unauthenticated,
)
from app.jobs.external import PublishLimits, parse_batch
from app.web.api import json_body
from app.web.auth import AUTH, STREAM_TOKEN_PARAM
from app.web.keys import MANAGER, SETTINGS
from app.web.middleware import json_response

__all__ = ["PUBLISH_MAX_BODY_BYTES", "publish_events", "publish_limits"]

#: A publish body may be this large (or ``FLUSHLINE_MAX_BODY_BYTES``, if larger): a batch
#: of many events, each with its text, is larger than a job's creation.
PUBLISH_MAX_BODY_BYTES = 1 << 20


def publish_limits(request: web.Request) -> tuple[PublishLimits, int]:
    """The bounds of a publish to this app, and its largest body."""
    settings = request.app[SETTINGS]
    limits = PublishLimits(
        max_events=settings.publish_max_events,
        max_text_bytes=settings.publish_max_text_bytes,
        max_result_bytes=settings.max_body_bytes,
    )
    return limits, max(settings.max_body_bytes, PUBLISH_MAX_BODY_BYTES)


async def _authenticate(request: web.Request, job_id: str) -> None:
    """Let the job's publish token, or its owner's API token (auth on), through.

    No credential is ``401``; a stream token (``?token=``), or a bearer token that is
    neither, ``403``. Another owner's API token gets the ``404`` of no job, as on every
    job route.
    """
    authorization = request.headers.get(hdrs.AUTHORIZATION, "").strip()
    if not authorization:
        if STREAM_TOKEN_PARAM in request.query:
            raise InvalidPublishToken(
                "a stream token opens streams, never publishing: send "
                "Authorization: Bearer <the job's publish_token>"
            )
        raise Unauthenticated("publishing needs Authorization: Bearer <the job's publish_token>")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise InvalidPublishToken("the Authorization header must be 'Bearer <publish_token>'")
    manager = request.app[MANAGER]
    auth = request.app[AUTH]
    if auth.enabled:
        try:
            owner = auth.check_bearer(authorization)
        except InvalidApiToken:
            pass
        else:
            if (await manager.get(job_id)).owner != owner:
                raise JobNotFound(job_id)  # another token's job: its existence is not told
            return
    try:
        if await manager.check_publish_token(job_id, credential):
            return
    except JobNotFound:
        if not auth.enabled:
            await manager.get(job_id)  # no job at all: 404 (ids are not secret with auth off)
    raise InvalidPublishToken("the token is not this job's publish token")


async def publish_events(request: web.Request) -> web.Response:
    """Publish a batch of producer events to an external job: ``200`` with what happened."""
    job_id = request.match_info["job_id"]
    await _authenticate(request, job_id)
    limits, max_body = publish_limits(request)
    try:
        body = await json_body(request, max_body)
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge("body", f"a publish body is at most {max_body} bytes") from None
    producer_seq, events = parse_batch(body, limits)
    # A 409 (job_finished, producer_seq_gap) carries its details (status, the expected
    # producer_seq) through the JSON errors middleware, like every domain error.
    result = await request.app[MANAGER].publish(job_id, producer_seq, events)
    return json_response(result.to_json())
