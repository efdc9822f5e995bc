"""Where a reader of a job's events starts: the resume point, checked against the job's log.

The SSE stream and the long-poll endpoint accept the same resume points and fail the
same way: ``404`` for an unknown job, ``400`` for a point past the newest event, ``410``
for one older than the kept history (raised when the subscription is entered).
"""

from __future__ import annotations

from aiohttp import web

from app.bus import EventBus
from app.core.errors import InvalidField
from app.web.params import parse_seq

__all__ = ["check_resume_point", "stream_resume_point"]


def stream_resume_point(request: web.Request) -> tuple[str, int]:
    """The stream's resume point and the field it came from.

    ``Last-Event-ID`` (header) wins over ``?last_event_id=`` because a reconnecting
    ``EventSource`` sends the newest id there while its URL keeps the query it was first
    opened with. Without either, 0: the whole history.
    """
    if "Last-Event-ID" in request.headers:
        field, raw = "Last-Event-ID", request.headers["Last-Event-ID"]
    elif "last_event_id" in request.query:
        field, raw = "last_event_id", request.query["last_event_id"]
    else:
        return "Last-Event-ID", 0
    return field, parse_seq(raw, field)


async def check_resume_point(bus: EventBus, job_id: str, after_seq: int, field: str) -> None:
    """Refuse a resume point past the job's newest event, naming ``field``.

    No event with that seq exists: waiting there would deliver events that are not the
    ones the client saw (and, once the job ended, make it reconnect forever).
    """
    newest = await bus.last_seq(job_id)
    if after_seq > newest:
        raise InvalidField(field, f"{after_seq} is beyond the job's newest event ({newest})")
