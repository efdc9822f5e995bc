"""Long-polling: a job's events as complete JSON responses, for paths that defeat streaming.

``GET /api/jobs/{id}/events?after=N&wait_s=S&limit=L`` answers at once when events
after ``N`` exist, else when the next one is published, else after ``S`` seconds with an
empty list. Every answer is a complete response with a ``Content-Length``, so a proxy
that buffers or compresses whole responses passes it as soon as it is sent, and
``Cache-Control: no-store`` so that no cache on the path answers a poll with an old one.
A poll waiting on an instance that starts shutting down (with Redis) answers at once
with what it has, so the next poll goes to another instance.

Polls are cheap at scale: every poll of one job waiting after the same seq (with the same
``limit``) shares one read of the bus, and its answer is built once, from the events'
JSON as encoded at publish, and written to each of them. A thousand watchers of one job
cost one subscription and one body per event, not a thousand; each poll still keeps its
own ``wait_s`` (it leaves the shared read when its wait is over, and the last to leave
cancels the read and awaits it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import attrs
import structlog
from aiohttp import web

from app.bus import EventBus
from app.bus.base import Batch, Subscription
from app.core.events import EncodedEvent
from app.jobs.manager import JobManager
from app.web.auth import AUTH, requested_job
from app.web.keys import BUS, MANAGER
from app.web.params import parse_int, parse_seq
from app.web.resume import check_resume_point
from app.web.server import check_room

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_WAIT_S",
    "MAX_LIMIT",
    "MAX_WAIT_S",
    "SHARED_READS",
    "SharedReads",
    "poll_events",
]

log = structlog.get_logger(__name__)

DEFAULT_WAIT_S = 25
#: Below the 60 s idle timeout of common proxies and load balancers.
MAX_WAIT_S = 55
DEFAULT_LIMIT = 500
MAX_LIMIT = 1000

_HEADERS = {"Cache-Control": "no-store"}


def _body(events: list[EncodedEvent], last_event_id: int, done: bool) -> bytes:
    # The payloads are the events' JSON, encoded once at publish: join, do not re-encode.
    return b"".join(
        (
            b'{"events":[',
            b",".join(event.payload for event in events),
            b'],"last_event_id":%d,"done":%s}' % (last_event_id, b"true" if done else b"false"),
        )
    )


async def _first_batch(subscription: Subscription, wait_s: float, manager: JobManager) -> Batch:
    """Wait up to ``wait_s`` for events, less if this instance starts handing off."""
    if manager.handing_off:
        wait_s = 0
    if manager.control is None or wait_s == 0:
        return await subscription.next_batch(wait_s)
    guard = asyncio.timeout(None)
    unregister = manager.on_drain(lambda: guard.reschedule(asyncio.get_running_loop().time()))
    try:
        with contextlib.suppress(TimeoutError):
            async with guard:
                return await subscription.next_batch(wait_s)
        return await subscription.next_batch(0)
    finally:
        unregister()


async def _read(
    bus: EventBus, manager: JobManager, job_id: str, after_seq: int, wait_s: float, limit: int
) -> bytes:
    """The answer's body: the events after ``after_seq`` (waiting up to ``wait_s``)."""
    events: list[EncodedEvent] = []
    done = False
    async with bus.subscribe(job_id, after_seq) as subscription:
        batch = await _first_batch(subscription, wait_s, manager)
        while batch.events:
            events.extend(batch.events)
            if len(events) >= limit:
                break
            batch = await subscription.next_batch(0)  # what else is already there
        done = batch.ended
    events = events[:limit]
    return _body(events, events[-1].seq if events else after_seq, done)


#: Which polls may share a read: (job id, after, limit).
_ReadKey = tuple[str, int, int]


@attrs.define(eq=False)
class _SharedRead:
    """One read of the bus, and how many polls are waiting for it."""

    task: asyncio.Task[bytes]
    members: int = 0


class SharedReads(dict[_ReadKey, _SharedRead]):
    """The app's long-poll reads in flight, by what may share them (one map per app)."""


#: The reads in flight (a read leaves the map once it has its answer); the factory sets it.
SHARED_READS = web.AppKey("poll_shared_reads", SharedReads)


async def _shared_answer(
    app: web.Application, key: _ReadKey, read: Callable[[], Awaitable[bytes]], wait_s: float
) -> bytes | None:
    """The answer of the read shared by ``key``'s polls, or None after ``wait_s`` without one."""
    reads = app[SHARED_READS]
    shared = reads.get(key)
    if shared is None or shared.task.done():  # a finished read may be an empty answer
        task = asyncio.ensure_future(read())
        shared = reads[key] = _SharedRead(task)

        def forget(_: asyncio.Task[bytes], shared: _SharedRead = shared) -> None:
            if reads.get(key) is shared:
                del reads[key]

        task.add_done_callback(forget)
    shared.members += 1
    try:
        async with asyncio.timeout(wait_s):
            return await asyncio.shield(shared.task)
    except TimeoutError:
        if shared.task.done():  # its answer came with the deadline
            return shared.task.result()
        return None
    finally:
        shared.members -= 1
        if not shared.members and not shared.task.done():
            if reads.get(key) is shared:  # a poll arriving now starts a read of its own
                del reads[key]
            shared.task.cancel()
            await asyncio.wait([shared.task])


async def poll_events(request: web.Request) -> web.Response:
    """``GET /api/jobs/{job_id}/events``: ``{"events": [...], "last_event_id", "done"}``.

    ``last_event_id`` is the seq to pass as ``after`` next: the last event returned, or
    ``after`` itself when none was. ``done`` is true once the job's last event has been
    returned (at or before ``after``): nothing more will come. Past
    ``FLUSHLINE_MAX_CONNECTIONS`` the answer is ``503`` with ``Retry-After``.
    """
    check_room(request)
    job_id = request.match_info["job_id"]
    after_seq = parse_seq(request.query.get("after", "0"), "after")
    wait_s = parse_int(request.query.get("wait_s", str(DEFAULT_WAIT_S)), "wait_s", 0, MAX_WAIT_S)
    limit = parse_int(request.query.get("limit", str(DEFAULT_LIMIT)), "limit", 1, MAX_LIMIT)
    app = request.app
    manager = app[MANAGER]
    if app[AUTH].enabled:
        job = await requested_job(request)  # 404 for an unknown job (read once by auth)
    else:
        # requested_job's lookup of a key auth did not set raises and catches a KeyError
        # inside aiohttp's request mapping: 5% of a poll's CPU at a thousand watchers.
        job = await manager.get(job_id)
    structlog.contextvars.bind_contextvars(job_id=job_id)
    bus = app[BUS]
    newest = await bus.last_seq(job_id)
    if after_seq > newest:
        await check_resume_point(bus, job_id, after_seq, "after")  # the 400 naming the field

    if wait_s == 0 or manager.handing_off or after_seq < newest or job.status.finished:
        # Nothing to wait for: answered here, without the hops of a shared read (under
        # load each event-loop pass is long, and a hop is one more pass of lag).
        body = await _read(bus, manager, job_id, after_seq, 0, limit)
    else:
        # The shared read waits as long as any poll may; each poll leaves at its own wait_s.
        shared = await _shared_answer(
            app,
            (job_id, after_seq, limit),
            lambda: _read(bus, manager, job_id, after_seq, MAX_WAIT_S, limit),
            wait_s,
        )
        body = _body([], after_seq, False) if shared is None else shared
    return web.Response(body=body, content_type="application/json", headers=_HEADERS)
