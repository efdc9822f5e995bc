"""Domain errors. Each carries the HTTP status and code it becomes at the boundary.

Code below the HTTP layer raises these; ``app.web.middleware`` turns them into the
contract's JSON error body ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

__all__ = [
    "AtCapacity",
    "AuthError",
    "BackendUnavailable",
    "BodyTooSlow",
    "Draining",
    "FlushlineError",
    "HistoryTruncated",
    "InvalidApiToken",
    "InvalidField",
    "InvalidPublishToken",
    "InvalidStreamToken",
    "JobAlreadyFinished",
    "JobNotFound",
    "OriginNotAllowed",
    "OverBudget",
    "ProducerBusy",
    "ProducerSeqGap",
    "PublishRateLimited",
    "StreamTokenExpired",
    "StreamTokenForOtherJob",
    "SubscriberLagged",
    "TooLarge",
    "TooManyConnections",
    "Unauthenticated",
    "UnsupportedEncoding",
    "backend_outage",
]


class FlushlineError(Exception):
    """Base of every domain error; ``status`` and ``code`` decide the HTTP answer."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    #: Seconds for the ``Retry-After`` header of the answer (``None``: no header).
    retry_after_s: int | None = None
    #: Whether the answer closes the connection.
    close_connection: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, Any]:
        """Fields of the JSON error body beyond ``code`` and ``message`` (``field``, ...)."""
        return {}


class InvalidField(FlushlineError):
    """A request field (body, query or header) has a value we cannot use."""

    status = 400
    code = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def details(self) -> dict[str, Any]:
        return {"field": self.field}


class TooLarge(InvalidField):
    """A request field past its size bound (a publish batch, an event's text, a job's bytes)."""

    status = 413
    code = "too_large"


class JobNotFound(FlushlineError):
    """No job with that id exists here (or it has expired)."""

    status = 404
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class JobAlreadyFinished(FlushlineError):
    """A cancel (or a producer's publish) arrived for a job that has already ended."""

    status = 409
    code = "job_finished"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} has already ended with status {status!r}")
        self.job_id = job_id
        self.job_status = status

    def details(self) -> dict[str, Any]:
        return {"status": self.job_status}


class ProducerSeqGap(FlushlineError):
    """A publish batch whose ``producer_seq`` is past the next one the job expects."""

    status = 409
    code = "producer_seq_gap"

    def __init__(self, job_id: str, got: int, expected: int) -> None:
        super().__init__(
            f"job {job_id} expects producer_seq {expected} next; got {got} "
            f"(resend the batches from {expected} on)"
        )
        self.expected = expected

    def details(self) -> dict[str, Any]:
        return {"expected_producer_seq": self.expected}


