"""The Redis bus's writing side: one job's events appended to its stream by this instance.

Publishing is one ``XADD`` with the explicit id ``<seq>-0``, ``NOMKSTREAM`` and an exact
``MAXLEN`` (``FLUSHLINE_HISTORY_LIMIT``); once the job's events pass
``FLUSHLINE_MAX_HISTORY_BYTES`` (counted as :func:`~app.bus.local.event_cost`, by the
publishing instance), an exact ``MINID`` instead, which trims by count and by bytes.
Redis refuses an id that is not above the stream's top, so the seq is claimed
atomically: of two publishers racing for one seq, one wins and the other re-reads the
top and retries with the next. Because a publisher's next seq is always the top it last
saw plus one, an accepted id is exactly the top plus one: no seq is skipped. The key's
TTL is renewed with the publish that comes after a quarter of it has passed (the same
round trip).

Redis lost: a job this instance publishes keeps its events (seq assigned here, frames
encoded as usual) in a bounded buffer, at most ``history_limit`` events and
``history_bytes`` (never more than :data:`BUFFER_MAX_BYTES`), and a flusher writes them
in order, with their ids, once Redis answers again; an ``XADD`` whose reply was lost is
recognised by the stream's top, so nothing is written twice. If Redis is not back within
``grace_s`` (or the buffer fills), the job's next publish fails with
:class:`BackendUnavailable`, and the buffered events are dropped: a later publish
continues after the stream's top in Redis (the job's ``error`` and ``done``, once Redis
answers). The writer tells the bus when its buffering begins (:attr:`WriterHooks.buffering`),
so that the job's local feed, which would otherwise hold events Redis may never get, is
given up.
"""

from __future__ import annotations

import array
import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.bus.base import LogClosed
from app.bus.local import event_cost
from app.bus.redis_client import milliseconds
from app.core.errors import BackendUnavailable, JobNotFound
from app.core.events import AnyEvent, EncodedEvent, encode_event

__all__ = [
    "BUFFER_MAX_BYTES",
    "Entry",
    "JobWriter",
    "WriterHooks",
    "WriterLimits",
    "decode_entry",
    "entry_fields",
]

# The bus's log lines keep the logger name they had when it was one module.
log = structlog.get_logger("app.bus.redis")

#: How often a publisher may lose the race for a seq before giving up.
MAX_SEQ_RACES = 16
#: Most bytes of frames one job buffers while Redis is lost.
BUFFER_MAX_BYTES = 16 << 20
#: Pause between the flusher's attempts while Redis stays away.
FLUSH_RETRY_S = 0.2
#: The errors that mean Redis is unreachable (retried or buffered, never fatal).
REDIS_LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError)

# The entries of a job's stream (the layout is described in app.bus.redis).
OPEN_ID = b"0-1"
F_TYPE, F_TS, F_FRAME, F_OPEN, F_END = b"t", b"ts", b"f", b"open", b"end"
GONE = b"gone"

Entry = tuple[bytes, dict[bytes, bytes]]


def entry_seq(entry_id: bytes) -> int:
    """The seq part of a stream id (``<seq>-<n>``)."""
    return int(entry_id.split(b"-", 1)[0])


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> EncodedEvent:
    """The event a stream entry holds (an event entry: id ``<seq>-0``, not a marker)."""
    return EncodedEvent(
        seq=entry_seq(entry_id),
        type=fields[F_TYPE].decode(),
        ts=float(fields[F_TS]),
        frame=fields[F_FRAME],
    )


def entry_fields(encoded: EncodedEvent) -> dict[bytes, Any]:
    """The fields of an event's entry (:func:`decode_entry` reads them back)."""
    return {F_TYPE: encoded.type, F_TS: repr(encoded.ts), F_FRAME: encoded.frame}


