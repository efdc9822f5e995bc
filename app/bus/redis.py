"""RedisEventBus: each job's events in a Redis Stream, shared by every instance.

Layout: one stream per job, ``{prefix}job:{job_id}:events``. An event is one entry whose
stream id is ``<seq>-0`` with three fields: ``t`` (type), ``ts`` (the stamp, exact as
``repr``) and ``f`` (the SSE frame, encoded once by the publisher). Two markers share the
stream so that a reader sees them in order with the events, in the same read:

* ``0-1`` ``open``: written by :meth:`RedisEventBus.open`, so a job without events exists;
* ``<last seq>-<n>`` ``end``: ``closed`` written by :meth:`RedisEventBus.close` (readers
  end there), ``gone`` by :meth:`RedisEventBus.discard` just before it deletes the key
  (readers on every instance forget the job, even one whose log had already ended).

Publishing is one ``XADD`` with the explicit id ``<seq>-0``, ``NOMKSTREAM`` and an exact
``MAXLEN`` (``FLUSHLINE_HISTORY_LIMIT``); once the job's events pass
``FLUSHLINE_MAX_HISTORY_BYTES`` (counted as :func:`~app.bus.local.event_cost`, by the
publishing instance), an exact ``MINID`` instead, which trims by count and by bytes.
Redis refuses an id that is not above the stream's top, so the seq is claimed
atomically: of two publishers racing for one seq, one wins and the other re-reads the
top and retries with the next. Because a publisher's next seq is always the top it last
saw plus one, an accepted id is exactly the top plus one: no seq is skipped. The key's
TTL (``FLUSHLINE_JOB_TTL``) is set when the job opens, renewed with the publish that
comes after a quarter of it has passed (the same round trip), and set again on close, so
finished jobs expire by themselves: nothing sweeps.

Reading: each instance runs one reader task per job it has subscribers for. The task
loads the kept history (``XRANGE`` in pages) into a local list, then waits for new entries
with one ``XREAD BLOCK 0`` on its own connection; subscribers are cursors into that list,
exactly as in :mod:`app.bus.memory` (history then live with no seam, cut-off past the
queue limit, cut-off instead of a gap when trimming overtakes a cursor). So 6,000 watchers
of a job on one instance cost Redis one blocking read, and an idle job costs it nothing
but that read. Events this instance publishes are also appended to its local list at
once, so local watchers see them without a round trip; while this instance publishes a
job and its list has every event, its reader does not read Redis at all (it would only
get those same events back). When the last local subscriber leaves, the list and its
reader linger for :data:`FEED_LINGER_S` (reconnects and long-polls find them warm),
then go.

Redis lost: a job this instance publishes keeps its events (seq assigned here, frames
encoded as usual) in a bounded buffer, at most ``history_limit`` events and
``history_bytes`` (never more than :data:`BUFFER_MAX_BYTES`), and a flusher writes them
in order, with their ids, once Redis answers again; an ``XADD`` whose reply was lost is
recognised by the stream's top, so nothing is written twice. If Redis is not back within
``grace_s`` (or the buffer fills), the job's next publish fails with
:class:`BackendUnavailable`, and the buffered events are dropped: a later publish
continues after the stream's top in Redis (the job's ``error`` and ``done``, once Redis
answers). Feeds never hold an event Redis does not: the publisher's own feed is given up
when its buffering starts, and a reader that loses its connection cuts its subscribers
off as ``lost`` (their streams end with a short ``retry:``) before it retries.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, cast

import attrs
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.bus.local import LocalCursor, LocalLog, event_cost
from app.core.errors import BackendUnavailable, JobNotFound
from app.core.events import AnyEvent, EncodedEvent, encode_event

__all__ = ["FEED_LINGER_S", "Entry", "RedisEventBus", "decode_entry"]

log = structlog.get_logger(__name__)

#: How long a job's local list and reader stay after its last local subscriber leaves.
FEED_LINGER_S = 10.0
#: Entries per ``XRANGE`` page while loading history, and per ``XREAD``.
READ_COUNT = 1_000
#: Pause before a failed live read is retried (it resumes from the last entry read).
READ_RETRY_S = (0.05, 0.2, 0.5, 1.0)
#: How often a publisher may lose the race for a seq before giving up.
MAX_SEQ_RACES = 16
#: Stopping a reader: ``CLIENT UNBLOCK`` attempts, and the wait after each.
HALT_UNBLOCK_TRIES = 10
HALT_WAIT_S = 0.1
#: Most bytes of frames one job buffers while Redis is lost.
BUFFER_MAX_BYTES = 16 << 20
#: Pause between the flusher's attempts while Redis stays away.
FLUSH_RETRY_S = 0.2

_LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError)

_OPEN_ID = b"0-1"
_F_TYPE, _F_TS, _F_FRAME, _F_OPEN, _F_END = b"t", b"ts", b"f", b"open", b"end"
_GONE = b"gone"

# Creates the stream with its open marker unless it exists (then leaves it untouched).
_OPEN_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XADD', KEYS[1], '0-1', 'open', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Appends an end marker after the newest entry and sets the finished job's TTL: ARGV[2]
# 'closed' once (the log is complete), 'gone' always (the job is being discarded).
# Returns the newest seq, or -1 when the stream does not exist.
_CLOSE_SCRIPT = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top == 0 then return -1 end
local ms = string.match(top[1][1], '^(%d+)-')
if top[1][2][1] ~= 'end' or ARGV[2] == 'gone' then
  redis.call('XADD', KEYS[1], ms .. '-*', 'end', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return tonumber(ms)
"""