class PublishRateLimited(FlushlineError):
    """A producer publishing faster than ``FLUSHLINE_PUBLISH_RATE`` events per second."""

    status = 429
    code = "rate_limited"

    def __init__(self, rate_per_s: float, retry_after_s: int) -> None:
        super().__init__(
            f"this job takes at most {rate_per_s:g} producer events per second "
            f"(FLUSHLINE_PUBLISH_RATE); retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class ProducerBusy(FlushlineError):
    """Another publish to the same job held it for longer than a publish may wait."""

    status = 503
    code = "producer_busy"

    def __init__(self, job_id: str, retry_after_s: int = 1) -> None:
        super().__init__(
            f"another publish to job {job_id} is still under way; retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class AtCapacity(FlushlineError):
    """Too many jobs are running; the client should retry later."""

    status = 503
    code = "at_capacity"

    def __init__(self, limit: int, retry_after_s: int = 5) -> None:
        super().__init__(f"{limit} jobs are already running; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class OverBudget(FlushlineError):
    """Running jobs hold the whole ``FLUSHLINE_MAX_RETAINED_BYTES``; retry later."""

    status = 503
    code = "at_capacity"

    def __init__(self, running: int, retry_after_s: int = 5) -> None:
        super().__init__(
            f"{running} running jobs hold the memory budget (FLUSHLINE_MAX_RETAINED_BYTES); "
            f"retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class TooManyConnections(FlushlineError):
    """The server holds ``FLUSHLINE_MAX_CONNECTIONS``: no new stream or long-poll."""

    status = 503
    code = "too_many_connections"
    #: The answer closes its connection: the descriptor is what is short.
    close_connection = True

    def __init__(self, open_connections: int, limit: int, retry_after_s: int = 2) -> None:
        super().__init__(
            f"this instance holds {open_connections} connections (limit {limit}); "
            f"retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class BodyTooSlow(FlushlineError):
    """A request body that did not arrive within ``FLUSHLINE_HEADER_TIMEOUT_S``."""

    status = 408
    code = "request_timeout"
    #: What is left of the body is not read: the connection cannot carry another request.
    close_connection = True

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class UnsupportedEncoding(FlushlineError):
    """A request body in a ``Content-Encoding`` the service does not decode."""

    status = 415
    code = "unsupported_encoding"

    def __init__(self, coding: str) -> None:
        super().__init__(
            f"Content-Encoding {coding!r} is not supported; send identity, gzip or deflate"
        )


class Draining(FlushlineError):
    """The instance is shutting down: it takes no new job (another instance will)."""

    status = 503
    code = "draining"

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__(f"this instance is shutting down; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BackendUnavailable(FlushlineError):
    """Redis (where jobs and events live) cannot be reached right now."""

    status = 503
    code = "backend_unavailable"

    def __init__(self, reason: str, retry_after_s: int = 2) -> None:
        super().__init__(f"the job store is unreachable ({reason}); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class OriginNotAllowed(FlushlineError):
    """A browser page from an origin not in ``FLUSHLINE_CORS_ORIGINS`` tried to change state."""

    status = 403
    code = "origin_not_allowed"

    def __init__(self, origin: str) -> None:
        super().__init__(
            f"origin {origin[:200]!r} is not allowed (FLUSHLINE_CORS_ORIGINS lists who is)"
        )


class HistoryTruncated(FlushlineError):
    """A resume point is older than the history the bus still keeps."""

    status = 410
    code = "history_truncated"

    def __init__(self, job_id: str, after_seq: int, first_seq: int) -> None:
        super().__init__(
            f"job {job_id} keeps events from seq {first_seq} on; cannot resume after {after_seq}"
        )
        self.first_seq = first_seq

    def details(self) -> dict[str, Any]:
        return {"first_seq": self.first_seq}


class SubscriberLagged(FlushlineError):
    """A subscriber fell further behind than its queue allows and was cut off."""

    status = 503
    code = "subscriber_lagged"


class AuthError(FlushlineError):
    """A request to the job API without a credential that opens what it asks for."""


class Unauthenticated(AuthError):
    """No credential at all: ``401`` with ``WWW-Authenticate``."""

    status = 401
    code = "unauthenticated"
    #: The ``WWW-Authenticate`` header of the answer (RFC 6750).
    challenge: ClassVar[str] = 'Bearer realm="flushline"'


class InvalidApiToken(AuthError):
    """An ``Authorization`` header whose token is not a configured one (or is malformed)."""

    status = 403
    code = "invalid_token"


class InvalidStreamToken(AuthError):
    """A stream token that is malformed or whose signature does not match."""

    status = 403
    code = "invalid_stream_token"


class StreamTokenForOtherJob(AuthError):
    """A well-signed stream token of another job."""

    status = 403
    code = "stream_token_wrong_job"


class StreamTokenExpired(AuthError):
    """A well-signed stream token of this job, past its expiry."""

    status = 403
    code = "stream_token_expired"


class InvalidPublishToken(AuthError):
    """A credential that is neither the job's publish token nor an API token of its owner."""

    status = 403
    code = "invalid_publish_token"


def backend_outage(exc: BaseException) -> BackendUnavailable | None:
    """The domain error for a lost Redis connection (None for any other error).

    Looked up without importing redis: a memory-bus service never loads it.
    """
    if isinstance(exc, BackendUnavailable):
        return exc
    errors = sys.modules.get("redis.exceptions")
    if errors is not None and isinstance(exc, errors.ConnectionError | errors.TimeoutError):
        return BackendUnavailable(" ".join(str(exc).split()) or type(exc).__name__)
    return None
