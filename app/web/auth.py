"""Auth: bearer API tokens for the job API, signed per-job stream tokens for its streams.

Off unless ``FLUSHLINE_API_TOKEN`` lists tokens. Then every route of the job API (the
path ``/api/jobs`` and every path with a ``{job_id}``, found from the router, so a new
route is covered without being named here) needs ``Authorization: Bearer <token>``: a
missing credential is ``401`` with ``WWW-Authenticate: Bearer``, a token that is not
configured ``403``. A job is its creator's: another token's request for it is answered
``404``, as for a job that does not exist, and a list shows only the caller's jobs.

A browser's ``EventSource`` cannot send headers, so the stream and long-poll routes also
take ``?token=``: a stream token scoped to one job with an expiry, signed with
HMAC-SHA256 under ``FLUSHLINE_SECRET_KEY``. The API hands one out in every snapshot's
``links``. A missing one is ``401``; one for another job, expired or badly signed is
``403``. A request carrying both a stream token that fails and a bearer header is
judged by the bearer header, so a long watch outlives its URL's token. A stream token
opens only those reads: it never publishes.

Publishing to an external job (``POST /api/jobs/{id}/events``) is judged by its handler
(``app.web.publish``), with auth on or off: the job's publish token (the ``201`` carried
it; a random secret of which only the SHA-256 is kept), or with auth on an API token of
the job's owner.

Every comparison with a secret is constant-time (``hmac.compare_digest``), and the API
token itself is kept nowhere but in the settings: a job records the token's fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable

import attrs
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from app.core.errors import (
    AuthError,
    InvalidApiToken,
    InvalidStreamToken,
    JobNotFound,
    StreamTokenExpired,
    StreamTokenForOtherJob,
    Unauthenticated,
)
from app.core.settings import Settings
from app.jobs.store import JobSnapshot
from app.web.keys import JOB, MANAGER, OWNER, SETTINGS

__all__ = [
    "API_PATH",
    "AUTH",
    "PUBLISH_ROUTE",
    "STREAM_TOKEN_PARAM",
    "STREAM_TOKEN_ROUTES",
    "Authenticator",
    "guarded",
    "install_auth",
    "requested_job",
]

#: The query parameter carrying a stream token.
STREAM_TOKEN_PARAM = "token"
#: The job API's collection; it and every route with a ``{job_id}`` need a credential.
API_PATH = "/api/jobs"
#: The routes that also take a stream token (``?token=``) instead of a bearer header (for
#: ``GET`` only: a stream token reads, never writes).
STREAM_TOKEN_ROUTES = frozenset({"/api/jobs/{job_id}/stream", "/api/jobs/{job_id}/events"})
#: The publish route: its handler checks the job's publish token (or an API token).
PUBLISH_ROUTE = ("POST", "/api/jobs/{job_id}/events")
#: Random secret-key bytes when ``FLUSHLINE_SECRET_KEY`` is empty (one process only).
GENERATED_KEY_BYTES = 32
_STREAM_CONTEXT = b"flushline stream token v1\x00"
_OWNER_CONTEXT = b"flushline owner v1\x00"
#: Hex digits of an owner fingerprint (128 bits).
_OWNER_HEX = 32
_BEARER = "bearer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _secret_bytes(text: str) -> bytes:
    # Query and header values are str; a stray non-ASCII character must fail a comparison,
    # not raise.
    return text.encode("utf-8", "surrogatepass")


@attrs.frozen
class Authenticator:
    """Checks API tokens, names their owners, and signs and verifies stream tokens."""

    api_tokens: tuple[bytes, ...] = attrs.field(repr=False)
    secret_key: bytes = attrs.field(repr=False)
    stream_token_ttl_s: float = 3600.0
    #: Wall-clock seconds (stream tokens hold an absolute expiry, valid on every instance).
    clock: Callable[[], float] = time.time

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """From the settings; an empty secret key becomes a random one for this process."""
        key = settings.secret_key.encode() or secrets.token_bytes(GENERATED_KEY_BYTES)
        return cls(
            api_tokens=tuple(token.encode() for token in settings.api_tokens),
            secret_key=key,
            stream_token_ttl_s=settings.stream_token_ttl_s,
        )

    @property
    def enabled(self) -> bool:
        """Whether the job API needs a credential (``FLUSHLINE_API_TOKEN`` is set)."""
        return bool(self.api_tokens)

    def owner_of(self, token: bytes) -> str:
        """The fingerprint a job records for the API ``token`` that created it (never the token)."""
        digest = hmac.new(self.secret_key, _OWNER_CONTEXT + token, hashlib.sha256).hexdigest()
        return digest[:_OWNER_HEX]

    def check_bearer(self, authorization: str | None) -> str:
        """The owner fingerprint of an ``Authorization: Bearer`` header's configured token.

        Raises :class:`Unauthenticated` without the header, :class:`InvalidApiToken` for
        any other scheme or a token not configured. Every configured token is compared,
        in constant time, whichever matches.
        """
        if authorization is None or not authorization.strip():
            raise Unauthenticated("this endpoint needs Authorization: Bearer <API token>")
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != _BEARER or not credential.strip():
            raise InvalidApiToken("the Authorization header must be 'Bearer <API token>'")
        # Digests of equal length: the comparison's time tells neither a token's value nor
        # its length.
        given = hashlib.sha256(_secret_bytes(credential.strip())).digest()
        matched: bytes | None = None
        for token in self.api_tokens:
            if hmac.compare_digest(hashlib.sha256(token).digest(), given):
                matched = token
        if matched is None:
            raise InvalidApiToken("the API token is not a valid one")
        return self.owner_of(matched)

    def stream_token(self, job_id: str) -> str:
        """A token that opens ``job_id``'s stream and long-poll for ``stream_token_ttl_s``.

        ``<payload>.<signature>``, both base64url: the payload is ``job_id`` and the
        expiry (Unix milliseconds); the signature is HMAC-SHA256 over the encoded payload.
        """
        expires_ms = math.ceil((self.clock() + self.stream_token_ttl_s) * 1000)
        payload = _b64(f"{job_id}\x00{expires_ms}".encode())
        return f"{payload}.{self._sign(payload)}"

    def check_stream_token(self, token: str, job_id: str) -> None:
        """Accept ``token`` for ``job_id``, or raise the :class:`AuthError` naming why not.

        The signature is checked first (over the payload as sent, so no edit of either
        part can pass), then the job, then the expiry.
        """
        payload, dot, signature = token.partition(".")
        if not dot or not payload or not signature:
            raise InvalidStreamToken("the stream token is malformed (expected payload.signature)")
        expected = self._sign(payload).encode("ascii")
        if not hmac.compare_digest(expected, _secret_bytes(signature)):
            raise InvalidStreamToken("the stream token's signature does not match")
        try:
            token_job, _, expires = _unb64(payload).decode().rpartition("\x00")
            expires_ms = int(expires)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            # Only a token signed with our key gets here: one we never issued.
            raise InvalidStreamToken("the stream token is malformed") from None
        if not hmac.compare_digest(_secret_bytes(token_job), _secret_bytes(job_id)):
            raise StreamTokenForOtherJob("the stream token was issued for another job")
        if expires_ms <= self.clock() * 1000:
            raise StreamTokenExpired(
                "the stream token has expired; get the job again for a fresh links.stream"
            )

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self.secret_key, _STREAM_CONTEXT + payload.encode(), hashlib.sha256)
        return _b64(mac.digest())


#: API and stream tokens.
AUTH = web.AppKey("auth", Authenticator)


def guarded(canonical: str) -> bool:
    """Whether a route (its canonical path) carries job data: the job API's routes."""
    return canonical == API_PATH or "{job_id}" in canonical


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let a request to the job API through only with a credential for what it asks."""
    auth = request.app[AUTH]
    if not auth.enabled or request.method == hdrs.METH_OPTIONS:
        # Preflights carry no credential by design (CorsPolicy answers them).
        return await handler(request)
    resource = request.match_info.route.resource
    canonical = "" if resource is None else resource.canonical
    if not guarded(canonical) or (request.method, canonical) == PUBLISH_ROUTE:
        return await handler(request)
    job_id = request.match_info.get("job_id")
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    reads = request.method in (hdrs.METH_GET, hdrs.METH_HEAD)
    if job_id is not None and canonical in STREAM_TOKEN_ROUTES and reads:
        token = request.query.get(STREAM_TOKEN_PARAM)
        if token is None and authorization is None:
            raise Unauthenticated(
                "this stream needs ?token= (from the job's links.stream) "
                "or Authorization: Bearer <API token>"
            )
        if token is not None:
            try:
                auth.check_stream_token(token, job_id)
            except AuthError:
                if authorization is None:
                    raise
            else:
                return await handler(request)
    owner = auth.check_bearer(authorization)
    request[OWNER] = owner
    if job_id is not None:
        job = await request.app[MANAGER].get(job_id)
        if job.owner != owner:
            raise JobNotFound(job_id)  # another token's job: its existence is not told
        request[JOB] = job
    return await handler(request)


async def requested_job(request: web.Request) -> JobSnapshot:
    """The job of a ``{job_id}`` route: as the auth middleware read it, else from the manager.

    ``JobNotFound`` if there is none. With Redis a read is a round trip (and a fold of
    the events since the last snapshot write): a request pays for one, not two.
    """
    job = request.get(JOB)
    if job is None:
        job = await request.app[MANAGER].get(request.match_info["job_id"])
    return job


def install_auth(app: web.Application) -> None:
    """Give ``app`` its authenticator and the middleware that enforces it.

    Installed after the CORS policy: its middleware runs inside CORS's, so a preflight is
    answered before a credential is asked for.
    """
    app[AUTH] = Authenticator.from_settings(app[SETTINGS])
    app.middlewares.append(auth_middleware)