Entry = tuple[bytes, dict[bytes, bytes]]


def _entry_seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> EncodedEvent:
    """The event a stream entry holds (an event entry: id ``<seq>-0``, not a marker)."""
    return EncodedEvent(
        seq=_entry_seq(entry_id),
        type=fields[_F_TYPE].decode(),
        ts=float(fields[_F_TS]),
        frame=fields[_F_FRAME],
    )


def _id_taken(exc: redis_errors.ResponseError) -> bool:
    """Whether XADD refused the id because another publisher got there first."""
    return "equal or smaller than the target stream top item" in str(exc)


@attrs.define(eq=False)
class _Writer:
    """What this instance knows as the publisher of one job."""

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

    def keep_from(self, seq: int, cost: int, history_limit: int, history_bytes: int) -> int | None:
        """Count event ``seq`` in the window; the first seq Redis keeps (None: MAXLEN does).

        The window only knows the events this writer published in a row: after a gap
        (another publisher, a writer made for a job already under way) it starts again,
        and the older events are trimmed by count until the window trims by bytes.
        """
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


@attrs.define(eq=False)
class _Feed(LocalLog):
    """One job's events as this instance has read them, and its local subscribers."""

    job_id: str = attrs.field(kw_only=True)
    key: str = attrs.field(kw_only=True)
    #: The job was discarded: the feed ends and no new subscriber may use it.
    gone: bool = False
    #: The stream id of the last entry read from Redis (where the next read starts).
    last_id: bytes = b"0-0"
    #: Subscriptions entered or being entered; the feed lingers once this drops to 0.
    holders: int = 0
    loaded: asyncio.Event = attrs.Factory(asyncio.Event)
    #: Why the history could not be loaded (the job does not exist, Redis failed).
    error: BaseException | None = None
    reader: asyncio.Task[None] | None = None
    #: Redis's id of the reader's connection (for ``CLIENT UNBLOCK``).
    client_id: int | None = None
    #: The reader must end (the feed was dropped or the bus closed).
    stopped: bool = False
    #: Wakes a reader that waits, instead of reading, while this instance publishes.
    nudge: asyncio.Event = attrs.Factory(asyncio.Event)
    linger: asyncio.TimerHandle | None = None

    def skip_to(self, seq: int) -> None:
        """Continue at ``seq``: Redis trimmed the events before it before we read them.

        Subscribers that had not read all of them are cut off (they resume, or get 410),
        never silently moved past a gap.
        """
        self.events.clear()
        self.bytes = 0
        self.first_seq = self.next_seq = seq
        for sub in self.subscribers:
            if sub.cursor < seq - 1:
                sub.cut_off()
        self.wake()

    def lose(self) -> None:
        """Redis was lost under this feed: cut every subscriber off as ``lost``."""
        for sub in list(self.subscribers):
            sub.lost = True
            sub.cut_off()
        self.wake()


