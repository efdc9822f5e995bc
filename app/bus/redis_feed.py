"""The Redis bus's reading side: one job's events on this instance, read from its stream.

Each instance runs one reader task per job it has subscribers for. The task loads the
kept history (``XRANGE`` in pages) into a local list, then waits for new entries with one
``XREAD BLOCK 0`` on its own connection; subscribers are cursors into that list, exactly
as in :mod:`app.bus.memory` (history then live with no seam, cut-off past the queue
limit, cut-off instead of a gap when trimming overtakes a cursor). So 6,000 watchers of a
job on one instance cost Redis one blocking read, and an idle job costs it nothing but
that read. Events this instance publishes are also appended to its local list at once
(:meth:`JobFeeds.add_published`), so local watchers see them without a round trip; while
this instance publishes a job and its list has every event, its reader does not read
Redis at all (it would only get those same events back). When the last local subscriber
leaves, the list and its reader linger for :data:`FEED_LINGER_S` (reconnects and
long-polls find them warm), then go.

A reader that loses its connection cuts its subscribers off as ``lost`` (their streams
end with a short ``retry:``) before it retries, so a feed never holds an event Redis may
not have.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import attrs
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.bus.local import LocalLog
from app.bus.redis_writer import (
    F_END,
    F_OPEN,
    GONE,
    OPEN_ID,
    REDIS_LOST,
    Entry,
    decode_entry,
    entry_seq,
)
from app.core.errors import JobNotFound
from app.core.events import EncodedEvent

__all__ = ["FEED_LINGER_S", "JobFeed", "JobFeeds"]

# The bus's log lines keep the logger name they had when it was one module.
log = structlog.get_logger("app.bus.redis")

#: How long a job's local list and reader stay after its last local subscriber leaves.
FEED_LINGER_S = 10.0
#: Entries per ``XRANGE`` page while loading history, and per ``XREAD``.
READ_COUNT = 1_000
#: Pause before a failed live read is retried (it resumes from the last entry read).
READ_RETRY_S = (0.05, 0.2, 0.5, 1.0)
#: Stopping a reader: ``CLIENT UNBLOCK`` attempts, and the wait after each.
HALT_UNBLOCK_TRIES = 10
HALT_WAIT_S = 0.1


class FeedLimits(Protocol):
    """The bus's settings the feeds follow (read at each use, as the bus holds them)."""

    history_limit: int
    queue_limit: int
    history_bytes: int