async def stream_top(redis: Redis, key: str, job_id: str) -> tuple[int, bool]:
    """The newest seq in the job's stream and whether its log is closed; ``JobNotFound`` if none."""
    top = cast(list[Entry], await redis.xrevrange(key, count=1))
    if not top:
        raise JobNotFound(job_id)
    entry_id, fields = top[0]
    return entry_seq(entry_id), F_END in fields


def _id_taken(exc: redis_errors.ResponseError) -> bool:
    """Whether XADD refused the id because another publisher got there first."""
    return "equal or smaller than the target stream top item" in str(exc)


class WriterLimits(Protocol):
    """The bus's settings a writer follows (read at each use, as the bus holds them)."""

    history_limit: int
    history_bytes: int
    job_ttl_s: float
    grace_s: float


@attrs.frozen
class WriterHooks:
    """What a writer tells the bus about its job (each hook runs synchronously)."""

    #: ``(job_id)``: buffering began, so what local feeds hold may outrun Redis.
    buffering: Callable[[str], None]
    #: ``(job_id)``: nothing is pending any more (the buffer was flushed or given up).
    settled: Callable[[str], None]
    #: ``(writer)``: the writer can publish no more (it gave its buffer up).
    failed: Callable[[JobWriter], None]
    #: ``(job_id)``: the job's stream no longer exists in Redis.
    gone: Callable[[str], None]


