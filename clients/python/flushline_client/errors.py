"""The errors the client raises: the service's JSON errors, a lost stream, an ended job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ClientError",
    "JobCancelled",
    "JobFinished",
    "ProducerSeqGap",
    "PublishFailed",
    "PublisherClosed",
    "StreamLost",
]


class ClientError(Exception):
    """The service refused a request; carries its JSON error (``code``, ``field``, the rest
    of the error object in ``details``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details: Mapping[str, Any] = details or {}


class StreamLost(Exception):
    """The stream kept dropping: ``max_attempts`` reconnects in a row brought nothing new."""


class JobFinished(ClientError):
    """A publish to a job that has ended (``409 job_finished``): ``job_status`` says how
    (``failed`` after ``producer_lost``, ``succeeded``, ``cancelled``)."""

    @property
    def job_status(self) -> str:
        """The ended job's status, from the error body."""
        return str(self.details.get("status", ""))


class JobCancelled(JobFinished):
    """The job was cancelled (from the API or the page): stop working on it."""


class ProducerSeqGap(ClientError):
    """The service expects another ``producer_seq`` (``409 producer_seq_gap``): another
    producer publishes to this job, or this one started past the next batch."""

    @property
    def expected(self) -> int | None:
        """The ``producer_seq`` the service expects next."""
        value = self.details.get("expected_producer_seq")
        return value if isinstance(value, int) else None


class PublisherClosed(RuntimeError):
    """A call on a publisher that is closed, or whose job it has already ended."""


class PublishFailed(Exception):
    """A batch could not be delivered: every retry failed for ``give_up_after_s``."""
