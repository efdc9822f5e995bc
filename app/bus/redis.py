"""RedisEventBus: each job's events in a Redis Stream, shared by every instance.

Layout: one stream per job, ``{prefix}job:{job_id}:events``. An event is one entry whose
stream id is ``<seq>-0`` with three fields: ``t`` (type), ``ts`` (the stamp, exact as
``repr``) and ``f`` (the SSE frame, encoded once by the publisher). Two markers share the
stream so that a reader sees them in order with the events, in the same read:

* ``0-1`` ``open``: written by :meth:`RedisEventBus.open`, so a job without events exists;
* ``<last seq>-<n>`` ``end``: ``closed`` written by :meth:`RedisEventBus.close` (readers
  end there), ``gone`` by :meth:`RedisEventBus.discard` just before it deletes the key
  (readers on every instance forget the job, even one whose log had already ended).

The key's TTL (``FLUSHLINE_JOB_TTL``) is set when the job opens, renewed as the job
publishes, and set again on close, so finished jobs expire by themselves: nothing sweeps.

This module is the facade; the two sides it joins are modules of their own:

* writing, :mod:`app.bus.redis_writer`: the entries' fields (and :func:`decode_entry`,
  which reads them back) and, per job, the ``XADD`` that claims each seq (races between
  publishers, trimming by count and bytes, the TTL's renewal) and, while Redis is lost,
  the bounded buffer and its flusher;
* reading, :mod:`app.bus.redis_feed`: per job watched on this instance, a local list
  that every local subscriber reads as a cursor (:mod:`app.bus.local`), lingering for
  :data:`FEED_LINGER_S` after the last one leaves, all the lists within ``feeds_bytes``;
  new entries come from a few readers per instance (:mod:`app.bus.redis_reader`), each
  one connection in one ``XREAD BLOCK`` over many jobs' streams.

They meet where a job is both published and watched here: a publish appends its event to
the local feed at once, and the job's stream is not read while its feed has every event.
Feeds never hold an event Redis does not: the publisher's own feed is given up when its
buffering starts, and a read that loses its connection cuts the subscribers of the feeds
it named off as ``lost`` (their streams end with a short ``retry:``) before it retries.

Connections: the shared pool's (commands in flight, at most
:data:`~app.bus.redis_client.MAX_CONNECTIONS`) and at most
:data:`~app.bus.redis_reader.READERS` readers', whatever the number of jobs watched.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, Self

import attrs
from redis.asyncio import Redis

from app.bus.base import LogClosed
from app.bus.local import LocalCursor
from app.bus.redis_client import milliseconds
from app.bus.redis_feed import FEED_LINGER_S, JobFeed, JobFeeds
from app.bus.redis_writer import (
    Entry,
    JobWriter,
    WriterHooks,
    decode_entry,
    stream_top,
)
from app.core.errors import BackendUnavailable, JobNotFound
from app.core.events import AnyEvent, EncodedEvent

__all__ = ["FEED_LINGER_S", "Entry", "RedisEventBus", "decode_entry"]

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


@attrs.define(eq=False)
class _RedisSubscription(LocalCursor):
    """A cursor into a job's :class:`~app.bus.redis_feed.JobFeed` on this instance."""

    feeds: JobFeeds = attrs.field(kw_only=True)

    async def __aenter__(self) -> Self:
        feed = await self.feeds.attach(self.job_id)
        try:
            self.start(feed)
        except BaseException:
            self.feeds.detach(feed)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        feed = self.stop()
        if isinstance(feed, JobFeed):
            self.feeds.detach(feed)


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
    #: Bytes of every job's feed on this instance together (copies of histories read
    #: from Redis): past it, the feeds without subscribers go, oldest first.
    feeds_bytes: int = 64 << 20
    #: How long a job's feed stays once its last local subscriber has left.
    feed_linger_s: float = FEED_LINGER_S
    _writers: dict[str, JobWriter] = attrs.Factory(dict)
    _feeds: JobFeeds = attrs.field(init=False)
    _hooks: WriterHooks = attrs.field(init=False)
    _open_script: Any = None
    _close_script: Any = None

    def __attrs_post_init__(self) -> None:
        self._open_script = self.redis.register_script(_OPEN_SCRIPT)
        self._close_script = self.redis.register_script(_CLOSE_SCRIPT)
        self._feeds = JobFeeds(
            self.redis,
            key=self.key,
            published_next_seq=self._published_next_seq,
            limits=self,
        )
        self._hooks = WriterHooks(
            buffering=self._feeds.lose,
            settled=self._feeds.nudge,
            failed=self._retire,
            gone=self._drop_writer,
        )

    @property
    def _ttl_ms(self) -> int:
        return milliseconds(self.job_ttl_s)

    def key(self, job_id: str) -> str:
        """The Redis key of the job's stream."""
        return f"{self.prefix}job:{job_id}:events"

    # --- publishing ------------------------------------------------------------------

    def _new_writer(self, job_id: str, next_seq: int, renewed_at: float) -> JobWriter:
        return JobWriter(
            job_id,
            self.key(job_id),
            self.redis,
            limits=self,
            hooks=self._hooks,
            next_seq=next_seq,
            renewed_at=renewed_at,
        )

    async def open(self, job_id: str) -> None:
        created = await self._open_script(keys=[self.key(job_id)], args=[self._ttl_ms])
        if created:
            self._writers[job_id] = self._new_writer(job_id, 1, time.monotonic())

    async def _top(self, job_id: str) -> tuple[int, bool]:
        """The newest seq in Redis and whether the log is closed; ``JobNotFound`` if none."""
        return await stream_top(self.redis, self.key(job_id), job_id)

    async def _writer(self, job_id: str) -> JobWriter:
        writer = self._writers.get(job_id)
        if writer is None:
            newest, closed = await self._top(job_id)
            # The key's TTL is unknown here: renew it with the first publish.
            writer = self._writers.setdefault(
                job_id, self._new_writer(job_id, newest + 1, -self.job_ttl_s)
            )
            writer.closed = writer.closed or closed
        return writer

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        writer = await self._writer(job_id)
        try:
            encoded, in_redis = await writer.publish(event)
        except LogClosed:
            # Ended by another instance (a sweeper): this one publishes it no more, and its
            # feed reads that instance's end from Redis.
            self._retire(writer)
            raise
        if in_redis:
            self._feeds.add_published(job_id, encoded)
        return encoded

    def _published_next_seq(self, job_id: str) -> int | None:
        """The next seq this instance will publish for the job (None: it does not publish it)."""
        writer = self._writers.get(job_id)
        return None if writer is None else writer.next_seq

    def _retire(self, writer: JobWriter) -> None:
        """A writer that can publish no more: the job's next publish starts anew."""
        if self._writers.get(writer.job_id) is writer:
            self._drop_writer(writer.job_id)

    def release_publisher(self, job_id: str) -> None:
        """Drop the job's writer (unless it holds events waiting for a lost Redis): the
        job's feed here reads Redis again, and the next publish here makes a new writer
        (one ``XREVRANGE``)."""
        writer = self._writers.get(job_id)
        if writer is not None and not writer.pending:
            self._drop_writer(job_id)

    def _drop_writer(self, job_id: str) -> None:
        """This instance no longer publishes the job: its reader reads Redis again."""
        self._writers.pop(job_id, None)
        self._feeds.nudge(job_id)

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
        self._feeds.end_if_complete(job_id, newest)

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
        self._feeds.forget(job_id)

    # --- subscribing -----------------------------------------------------------------

    def subscribe(self, job_id: str, after_seq: int = 0) -> _RedisSubscription:
        return _RedisSubscription(job_id, after_seq, feeds=self._feeds)

    def subscriber_count(self, job_id: str) -> int:
        return self._feeds.subscriber_count(job_id)

    @property
    def feeds(self) -> JobFeeds:
        """This instance's feeds (their count and bytes, for measuring)."""
        return self._feeds

    async def aclose(self) -> None:
        self._feeds.end_all()
        flushers = [w.flusher for w in self._writers.values() if w.flusher is not None]
        for flusher in flushers:
            flusher.cancel()
        self._writers.clear()
        if flushers:
            await asyncio.gather(*flushers, return_exceptions=True)
        await self._feeds.wait_stopped()
        if self.owns_client:
            await self.redis.aclose()