@attrs.define(eq=False)
class JobWriter:
    """What this instance knows as the publisher of one job, and how it writes its events."""

    job_id: str
    key: str
    redis: Redis
    limits: WriterLimits
    hooks: WriterHooks
    next_seq: int
    renewed_at: float
    closed: bool = False
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    #: Events published while Redis was lost, oldest first, with their XADD fields and
    #: the seq Redis must keep from (see :meth:`keep_from`).
    pending: deque[tuple[EncodedEvent, dict[bytes, Any], int | None]] = attrs.Factory(deque)
    pending_bytes: int = 0
    #: When the current outage began (monotonic); None while Redis answers.
    lost_at: float | None = None
    flusher: asyncio.Task[None] | None = None
    #: Why the job can publish no more (the outage outlasted the grace, the buffer filled).
    failed: str | None = None
    #: Set whenever nothing is pending (the buffer was flushed or given up).
    flushed: asyncio.Event = attrs.Factory(asyncio.Event)
    #: The costs of the job's newest events in Redis, from seq ``window_first`` (at
    #: ``window_head``): the byte budget's view of the stream.
    window: array.array[int] = attrs.Factory(lambda: array.array("Q"))
    window_head: int = 0
    window_first: int = 1
    window_bytes: int = 0
    #: Whether the byte budget has trimmed the stream (then every XADD carries MINID).
    window_trimmed: bool = False

    def __attrs_post_init__(self) -> None:
        self.flushed.set()

    def keep_from(self, encoded: EncodedEvent) -> int | None:
        """Count ``encoded`` in the window; the first seq Redis keeps (None: MAXLEN does).

        The window only knows the events this writer published in a row: after a gap
        (another publisher, a writer made for a job already under way) it starts again,
        and the older events are trimmed by count until the window trims by bytes.
        """
        seq, cost = encoded.seq, event_cost(encoded)
        history_limit, history_bytes = self.limits.history_limit, self.limits.history_bytes
        size = len(self.window) - self.window_head
        if size and seq == self.window_first + size - 1:  # the same event again (buffered)
            self.window_bytes += cost - self.window[-1]
            self.window[-1] = cost
        elif seq == self.window_first + size:
            self.window.append(cost)
            self.window_bytes += cost
        else:
            del self.window[:]
            self.window.append(cost)
            self.window_head, self.window_first, self.window_bytes = 0, seq, cost
            self.window_trimmed = False
        while len(self.window) - self.window_head > 1 and (
            self.window_bytes > history_bytes or len(self.window) - self.window_head > history_limit
        ):
            self.window_trimmed = self.window_trimmed or self.window_bytes > history_bytes
            self.window_bytes -= self.window[self.window_head]
            self.window_head += 1
            self.window_first += 1
        if self.window_head > len(self.window) // 2:  # amortised compaction
            del self.window[: self.window_head]
            self.window_head = 0
        return self.window_first if self.window_trimmed else None

    async def publish(self, event: AnyEvent) -> tuple[EncodedEvent, bool]:
        """Write ``event`` with the next seq; the encoded event, and whether Redis has it.

        False: Redis is lost and the event waits in the buffer (the flusher writes it).
        """
        async with self.lock:
            if self.failed is not None:  # given up under us: the next publish starts anew
                raise BackendUnavailable(self.failed)
            if self.lost_at is not None:  # an outage is being buffered: keep the order
                return self._buffer(event), False
            try:
                return await self._xadd(event), True
            except REDIS_LOST as exc:
                # The XADD may have landed before the reply was lost: the flusher checks.
                log.warning(
                    "redis lost while publishing; buffering", job_id=self.job_id, error=str(exc)
                )
                return self._buffer(event), False

    def _xadd_args(self, seq: int, keep_from: int | None) -> dict[str, Any]:
        history_limit = self.limits.history_limit
        trim: dict[str, Any] = {"maxlen": history_limit}
        if keep_from is not None:
            # MINID trims by bytes (keep_from) and by count (seqs are consecutive).
            trim = {"minid": f"{max(keep_from, seq - history_limit + 1)}-0"}
        return {
            "id": f"{seq}-0",
            **trim,
            "approximate": False,  # exact: 410 must mean what the limit says
            "nomkstream": True,  # never resurrect an expired or discarded job
        }

    async def _xadd(self, event: AnyEvent) -> EncodedEvent:
        """Claim the next seq for ``event`` in Redis (under ``self.lock``)."""
        for _ in range(MAX_SEQ_RACES):
            if self.closed:
                raise LogClosed(self.job_id)
            encoded = encode_event(self.job_id, self.next_seq, event)
            fields = entry_fields(encoded)
            xadd = self._xadd_args(encoded.seq, self.keep_from(encoded))
            now = time.monotonic()
            renew = now - self.renewed_at >= self.limits.job_ttl_s / 4
            try:
                if renew:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.xadd(self.key, fields, **xadd)  # type: ignore[arg-type]
                        pipe.pexpire(self.key, milliseconds(self.limits.job_ttl_s))
                        added, _ = await pipe.execute()
                    self.renewed_at = now
                else:
                    added = await self.redis.xadd(self.key, fields, **xadd)  # type: ignore[arg-type]
            except redis_errors.ResponseError as exc:
                if not _id_taken(exc):
                    raise
                if await self._landed(encoded.seq, fields):
                    # Our own XADD, retried by the client after its reply was lost.
                    added = b"landed"
                    self.next_seq += 1
                    break
                # Another publisher took this seq: continue after the real top.
                newest, closed = await stream_top(self.redis, self.key, self.job_id)
                self.next_seq, self.closed = newest + 1, closed
                continue
            if added is None:
                self.hooks.gone(self.job_id)
                raise JobNotFound(self.job_id)
            self.next_seq += 1
            break
        else:
            raise RuntimeError(f"lost the race for a seq of job {self.job_id} too often")
        return encoded

    async def _landed(self, seq: int, fields: dict[bytes, Any]) -> bool:
        """Whether the entry ``<seq>-0`` in Redis is this very event (same stamp and frame)."""
        found = cast(list[Entry], await self.redis.xrange(self.key, min=f"{seq}-0", max=f"{seq}-0"))
        if not found:
            return False
        stored = found[0][1]
        stamp, frame = str(fields[F_TS]).encode(), bytes(fields[F_FRAME])
        return stored.get(F_TS) == stamp and stored.get(F_FRAME) == frame

    # --- Redis lost under a publishing job ---------------------------------------------

    def _buffer(self, event: AnyEvent) -> EncodedEvent:
        """Keep ``event`` until Redis answers again (under ``self.lock``)."""
        if self.closed:
            raise LogClosed(self.job_id)
        now = time.monotonic()
        if self.lost_at is None:
            self.lost_at = now
            self.flushed.clear()
            self.flusher = asyncio.create_task(self._flush(), name=f"redis-flush:{self.job_id}")
            # Its watchers would otherwise see events Redis may never get: they end
            # (retry:) and come back to a feed read from Redis.
            self.hooks.buffering(self.job_id)
        reason = self._buffer_full(now)
        if reason is not None:
            self.give_up(reason)
            raise BackendUnavailable(reason)
        encoded = encode_event(self.job_id, self.next_seq, event)
        self.next_seq += 1
        keep_from = self.keep_from(encoded)
        self.pending.append((attrs.evolve(encoded, event=None), entry_fields(encoded), keep_from))
        self.pending_bytes += len(encoded.frame)
        return encoded

    def _buffer_full(self, now: float) -> str | None:
        assert self.lost_at is not None
        grace_s = self.limits.grace_s
        if now - self.lost_at > grace_s:
            return f"Redis unreachable for more than {grace_s:g} s"
        if len(self.pending) >= self.limits.history_limit:
            return f"Redis unreachable and {len(self.pending)} events waiting for it"
        if self.pending_bytes >= min(BUFFER_MAX_BYTES, self.limits.history_bytes):
            return f"Redis unreachable and {self.pending_bytes} bytes waiting for it"
        return None

    def give_up(self, reason: str) -> None:
        """Drop the buffered events: the job can publish no more here (``reason``)."""
        if self.failed is None:
            log.error(
                "job events lost with redis",
                job_id=self.job_id,
                reason=reason,
                events=len(self.pending),
            )
        self.failed = reason
        self.pending.clear()
        self.pending_bytes = 0
        self.flushed.set()
        # No feed holds the lost events (they were given up when buffering began), so a
        # later publish may continue after Redis's own top: the job's `error` and `done`.
        self.hooks.failed(self)

    async def _flush(self) -> None:
        """Write the buffered events in order once Redis answers; give up past the grace."""
        written = 0
        try:
            while self.pending and self.failed is None:
                encoded, fields, keep_from = self.pending[0]
                xadd = self._xadd_args(encoded.seq, keep_from)
                try:
                    added = await self.redis.xadd(self.key, fields, **xadd)  # type: ignore[arg-type]
                except REDIS_LOST:
                    assert self.lost_at is not None
                    grace_s = self.limits.grace_s
                    if time.monotonic() - self.lost_at > grace_s:
                        self.give_up(f"Redis unreachable for more than {grace_s:g} s")
                        return
                    await asyncio.sleep(FLUSH_RETRY_S)
                    continue
                except redis_errors.ResponseError as exc:
                    if not _id_taken(exc):
                        raise
                    newest, closed = await stream_top(self.redis, self.key, self.job_id)
                    if closed or newest < encoded.seq:
                        # Another instance ended the job meanwhile (its runner was
                        # presumed lost): what is left here must not follow its `done`.
                        self.give_up("the job was ended elsewhere while Redis was unreachable")
                        return
                    added = b"landed"  # written before its reply was lost
                if added is None:
                    self.give_up("Redis lost the job's events while unreachable")
                    return
                self.pending.popleft()
                self.pending_bytes -= len(encoded.frame)
                written += 1
            if self.failed is None:
                await self.redis.pexpire(self.key, milliseconds(self.limits.job_ttl_s))
                self.renewed_at = time.monotonic()
                log.info(
                    "redis back; buffered events written",
                    job_id=self.job_id,
                    events=written,
                    outage_s=round(time.monotonic() - (self.lost_at or 0.0), 3),
                )
        except Exception as exc:
            self.give_up(f"Redis failed while writing buffered events: {exc}")
        finally:
            self.lost_at = None if self.failed is None else self.lost_at
            self.flusher = None
            self.flushed.set()
            self.hooks.settled(self.job_id)
