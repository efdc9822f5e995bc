"""The Redis bus's reading side: the jobs watched on this instance, read from their streams.

Each job with subscribers here has a :class:`JobFeed`: its kept history, loaded with
``XRANGE`` in pages, in a local list that subscribers read as cursors, exactly as in
:mod:`app.bus.memory` (history then live with no seam, cut-off past the queue limit,
cut-off instead of a gap when trimming overtakes a cursor). New entries come from one of
a few :class:`~app.bus.redis_reader.StreamReader`\\ s, each a connection in one
``XREAD BLOCK`` over the streams of many jobs, so the connections this instance holds
stay fixed whatever the number of jobs watched, and 6,000 watchers of a job on one
instance cost Redis what one does. A finished job's feed is not read at all (its log is
complete). Events this instance publishes are also appended to its feed at once
(:meth:`JobFeeds.add_published`), so local watchers see them without a round trip;
while this instance publishes a job and its feed has every event, the job's stream is
left out of the reads (they would only bring those same events back).

When the last local subscriber leaves, the feed lingers for :data:`FEED_LINGER_S`
(reconnects and long-polls find it warm), then goes. Memory: each feed keeps at most
``history_limit`` events and ``history_bytes`` (as the memory bus does), and the feeds
together are counted against ``feeds_bytes``: past it, lingering feeds go, those that
started lingering first first (a feed in use is never dropped; each holds at most one
job's history). A feed counts its events as the history budget does, plus
:data:`FEED_OVERHEAD_BYTES`.

A read that loses its connection cuts the subscribers of the feeds it named off as
``lost`` (their streams end with a short ``retry:``) before it is retried, so a feed
never holds an event Redis may not have.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import attrs
import structlog
from redis.asyncio import Redis

from app.bus.local import LocalLog
from app.bus.redis_reader import READ_COUNT, READERS, StreamReader
from app.bus.redis_writer import (
    F_END,
    F_OPEN,
    GONE,
    OPEN_ID,
    Entry,
    decode_entry,
    entry_seq,
)
from app.core.errors import JobNotFound
from app.core.events import EncodedEvent

__all__ = ["FEED_LINGER_S", "FEED_OVERHEAD_BYTES", "JobFeed", "JobFeeds"]

# The bus's log lines keep the logger name they had when it was one module.
log = structlog.get_logger("app.bus.redis")

#: How long a job's feed stays after its last local subscriber leaves (by default).
FEED_LINGER_S = 10.0
#: What a feed costs beyond its events: the feed, its ids, event and timer (about 2.3 KB
#: measured with tracemalloc; rounded up).
FEED_OVERHEAD_BYTES = 2_560


class FeedLimits(Protocol):
    """The bus's settings the feeds follow (read at each use, as the bus holds them)."""

    history_limit: int
    queue_limit: int
    history_bytes: int
    feeds_bytes: int
    feed_linger_s: float


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
    #: The task loading the history (None once it has ended).
    loader: asyncio.Task[None] | None = None
    #: The feed was given up (dropped, lost, the bus closed): it is read no more.
    stopped: bool = False
    linger: asyncio.TimerHandle | None = None
    #: What ``bytes`` the feeds' total counts for this feed.
    counted: int = 0

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
    """This instance's feeds of the jobs it has subscribers for, and the readers of them."""

    redis: Redis
    #: The job's stream key (the bus names keys).
    key: Callable[[str], str]
    #: The next seq this instance will publish for a job; None when it does not publish it.
    published_next_seq: Callable[[str], int | None]
    limits: FeedLimits
    _feeds: dict[str, JobFeed] = attrs.Factory(dict)
    #: The feeds without subscribers, in the order they started lingering.
    _lingering: dict[str, JobFeed] = attrs.Factory(dict)
    _readers: list[StreamReader[JobFeed]] = attrs.field(init=False)
    _stopping: set[asyncio.Task[None]] = attrs.Factory(set)
    #: What every feed here costs (see :data:`FEED_OVERHEAD_BYTES`), against ``feeds_bytes``.
    bytes: int = 0

    def __attrs_post_init__(self) -> None:
        self._readers = [
            StreamReader(
                self.redis,
                f"{index}",
                wants=self._wants,
                deliver=self._apply,
                lost=self._read_lost,
                failed=self._read_failed,
            )
            for index in range(READERS)
        ]

    def subscriber_count(self, job_id: str) -> int:
        """How many local subscribers read the job's feed."""
        feed = self._feeds.get(job_id)
        return 0 if feed is None else len(feed.subscribers)

    def __contains__(self, job_id: object) -> bool:
        """Whether this instance holds a feed of the job (in use or lingering)."""
        return job_id in self._feeds

    @property
    def count(self) -> int:
        """How many feeds this instance holds (in use or lingering)."""
        return len(self._feeds)

    @property
    def readers(self) -> int:
        """How many readers hold a connection (at most ``READERS``)."""
        return sum(reader.connected for reader in self._readers)

    @property
    def followed(self) -> int:
        """How many feeds the readers follow (jobs that are not finished)."""
        return sum(len(reader) for reader in self._readers)

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
            self._reader(feed).wake()

    def nudge(self, job_id: str) -> None:
        """This instance's publishing of the job changed: its feed may need reading again."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            self._reader(feed).wake()

    def lose(self, job_id: str) -> None:
        """Give up a feed whose events may outrun Redis; its subscribers end as ``lost``."""
        feed = self._feeds.get(job_id)
        if feed is None:
            return
        feed.lose()
        self._remove(feed)

    def end_if_complete(self, job_id: str, newest: int) -> None:
        """The job's log closed at seq ``newest``: end its feed now if it has every event."""
        feed = self._feeds.get(job_id)
        if feed is not None and feed.loaded.is_set() and feed.next_seq - 1 == newest:
            feed.end()  # every event is here already: nothing more to read
            self._reader(feed).unfollow(feed)

    def forget(self, job_id: str) -> None:
        """The job was discarded: end its feed, if any, for good."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            self._forget(feed)

    def end_all(self) -> None:
        """End every feed and stop reading (the bus is closing)."""
        for feed in list(self._feeds.values()):
            feed.end()
            self._remove(feed)
        for reader in self._readers:
            self._track(asyncio.create_task(reader.aclose()))

    async def wait_stopped(self) -> None:
        """Wait until the readers and loaders being stopped have ended."""
        while self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # --- a feed's life ---------------------------------------------------------------

    async def attach(self, job_id: str) -> JobFeed:
        """The job's feed with its history loaded, held until :meth:`detach`."""
        feed = self._feeds.get(job_id)
        # A finished job's feed is not read: the job may have been discarded elsewhere.
        check = feed is not None and feed.closed
        if feed is None:
            feed = JobFeed(job_id=job_id, key=self.key(job_id))
            self._feeds[job_id] = feed
            self._count(feed)
            feed.loader = asyncio.create_task(self._load_task(feed), name=f"redis-load:{job_id}")
        feed.holders += 1
        self._lingering.pop(job_id, None)
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        try:
            await feed.loaded.wait()
            if feed.error is not None:
                raise feed.error
            if check and not await self.redis.exists(feed.key):
                self._forget(feed)
                raise JobNotFound(job_id)
        except BaseException:
            self.detach(feed)
            raise
        return feed

    def detach(self, feed: JobFeed) -> None:
        """Release a hold taken by :meth:`attach`; the last one lets the feed linger."""
        feed.holders -= 1
        if feed.holders > 0 or self._feeds.get(feed.job_id) is not feed:
            return
        if feed.error is not None:
            self._remove(feed)
            return
        loop = asyncio.get_running_loop()
        feed.linger = loop.call_later(self.limits.feed_linger_s, self._drop, feed)
        self._lingering[feed.job_id] = feed
        self._shrink()

    def _forget(self, feed: JobFeed) -> None:
        """The job is gone: end its feed, and let no new subscriber find it."""
        feed.gone = True
        feed.end()
        self._remove(feed)

    def _drop(self, feed: JobFeed) -> None:
        """A lingering feed's time is up (or its bytes are needed): it goes."""
        feed.linger = None
        if feed.holders == 0:
            self._remove(feed)

    def _remove(self, feed: JobFeed) -> None:
        """Stop reading the feed and forget it (its subscribers, if any, keep their list)."""
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        feed.stopped = True
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        if self._lingering.get(feed.job_id) is feed:
            del self._lingering[feed.job_id]
        self._reader(feed).unfollow(feed)
        self.bytes -= feed.counted
        feed.counted = 0
        loader, feed.loader = feed.loader, None
        if loader is not None and not loader.done() and loader is not asyncio.current_task():
            loader.cancel()
            self._track(loader)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _shrink(self) -> None:
        """Past ``feeds_bytes``, drop the lingering feeds, oldest first."""
        budget = self.limits.feeds_bytes
        while self.bytes > budget and self._lingering:
            self._drop(next(iter(self._lingering.values())))

    # --- reading ---------------------------------------------------------------------

    def _reader(self, feed: JobFeed) -> StreamReader[JobFeed]:
        return self._readers[zlib.crc32(feed.job_id.encode()) % len(self._readers)]

    def _wants(self, feed: JobFeed) -> bool:
        """Whether the feed's stream needs reading now."""
        if feed.closed or feed.stopped:
            return False
        # This instance publishes the job and the feed has every event: they reach it
        # without Redis (add_published), so reading would only cost.
        return self.published_next_seq(feed.job_id) != feed.next_seq

    def _read_lost(self, feeds: Sequence[JobFeed]) -> None:
        for feed in feeds:
            feed.lose()  # its streams end with a retry: hint rather than go silent

    def _read_failed(self, feeds: Sequence[JobFeed]) -> None:
        for feed in feeds:
            for sub in list(feed.subscribers):
                sub.cut_off()
            feed.wake()
            self._remove(feed)

    async def _load_task(self, feed: JobFeed) -> None:
        """Load the feed's history, then have a reader follow it unless the job has ended."""
        try:
            await self._load(feed)
        except BaseException as exc:
            # Whoever waits to subscribe learns why (never waits forever).
            stopped = not isinstance(exc, Exception)
            feed.error = RuntimeError(f"stopped reading job {feed.job_id}") if stopped else exc
            feed.loaded.set()
            if self._feeds.get(feed.job_id) is feed:
                self._remove(feed)
            if stopped:
                raise
            return
        finally:
            feed.loader = None
        feed.loaded.set()
        if not (feed.closed or feed.stopped):
            self._reader(feed).follow(feed)

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
        self._count(feed)

    def _count(self, feed: JobFeed) -> None:
        """Bring the feeds' total up to date with what ``feed`` holds now."""
        if feed.stopped:
            return
        cost = FEED_OVERHEAD_BYTES + feed.bytes
        self.bytes += cost - feed.counted
        feed.counted = cost
        if self.bytes > self.limits.feeds_bytes:
            self._shrink()

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
                self._count(feed)
            fresh.append(decode_entry(entry_id, fields))
        self._append(feed, fresh)
        if gone:
            self._forget(feed)
        elif closed:
            feed.end()
            self._reader(feed).unfollow(feed)