@attrs.define(eq=False)
class _RedisSubscription(LocalCursor):
    """A cursor into a job's :class:`_Feed` on this instance."""

    bus: RedisEventBus = attrs.field(kw_only=True)

    async def __aenter__(self) -> Self:
        feed = await self.bus._attach(self.job_id)
        try:
            self.start(feed)
        except BaseException:
            self.bus._detach(feed)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        feed = self.stop()
        if isinstance(feed, _Feed):
            self.bus._detach(feed)


@attrs.define(eq=False)
class RedisEventBus:
    """:class:`EventBus` on Redis Streams: any instance publishes, resumes and fans out.

    ``redis`` must return bytes (``decode_responses=False``, the default). The bus closes
    it in :meth:`aclose` only when ``owns_client`` is true (the app shares its client
    with the job store and closes it itself).
    """

    redis: Redis
    history_limit: int = 10_000
    queue_limit: int = 1_000
    #: Bytes of one job's kept events, in Redis and in a feed (``FLUSHLINE_MAX_HISTORY_BYTES``).
    history_bytes: int = 4 << 20
    job_ttl_s: float = 3600.0
    prefix: str = "flushline:"
    owns_client: bool = False
    #: How long a job buffers its events while Redis is lost (``FLUSHLINE_REDIS_GRACE_S``).
    grace_s: float = 8.0
    _writers: dict[str, _Writer] = attrs.Factory(dict)
    _feeds: dict[str, _Feed] = attrs.Factory(dict)
    _stopping: set[asyncio.Task[None]] = attrs.Factory(set)
    _open_script: Any = None
    _close_script: Any = None

    def __attrs_post_init__(self) -> None:
        self._open_script = self.redis.register_script(_OPEN_SCRIPT)
        self._close_script = self.redis.register_script(_CLOSE_SCRIPT)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.job_ttl_s * 1000))

    def key(self, job_id: str) -> str:
        """The Redis key of the job's stream."""
        return f"{self.prefix}job:{job_id}:events"

    # --- publishing ------------------------------------------------------------------

    async def open(self, job_id: str) -> None:
        created = await self._open_script(keys=[self.key(job_id)], args=[self._ttl_ms])
        if created:
            self._writers[job_id] = _Writer(next_seq=1, renewed_at=time.monotonic())

    async def _top(self, job_id: str) -> tuple[int, bool]:
        """The newest seq in Redis and whether the log is closed; ``JobNotFound`` if none."""
        top = cast(list[Entry], await self.redis.xrevrange(self.key(job_id), count=1))
        if not top:
            raise JobNotFound(job_id)
        entry_id, fields = top[0]
        return _entry_seq(entry_id), _F_END in fields

    async def _writer(self, job_id: str) -> _Writer:
        writer = self._writers.get(job_id)
        if writer is None:
            newest, closed = await self._top(job_id)
            # The key's TTL is unknown here: renew it with the first publish.
            writer = self._writers.setdefault(job_id, _Writer(newest + 1, -self.job_ttl_s))
            writer.closed = writer.closed or closed
        return writer

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        writer = await self._writer(job_id)
        async with writer.lock:
            if writer.failed is not None:  # given up under us: the next publish starts anew
                raise BackendUnavailable(writer.failed)
            if writer.lost_at is not None:  # an outage is being buffered: keep the order
                return self._buffer(job_id, writer, event)
            try:
                encoded = await self._xadd(job_id, writer, event)
            except _LOST as exc:
                # The XADD may have landed before the reply was lost: the flusher checks.
                log.warning("redis lost while publishing; buffering", job_id=job_id, error=str(exc))
                return self._buffer(job_id, writer, event)
        feed = self._feeds.get(job_id)
        if feed is not None and feed.loaded.is_set() and not feed.closed:
            if encoded.seq == feed.next_seq:
                # History keeps the frame only; the event object goes back to the publisher.
                event_only = attrs.evolve(encoded, event=None)
                feed.append([event_only], self.history_limit, self.queue_limit, self.history_bytes)
                feed.last_id = f"{encoded.seq}-0".encode()
            else:  # the feed is behind (another publisher, or a load under way): read
                feed.nudge.set()
        return encoded

    @staticmethod
    def _fields(encoded: EncodedEvent) -> dict[bytes, Any]:
        return {_F_TYPE: encoded.type, _F_TS: repr(encoded.ts), _F_FRAME: encoded.frame}

    def _xadd_args(self, seq: int, keep_from: int | None) -> dict[str, Any]:
        trim: dict[str, Any] = {"maxlen": self.history_limit}
        if keep_from is not None:
            # MINID trims by bytes (keep_from) and by count (seqs are consecutive).
            trim = {"minid": f"{max(keep_from, seq - self.history_limit + 1)}-0"}
        return {
            "id": f"{seq}-0",
            **trim,
            "approximate": False,  # exact: 410 must mean what the limit says
            "nomkstream": True,  # never resurrect an expired or discarded job
        }

    def _keep_from(self, writer: _Writer, encoded: EncodedEvent) -> int | None:
        cost = event_cost(encoded)
        return writer.keep_from(encoded.seq, cost, self.history_limit, self.history_bytes)

    async def _xadd(self, job_id: str, writer: _Writer, event: AnyEvent) -> EncodedEvent:
        """Claim the next seq for ``event`` in Redis (under ``writer.lock``)."""
        key = self.key(job_id)
        for _ in range(MAX_SEQ_RACES):
            if writer.closed:
                raise RuntimeError(f"the event log of job {job_id} is closed")
            encoded = encode_event(job_id, writer.next_seq, event)
            fields = self._fields(encoded)
            xadd = self._xadd_args(encoded.seq, self._keep_from(writer, encoded))
            now = time.monotonic()
            renew = now - writer.renewed_at >= self.job_ttl_s / 4
            try:
                if renew:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.xadd(key, fields, **xadd)  # type: ignore[arg-type]
                        pipe.pexpire(key, self._ttl_ms)
                        added, _ = await pipe.execute()
                    writer.renewed_at = now
                else:
                    added = await self.redis.xadd(key, fields, **xadd)  # type: ignore[arg-type]
            except redis_errors.ResponseError as exc:
                if not _id_taken(exc):
                    raise
                if await self._landed(key, encoded.seq, fields):
                    # Our own XADD, retried by the client after its reply was lost.
                    added = b"landed"
                    writer.next_seq += 1
                    break
                # Another publisher took this seq: continue after the real top.
                newest, closed = await self._top(job_id)
                writer.next_seq, writer.closed = newest + 1, closed
                continue
            if added is None:
                self._drop_writer(job_id)
                raise JobNotFound(job_id)
            writer.next_seq += 1
            break
        else:
            raise RuntimeError(f"lost the race for a seq of job {job_id} too often")
        return encoded

    async def _landed(self, key: str, seq: int, fields: dict[bytes, Any]) -> bool:
        """Whether the entry ``<seq>-0`` in Redis is this very event (same stamp and frame)."""
        found = cast(list[Entry], await self.redis.xrange(key, min=f"{seq}-0", max=f"{seq}-0"))
        if not found:
            return False
        stored = found[0][1]
        stamp, frame = str(fields[_F_TS]).encode(), bytes(fields[_F_FRAME])
        return stored.get(_F_TS) == stamp and stored.get(_F_FRAME) == frame

    # --- Redis lost under a publishing job ---------------------------------------------

    def _buffer(self, job_id: str, writer: _Writer, event: AnyEvent) -> EncodedEvent:
        """Keep ``event`` until Redis answers again (under ``writer.lock``)."""
        if writer.closed:
            raise RuntimeError(f"the event log of job {job_id} is closed")
        now = time.monotonic()
        if writer.lost_at is None:
            writer.lost_at = now
            writer.flushed.clear()
            writer.flusher = asyncio.create_task(
                self._flush(job_id, writer), name=f"redis-flush:{job_id}"
            )
            feed = self._feeds.get(job_id)
            if feed is not None:
                # Its watchers would otherwise see events Redis may never get: they end
                # (retry:) and come back to a feed read from Redis.
                self._forget_lost(feed)
        reason = self._buffer_full(writer, now)
        if reason is not None:
            self._give_up(job_id, writer, reason)
            raise BackendUnavailable(reason)
        encoded = encode_event(job_id, writer.next_seq, event)
        writer.next_seq += 1
        keep_from = self._keep_from(writer, encoded)
        writer.pending.append((attrs.evolve(encoded, event=None), self._fields(encoded), keep_from))
        writer.pending_bytes += len(encoded.frame)
        return encoded

    def _buffer_full(self, writer: _Writer, now: float) -> str | None:
        assert writer.lost_at is not None
        if now - writer.lost_at > self.grace_s:
            return f"Redis unreachable for more than {self.grace_s:g} s"
        if len(writer.pending) >= self.history_limit:
            return f"Redis unreachable and {len(writer.pending)} events waiting for it"
        if writer.pending_bytes >= min(BUFFER_MAX_BYTES, self.history_bytes):
            return f"Redis unreachable and {writer.pending_bytes} bytes waiting for it"
        return None

    def _give_up(self, job_id: str, writer: _Writer, reason: str) -> None:
        if writer.failed is None:
            log.error(
                "job events lost with redis",
                job_id=job_id,
                reason=reason,
                events=len(writer.pending),
            )
        writer.failed = reason
        writer.pending.clear()
        writer.pending_bytes = 0
        writer.flushed.set()
        # No feed holds the lost events (they were given up when buffering began), so a
        # later publish may continue after Redis's own top: the job's `error` and `done`.
        if self._writers.get(job_id) is writer:
            self._drop_writer(job_id)

    def _forget_lost(self, feed: _Feed) -> None:
        """Give up a feed whose events may outrun Redis; its subscribers end as ``lost``."""
        feed.lose()
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        self._stop_reader(feed)

    async def _flush(self, job_id: str, writer: _Writer) -> None:
        """Write the buffered events in order once Redis answers; give up past the grace."""
        key = self.key(job_id)
        written = 0
        try:
            while writer.pending and writer.failed is None:
                encoded, fields, keep_from = writer.pending[0]
                xadd = self._xadd_args(encoded.seq, keep_from)
                try:
                    added = await self.redis.xadd(key, fields, **xadd)  # type: ignore[arg-type]
                except _LOST:
                    assert writer.lost_at is not None
                    if time.monotonic() - writer.lost_at > self.grace_s:
                        self._give_up(
                            job_id, writer, f"Redis unreachable for more than {self.grace_s:g} s"
                        )
                        return
                    await asyncio.sleep(FLUSH_RETRY_S)
                    continue
                except redis_errors.ResponseError as exc:
                    if not _id_taken(exc):
                        raise
                    newest, closed = await self._top(job_id)
                    if closed or newest < encoded.seq:
                        # Another instance ended the job meanwhile (its runner was
                        # presumed lost): what is left here must not follow its `done`.
                        self._give_up(
                            job_id,
                            writer,
                            "the job was ended elsewhere while Redis was unreachable",
                        )
                        return
                    added = b"landed"  # written before its reply was lost
                if added is None:
                    self._give_up(job_id, writer, "Redis lost the job's events while unreachable")
                    return
                writer.pending.popleft()
                writer.pending_bytes -= len(encoded.frame)
                written += 1
            if writer.failed is None:
                await self.redis.pexpire(key, self._ttl_ms)
                writer.renewed_at = time.monotonic()
                log.info(
                    "redis back; buffered events written",
                    job_id=job_id,
                    events=written,
                    outage_s=round(time.monotonic() - (writer.lost_at or 0.0), 3),
                )
        except Exception as exc:
            self._give_up(job_id, writer, f"Redis failed while writing buffered events: {exc}")
        finally:
            writer.lost_at = None if writer.failed is None else writer.lost_at
            writer.flusher = None
            writer.flushed.set()
            feed = self._feeds.get(job_id)
            if feed is not None:
                feed.nudge.set()

    def _drop_writer(self, job_id: str) -> None:
        """This instance no longer publishes the job: its reader reads Redis again."""
        self._writers.pop(job_id, None)
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.nudge.set()

    async def close(self, job_id: str) -> None:
        writer = self._writers.get(job_id)
        if writer is not None:
            await writer.flushed.wait()  # the flusher gives up within the grace
            if writer.failed is not None:
                raise BackendUnavailable(writer.failed)
        newest = await self._close_script(keys=[self.key(job_id)], args=[self._ttl_ms, "closed"])
        self._drop_writer(job_id)
        if newest < 0:
            raise JobNotFound(job_id)
        feed = self._feeds.get(job_id)
        if feed is not None and feed.loaded.is_set() and feed.next_seq - 1 == newest:
            feed.end()  # every event is here already; the reader will see the marker too

    async def last_seq(self, job_id: str) -> int:
        writer = self._writers.get(job_id)
        if writer is not None:
            return writer.next_seq - 1
        newest, _ = await self._top(job_id)
        return newest

    async def discard(self, job_id: str) -> None:
        key = self.key(job_id)
        # The end marker first, as a command of its own: readers blocked on the stream on
        # every instance are answered (and end) before the key disappears under them.
        await self._close_script(keys=[key], args=[self._ttl_ms, "gone"])
        await self.redis.delete(key)
        self._drop_writer(job_id)
        feed = self._feeds.get(job_id)
        if feed is not None:
            self._forget(feed)

    # --- subscribing -----------------------------------------------------------------

    def subscribe(self, job_id: str, after_seq: int = 0) -> _RedisSubscription:
        return _RedisSubscription(job_id, after_seq, bus=self)

    def subscriber_count(self, job_id: str) -> int:
        feed = self._feeds.get(job_id)
        return 0 if feed is None else len(feed.subscribers)

    async def _attach(self, job_id: str) -> _Feed:
        """The job's feed with its history loaded, held until :meth:`_detach`."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = _Feed(job_id=job_id, key=self.key(job_id))
            self._feeds[job_id] = feed
            feed.reader = asyncio.create_task(self._read(feed), name=f"redis-feed:{job_id}")
        feed.holders += 1
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        try:
            await feed.loaded.wait()
        except BaseException:
            self._detach(feed)
            raise
        if feed.error is not None:
            self._detach(feed)
            raise feed.error
        return feed

    def _detach(self, feed: _Feed) -> None:
        feed.holders -= 1
        if feed.holders > 0 or self._feeds.get(feed.job_id) is not feed:
            return
        if feed.error is not None:
            self._drop(feed)
        else:
            loop = asyncio.get_running_loop()
            feed.linger = loop.call_later(FEED_LINGER_S, self._drop, feed)

    def _forget(self, feed: _Feed) -> None:
        """The job is gone: end its feed, and let no new subscriber find it."""
        feed.gone = True
        feed.end()
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        if asyncio.current_task() is not feed.reader:
            self._stop_reader(feed)

    def _drop(self, feed: _Feed) -> None:
        feed.linger = None
        if feed.holders > 0:
            return
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        self._stop_reader(feed)

    def _stop_reader(self, feed: _Feed) -> None:
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        reader, feed.reader = feed.reader, None
        feed.stopped = True
        feed.nudge.set()
        if reader is not None and not reader.done():
            stopping = asyncio.create_task(self._halt(feed, reader))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _halt(self, feed: _Feed, reader: asyncio.Task[None]) -> None:
        """End a reader that may be blocked in ``XREAD BLOCK 0``.

        ``CLIENT UNBLOCK`` makes the read return at once with nothing, and the reader sees
        it must stop, leaving its connection clean for the pool. Cancelling the read
        instead is the fallback only: redis-py may retry a cancelled blocking command
        (we measured about 6% of cancels swallowed), and it must drop the connection.
        """
        for _ in range(HALT_UNBLOCK_TRIES):
            if reader.done():
                return
            if feed.client_id is not None:
                with contextlib.suppress(redis_errors.RedisError):
                    await self.redis.client_unblock(feed.client_id)
            await asyncio.wait([reader], timeout=HALT_WAIT_S)
        while not reader.done():
            reader.cancel()
            await asyncio.wait([reader], timeout=HALT_WAIT_S)
        if not reader.cancelled() and reader.exception() is not None:
            log.warning("redis reader failed", job_id=feed.job_id, error=str(reader.exception()))

    async def _read(self, feed: _Feed) -> None:
        """The feed's reader: the kept history, then every new entry as it comes."""
        try:
            await self._load(feed)
        except BaseException as exc:
            # Whoever waits to subscribe learns why (never waits forever).
            stopped = not isinstance(exc, Exception)
            feed.error = RuntimeError(f"stopped reading job {feed.job_id}") if stopped else exc
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]
            feed.loaded.set()
            if stopped:
                raise
            return
        feed.loaded.set()
        # Its own connection, so that CLIENT UNBLOCK can end the blocking read (_halt).
        client = Redis(connection_pool=self.redis.connection_pool, single_connection_client=True)
        try:
            await self._follow(feed, client)
        except Exception:
            # Not a lost connection (those are retried): give the feed up. Its subscribers
            # are cut off, so their streams end and resume on a fresh feed.
            log.exception("redis reader failed", job_id=feed.job_id)
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]
            for sub in list(feed.subscribers):
                sub.cut_off()
            feed.wake()
        finally:
            await client.aclose()

    async def _follow(self, feed: _Feed, client: Redis) -> None:
        """Block on the stream for new entries until the feed stops or the job is gone."""
        failures = 0
        # A closed feed keeps reading (while it lingers) to learn if the job is discarded.
        while not (feed.gone or feed.stopped):
            writer = self._writers.get(feed.job_id)
            if writer is not None and writer.next_seq == feed.next_seq and not feed.closed:
                # This instance publishes the job and the feed has every event: they reach
                # it without Redis (publish appends them), so reading would only cost.
                feed.nudge.clear()
                await feed.nudge.wait()
                continue
            try:
                if feed.client_id is None:
                    feed.client_id = await client.client_id()
                    if feed.stopped:
                        break
                reply = await client.xread({feed.key: feed.last_id}, count=READ_COUNT, block=0)
            except _LOST as exc:
                feed.client_id = None  # a new connection has a new id
                if failures == 0:
                    feed.lose()  # its streams end with a retry: hint rather than go silent
                delay = READ_RETRY_S[min(failures, len(READ_RETRY_S) - 1)]
                failures += 1
                log.warning(
                    "redis read failed; retrying",
                    job_id=feed.job_id,
                    error=str(exc),
                    retry_in_s=delay,
                    failures=failures,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            for _key, entries in cast(list[tuple[bytes, list[Entry]]], reply or []):
                self._apply(feed, entries)

    async def _load(self, feed: _Feed) -> None:
        """Read the kept history into the feed, page by page (``JobNotFound`` if none)."""
        start: bytes | str = "-"
        first = True
        while True:
            page = cast(list[Entry], await self.redis.xrange(feed.key, min=start, count=READ_COUNT))
            if first:
                if not page:
                    raise JobNotFound(feed.job_id)
                entry_id = page[0][0]
                # The open marker still there: nothing was trimmed; else the first event.
                seq = 1 if entry_id == _OPEN_ID else _entry_seq(entry_id)
                feed.first_seq = feed.next_seq = seq
                first = False
            self._apply(feed, page)
            if feed.gone:
                raise JobNotFound(feed.job_id)
            if len(page) < READ_COUNT or feed.closed:
                return
            start = b"(" + feed.last_id

    def _apply(self, feed: _Feed, entries: Sequence[Entry]) -> None:
        """Add entries read from Redis to the feed, skipping those it already has."""
        fresh: list[EncodedEvent] = []
        closed = gone = False
        for entry_id, fields in entries:
            feed.last_id = entry_id
            if _F_END in fields:
                closed = True
                gone = gone or fields[_F_END] == _GONE
                continue
            if _F_OPEN in fields:
                continue
            seq = _entry_seq(entry_id)
            expected = feed.next_seq + len(fresh)
            if seq < expected:  # published here and already appended
                continue
            if seq > expected:
                feed.append(fresh, self.history_limit, self.queue_limit, self.history_bytes)
                fresh = []
                feed.skip_to(seq)
            fresh.append(decode_entry(entry_id, fields))
        feed.append(fresh, self.history_limit, self.queue_limit, self.history_bytes)
        if gone:
            self._forget(feed)
        elif closed:
            feed.end()

    async def aclose(self) -> None:
        for feed in list(self._feeds.values()):
            feed.end()
            self._stop_reader(feed)
        self._feeds.clear()
        flushers = [w.flusher for w in self._writers.values() if w.flusher is not None]
        for flusher in flushers:
            flusher.cancel()
        self._writers.clear()
        if flushers:
            await asyncio.gather(*flushers, return_exceptions=True)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        if self.owns_client:
            await self.redis.aclose()
