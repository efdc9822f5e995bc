"""The SSE endpoint: one job's events, resumable, shaped by the job's flush strategy.

The response starts with a ``retry:`` line, then whatever the strategy sends at stream
start; each batch of events read from the bus is written as one write (the shared,
once-encoded frames, plus the strategy's comment bytes). A heartbeat goes out only when
nothing has been written for the heartbeat interval. After ``done`` the response ends.

A subscriber that the bus cuts off (it fell too far behind) or whose writes stall past
``send_timeout_s`` is disconnected; it may resume with ``Last-Event-ID``.

When an instance that shares its jobs with others (Redis) starts shutting down, its
streams end at once with ``retry: 500`` (:data:`HANDOFF_RETRY_MS`), and a stream asked
for meanwhile gets only that line: browsers reconnect within half a second, land on
another instance and resume there with ``Last-Event-ID``. A stream whose bus loses Redis
ends the same way with ``retry: 1000`` (:data:`BACKEND_LOST_RETRY_MS`): the browser comes
back when Redis may have, and resumes.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence

import attrs
import structlog
from aiohttp import web

from app.core.errors import BackendUnavailable, SubscriberLagged
from app.core.events import EncodedEvent, heartbeat_frame
from app.core.sse import retry_line
from app.web.auth import requested_job
from app.web.keys import BUS, MANAGER, SETTINGS, STREAM_BYTES
from app.web.metrics import METRICS, Metrics
from app.web.params import parse_int
from app.web.resume import check_resume_point, stream_resume_point
from app.web.server import check_room, tune_stream_socket
from strategies import FlushStrategy, FrameShaper, build_strategy

__all__ = [
    "BACKEND_LOST_RETRY_MS",
    "HANDOFF_RETRY_MS",
    "MAX_PROXY_BUFFER_BYTES",
    "STREAM_HEADERS",
    "stream_job",
    "stream_shaper",
]

log = structlog.get_logger(__name__)

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
#: A write larger than this goes out in slices, each bounded by the send timeout.
SEND_SLICE_BYTES = 256 * 1024
#: The largest ``?proxy_buffer=`` a client may ask for (1 MiB).
MAX_PROXY_BUFFER_BYTES = 1 << 20
#: The ``retry:`` of a stream ended because its instance is shutting down.
HANDOFF_RETRY_MS = 500
#: The ``retry:`` of a stream ended because its bus lost Redis.
BACKEND_LOST_RETRY_MS = 1000


def stream_shaper(request: web.Request, strategy: FlushStrategy) -> FrameShaper:
    """The stream's shaper: the job strategy's, or ``aligned`` at ``?proxy_buffer=BYTES``.

    The hint comes from a client that measured its path's block size; it reshapes this
    one stream only (the job's cadence is the job's).
    """
    if "proxy_buffer" not in request.query:
        return strategy.shaper()
    block = parse_int(request.query["proxy_buffer"], "proxy_buffer", 0, MAX_PROXY_BUFFER_BYTES)
    tuning = attrs.evolve(request.app[SETTINGS].tuning(), proxy_buffer_bytes=block)
    return build_strategy("aligned", tuning).shaper()


@functools.lru_cache(maxsize=1)
def _chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk; the last one is reused (every subscriber's is)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


@attrs.define
class _StreamWriter:
    """Writes shaped bytes to one response, counting them for the log line and metrics."""

    response: web.StreamResponse
    shaper: FrameShaper
    send_timeout_s: float
    metrics: Metrics
    bytes_written: int = 0
    events_written: int = 0
    last_write_at: float = 0.0
    #: Frame bytes handed to the shaper and not yet written (the rest of a write is padding).
    payload_due: int = 0
    #: Live events handed to the shaper and not yet out (a strategy may hold them back).
    unsent: list[EncodedEvent] = attrs.Factory(list)

    #: Set once the response has started: where :meth:`push` writes, and how.
    transport: asyncio.Transport | None = None
    chunked: bool = False
    #: Called when a push leaves a deferred flush due (the parked reader must wake).
    on_deadline: Callable[[], None] | None = None

    def push(self, frames: bytes, events: Sequence[EncodedEvent]) -> bool:
        """Write a batch now, from the publisher (the reader is parked); False if it can't.

        The frames are the same bytes for every subscriber; so is their HTTP chunk when
        the shaper adds nothing (one chunk encoding per publish, not per subscriber).
        It declines while earlier bytes still wait for the socket (the client is not
        keeping up): the reader then wakes and writes what it missed in one write, under
        the send timeout, so a stalled client is still cut off.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        now = asyncio.get_running_loop().time()
        data = self.shaper.write(frames, now)
        self.unsent.extend(events)
        if data:  # (an empty chunk would end the response)
            transport.write(_chunk(data) if self.chunked else data)
        self.events_written += len(events)
        self._wrote(data, now, len(frames))
        if self.on_deadline is not None and self.shaper.deadline() is not None:
            self.on_deadline()
        return True

    async def send_start(self, retry: bytes, history: Sequence[EncodedEvent]) -> None:
        """Write the stream's first bytes: ``retry``, then the ``history`` to replay.

        The joined history is this stream's own copy (up to twice the job's history
        budget with the shaper's), so it lives only as long as this write, not as long
        as the stream.
        """
        self.events_written += len(history)
        now = asyncio.get_running_loop().time()
        frames = b"".join(event.frame for event in history)
        await self.send(self.shaper.start(retry, now, frames), now, len(retry) + len(frames))

    async def send_live(self, events: Sequence[EncodedEvent], now: float) -> None:
        """Write live ``events`` the reader woke to (the joined frames die with the write)."""
        frames = b"".join(event.frame for event in events)
        self.events_written += len(events)
        # Live events only count towards the delivery lag: history replayed is no lag.
        self.unsent.extend(events)
        await self.send(self.shaper.write(frames, now), now, len(frames))

    async def send_held(self) -> None:
        """Write whatever the shaper still holds, before the response ends."""
        now = asyncio.get_running_loop().time()
        await self.send(self.shaper.poll(math.inf), now)

    async def send(self, data: bytes, now: float, payload: int = 0) -> None:
        """Write ``data``, the shaper's answer to ``payload`` more bytes of frames.

        A shaper may hold frames for a later write (``aligned`` within its budget): what
        it returns then carries frames handed to it earlier, and the rest is padding.
        """
        # The timeout bounds a stall, not a long transfer: a resume with megabytes of
        # history goes out in slices, each of which must get through within the timeout.
        view = memoryview(data)
        for start in range(0, len(view), SEND_SLICE_BYTES):
            async with asyncio.timeout(self.send_timeout_s):
                await self.response.write(view[start : start + SEND_SLICE_BYTES])
        self._wrote(data, now, payload)

    def _wrote(self, data: bytes, now: float, payload: int) -> None:
        self.payload_due += payload
        if data:
            self.bytes_written += len(data)
            self.last_write_at = now
            sent = min(self.payload_due, len(data))
            self.payload_due -= sent
            self.metrics.bytes_written(sent, len(data) - sent)
            if self.unsent:
                # Shapers release frames in order: whatever they held went out with this.
                self.metrics.delivered(self.unsent)
                self.unsent.clear()