@attrs.define(eq=False)
class JobFeed(LocalLog):
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
class JobFeeds:
    """This instance's feeds of the jobs it has subscribers for, and their readers."""

    redis: Redis
    #: The job's stream key (the bus names keys).
    key: Callable[[str], str]
    #: The next seq this instance will publish for a job; None when it does not publish it.
    published_next_seq: Callable[[str], int | None]
    limits: FeedLimits
    _feeds: dict[str, JobFeed] = attrs.Factory(dict)
    _stopping: set[asyncio.Task[None]] = attrs.Factory(set)

    def subscriber_count(self, job_id: str) -> int:
        """How many local subscribers read the job's feed."""
        feed = self._feeds.get(job_id)
        return 0 if feed is None else len(feed.subscribers)

    # --- what the publishing side tells the feeds ------------------------------------

    def add_published(self, job_id: str, encoded: EncodedEvent) -> None:
        """An event this instance has just written to Redis: append it without a read."""
        feed = self._feeds.get(job_id)
        if feed is None or not feed.loaded.is_set() or feed.closed:
            return
        if encoded.seq == feed.next_seq:
            # History keeps the frame only; the event object goes back to the publisher.
            self._append(feed, [attrs.evolve(encoded, event=None)])
            feed.last_id = f"{encoded.seq}-0".encode()
        else:  # the feed is behind (another publisher, or a load under way): read
            feed.nudge.set()

    def nudge(self, job_id: str) -> None:
        """Wake the job's reader if it waits on this instance's publishing (that changed)."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.nudge.set()

    def lose(self, job_id: str) -> None:
        """Give up a feed whose events may outrun Redis; its subscribers end as ``lost``."""
        feed = self._feeds.get(job_id)
        if feed is None:
            return
        feed.lose()
        del self._feeds[job_id]
        self._stop_reader(feed)

    def end_if_complete(self, job_id: str, newest: int) -> None:
        """The job's log closed at seq ``newest``: end its feed now if it has every event."""
        feed = self._feeds.get(job_id)
        if feed is not None and feed.loaded.is_set() and feed.next_seq - 1 == newest:
            feed.end()  # every event is here already; the reader will see the marker too

    def forget(self, job_id: str) -> None:
        """The job was discarded: end its feed, if any, for good."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            self._forget(feed)

    def end_all(self) -> None:
        """End every feed and stop its reader (the bus is closing)."""
        for feed in list(self._feeds.values()):
            feed.end()
            self._stop_reader(feed)
        self._feeds.clear()

    async def wait_stopped(self) -> None:
        """Wait until the readers being stopped have ended."""
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # --- a feed's life ---------------------------------------------------------------

    async def attach(self, job_id: str) -> JobFeed:
        """The job's feed with its history loaded, held until :meth:`detach`."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = JobFeed(job_id=job_id, key=self.key(job_id))
            self._feeds[job_id] = feed
            feed.reader = asyncio.create_task(self._read(feed), name=f"redis-feed:{job_id}")
        feed.holders += 1
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        try:
            await feed.loaded.wait()
        except BaseException:
            self.detach(feed)
            raise
        if feed.error is not None:
            self.detach(feed)
            raise feed.error
        return feed

    def detach(self, feed: JobFeed) -> None:
        """Release a hold taken by :meth:`attach`; the last one lets the feed linger."""
        feed.holders -= 1
        if feed.holders > 0 or self._feeds.get(feed.job_id) is not feed:
            return
        if feed.error is not None:
            self._drop(feed)
        else:
            loop = asyncio.get_running_loop()
            feed.linger = loop.call_later(FEED_LINGER_S, self._drop, feed)

    def _forget(self, feed: JobFeed) -> None:
        """The job is gone: end its feed, and let no new subscriber find it."""
        feed.gone = True
        feed.end()
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        if asyncio.current_task() is not feed.reader:
            self._stop_reader(feed)

    def _drop(self, feed: JobFeed) -> None:
        feed.linger = None
        if feed.holders > 0:
            return
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        self._stop_reader(feed)

    def _stop_reader(self, feed: JobFeed) -> None:
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

    async def _halt(self, feed: JobFeed, reader: asyncio.Task[None]) -> None:
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

    # --- the reader ------------------------------------------------------------------

    async def _read(self, feed: JobFeed) -> None:
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

    async def _follow(self, feed: JobFeed, client: Redis) -> None:
        """Block on the stream for new entries until the feed stops or the job is gone."""
        failures = 0
        # A closed feed keeps reading (while it lingers) to learn if the job is discarded.
        while not (feed.gone or feed.stopped):
            if self.published_next_seq(feed.job_id) == feed.next_seq and not feed.closed:
                # This instance publishes the job and the feed has every event: they reach
                # it without Redis (add_published), so reading would only cost.
                feed.nudge.clear()
                await feed.nudge.wait()
                continue
            try:
                if feed.client_id is None:
                    feed.client_id = await client.client_id()
                    if feed.stopped:
                        break
                reply = await client.xread({feed.key: feed.last_id}, count=READ_COUNT, block=0)
            except REDIS_LOST as exc:
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

    async def _load(self, feed: JobFeed) -> None:
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
                seq = 1 if entry_id == OPEN_ID else entry_seq(entry_id)
                feed.first_seq = feed.next_seq = seq
                first = False
            self._apply(feed, page)
            if feed.gone:
                raise JobNotFound(feed.job_id)
            if len(page) < READ_COUNT or feed.closed:
                return
            start = b"(" + feed.last_id

    def _append(self, feed: JobFeed, events: Sequence[EncodedEvent]) -> None:
        limits = self.limits
        feed.append(events, limits.history_limit, limits.queue_limit, limits.history_bytes)

    def _apply(self, feed: JobFeed, entries: Sequence[Entry]) -> None:
        """Add entries read from Redis to the feed, skipping those it already has."""
        fresh: list[EncodedEvent] = []
        closed = gone = False
        for entry_id, fields in entries:
            feed.last_id = entry_id
            if F_END in fields:
                closed = True
                gone = gone or fields[F_END] == GONE
                continue
            if F_OPEN in fields:
                continue
            seq = entry_seq(entry_id)
            expected = feed.next_seq + len(fresh)
            if seq < expected:  # published here and already appended
                continue
            if seq > expected:
                self._append(feed, fresh)
                fresh = []
                feed.skip_to(seq)
            fresh.append(decode_entry(entry_id, fields))
        self._append(feed, fresh)
        if gone:
            self._forget(feed)
        elif closed:
            feed.end()