async def stream_job(request: web.Request) -> web.StreamResponse:
    """``GET /api/jobs/{job_id}/stream``: the job's events as ``text/event-stream``.

    Past ``FLUSHLINE_MAX_CONNECTIONS`` the answer is ``503`` with ``Retry-After``.
    """
    check_room(request)
    job_id = request.match_info["job_id"]
    field, after_seq = stream_resume_point(request)
    manager = request.app[MANAGER]
    settings = request.app[SETTINGS]
    job = await requested_job(request)
    strategy = manager.strategy(job.strategy)
    shaper = stream_shaper(request, strategy)
    heartbeat_s = strategy.cadence.heartbeat_interval_s
    loop = asyncio.get_running_loop()
    structlog.contextvars.bind_contextvars(job_id=job_id)
    await check_resume_point(request.app[BUS], job_id, after_seq, field)
    if manager.handing_off:
        return await _hand_off(request)

    async with request.app[BUS].subscribe(job_id, after_seq) as subscription:
        # The history already published goes out with the stream's first write, so a
        # strategy that pads each flush pays for one flush, not two.
        batch = await subscription.next_batch(0)
        if batch.ended and not batch.events:
            # The client already has the job's last event: 204 is the one answer that
            # makes a browser's EventSource stop reconnecting.
            log.info("stream closed", outcome="no_content", after_seq=after_seq)
            return web.Response(status=204)
        response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
        # A peer that vanished without closing is dropped by the kernel within the send
        # timeout, even on a quiet stream (no write to time out).
        tune_stream_socket(request.transport, settings.send_timeout_s)
        await response.prepare(request)
        metrics = request.app[METRICS]
        writer = _StreamWriter(response, shaper, settings.send_timeout_s, metrics)
        if isinstance(request.transport, asyncio.Transport):
            writer.transport = request.transport
            writer.chunked = response.headers.get("Transfer-Encoding") == "chunked"
        writer.on_deadline = subscription.unpark
        outcome = "ended"
        started = time.monotonic()
        drain_guard: asyncio.Timeout | None = None

        def drained() -> None:
            if drain_guard is not None:  # else the loop sees `handing_off` before it waits
                drain_guard.reschedule(loop.time())

        unregister = manager.on_drain(drained) if manager.control is not None else None
        metrics.stream_opened()
        try:
            async with asyncio.timeout(None) as cut_guard:
                # Being cut off must interrupt even a write blocked on a stalled socket.
                subscription.on_cut(lambda: cut_guard.reschedule(loop.time()))
                await writer.send_start(retry_line(settings.retry_ms), batch.events)
                while not batch.ended:
                    if manager.handing_off:
                        outcome = "handed_off"
                        await writer.send_held()
                        handoff = retry_line(HANDOFF_RETRY_MS)
                        await writer.send(handoff, loop.time(), len(handoff))
                        break
                    due = writer.last_write_at + heartbeat_s
                    flush_at = writer.shaper.deadline()
                    if flush_at is not None:
                        due = min(due, flush_at)
                    guard = asyncio.timeout(None)
                    try:
                        async with guard:
                            drain_guard = guard
                            batch = await subscription.next_batch(
                                max(due - loop.time(), 0.0), push=writer.push
                            )
                    except TimeoutError:
                        if guard.expired() and manager.handing_off:
                            continue  # only the wait was interrupted: hand off above
                        raise
                    finally:
                        drain_guard = None
                    now = loop.time()
                    if batch.events:
                        await writer.send_live(batch.events, now)
                    if not batch.events and not batch.ended:
                        if now - writer.last_write_at >= heartbeat_s:
                            beat = heartbeat_frame(job_id)
                            await writer.send(writer.shaper.write(beat, now), now, len(beat))
                        else:
                            await writer.send(writer.shaper.poll(now), now)
                await writer.send_held()
                async with asyncio.timeout(settings.send_timeout_s):
                    await response.write_eof()
        except (TimeoutError, SubscriberLagged, BackendUnavailable):
            if subscription.lost:
                outcome = "backend_lost"
                await _end_with_retry(request, response, settings.send_timeout_s)
            else:
                outcome = "cut_off" if subscription.cut else "send_timeout"
                _abort(request)
            metrics.subscriber_dropped(outcome)
        except ConnectionError:
            outcome = "client_gone"
        except asyncio.CancelledError:
            outcome = "client_gone"  # aiohttp cancels the handler when the client leaves
            raise
        finally:
            metrics.stream_closed()
            if unregister is not None:
                unregister()
            response[STREAM_BYTES] = writer.bytes_written
            log.info(
                "stream closed",
                outcome=outcome,
                strategy=strategy.name,
                after_seq=after_seq,
                last_seq=subscription.last_seq,
                events=writer.events_written,
                bytes=writer.bytes_written,
                duration_s=round(time.monotonic() - started, 3),
            )
        return response


async def _hand_off(request: web.Request) -> web.StreamResponse:
    """A stream asked for while this instance shuts down: only a short ``retry:``."""
    response = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    await response.prepare(request)
    await response.write(retry_line(HANDOFF_RETRY_MS))
    await response.write_eof()
    log.info("stream closed", outcome="handed_off", events=0)
    return response


async def _end_with_retry(
    request: web.Request, response: web.StreamResponse, timeout_s: float
) -> None:
    """End the stream with a short ``retry:`` (the bus lost Redis); abort if it cannot go."""
    try:
        async with asyncio.timeout(timeout_s):
            await response.write(retry_line(BACKEND_LOST_RETRY_MS))
            await response.write_eof()
    except (TimeoutError, ConnectionError):
        _abort(request)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
