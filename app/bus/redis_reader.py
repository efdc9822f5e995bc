"""One connection reading many job streams: ``XREAD BLOCK`` over every key it follows.

A :class:`StreamReader` follows the streams of a shard of this instance's feeds (the bus
runs :data:`READERS` of them, whatever the number of jobs watched). It sends one
``XREAD`` naming every stream that needs reading, each from the last entry read, blocks
up to :data:`READ_BLOCK_S`, hands each stream's new entries to its feed and reads again.
When a stream is added while the read is blocked, ``CLIENT UNBLOCK`` (on the shared
pool) ends the read at once and the next one names the new set; a stream that leaves is
simply not named again. So the connections to Redis stay fixed: a job watched here costs
one key in a read, not a connection, and a finished job's feed is not read at all.

The read's connection is its own (:func:`~app.bus.redis_client.reader_client`), with a
socket timeout longer than the block: redis-py applies the socket timeout to a blocking
command's reply, and a healthy Redis must never look lost. A read that does fail (Redis
unreachable) tells the feeds it named (their subscribers end with a short ``retry:``,
so that no feed holds an event Redis may not have) and is retried from the same entries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, cast

import attrs
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.bus.redis_client import reader_client
from app.bus.redis_writer import REDIS_LOST, Entry

__all__ = ["READERS", "READ_BLOCK_S", "READ_COUNT", "Followed", "StreamReader"]

# The bus's log lines keep the logger name they had when it was one module.
log = structlog.get_logger("app.bus.redis")

#: Readers (each one connection) per instance; a job's stream goes to one by its id.
READERS = 4
#: How long one ``XREAD`` blocks; an idle reader sends one read per block.
READ_BLOCK_S = 5.0
#: The reader connection's socket timeout: the block, and time for the reply to come.
READ_TIMEOUT_S = READ_BLOCK_S + 5.0
#: Entries per stream per ``XREAD`` (and per ``XRANGE`` page while loading history).
READ_COUNT = 1_000
#: Pause before a failed read is retried (it resumes from the last entry read).
READ_RETRY_S = (0.05, 0.2, 0.5, 1.0)
#: Pause before ``CLIENT UNBLOCK`` is tried again when the read had not reached Redis
#: (doubling up to :data:`UNBLOCK_RETRY_MAX_S`), and how often it is tried; past that the
#: id may be stale, and is read again before the next read.
UNBLOCK_RETRY_S = 0.005
UNBLOCK_RETRY_MAX_S = 0.1
UNBLOCK_TRIES = 20
#: Stopping a reader: ``CLIENT UNBLOCK`` attempts, and the wait after each.
HALT_UNBLOCK_TRIES = 10
HALT_WAIT_S = 0.1


class Followed(Protocol):
    """What a reader needs of a feed: its stream and where reading resumes."""

    @property
    def key(self) -> str: ...

    @property
    def last_id(self) -> bytes: ...


F = TypeVar("F", bound=Followed)


@attrs.define(eq=False)
class StreamReader(Generic[F]):
    """One connection in ``XREAD BLOCK`` over the streams of the feeds it follows."""

    #: The shared pool's client (``CLIENT UNBLOCK`` goes out on it); the reader's own
    #: connection is made from it.
    redis: Redis
    name: str
    #: Whether a followed feed needs reading now (a feed this instance publishes with
    #: every event, for one, does not).
    wants: Callable[[F], bool]
    #: ``(feed, entries)``: new entries of the feed's stream, in order.
    deliver: Callable[[F, Sequence[Entry]], None]
    #: ``(feeds)``: a read of these feeds failed (Redis lost); it is retried.
    lost: Callable[[Sequence[F]], None]
    #: ``(feeds)``: a read of these feeds failed for another reason: they are given up.
    failed: Callable[[Sequence[F]], None]
    _feeds: dict[str, F] = attrs.Factory(dict)
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False
    _client_id: int | None = None
    #: The number of the read in flight (0: none), so that an unblock ends that read only.
    _reading: int = 0
    _reads: int = 0
    _wakeup: asyncio.Event = attrs.Factory(asyncio.Event)
    _unblocker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._feeds)

    @property
    def connected(self) -> bool:
        """Whether the reader runs (it holds its connection until closed)."""
        return self._task is not None and not self._task.done()

    def follow(self, feed: F) -> None:
        """Read ``feed``'s stream from its ``last_id`` on (the read in flight is renewed)."""
        self._feeds[feed.key] = feed
        self.wake()

    def unfollow(self, feed: F) -> None:
        """Stop reading ``feed``'s stream (the next read leaves it out)."""
        if self._feeds.get(feed.key) is feed:
            del self._feeds[feed.key]

    def wake(self) -> None:
        """A feed may need reading that the read in flight leaves out: read anew."""
        if self._stopping:
            return
        if self._task is None or self._task.done():  # not started, or ended by a bug
            self._task = asyncio.create_task(self._run(), name=f"redis-reader:{self.name}")
        self._wakeup.set()
        if self._reading and self._unblocker is None:
            self._unblocker = asyncio.create_task(self._unblock(self._reading))

    async def _unblock(self, read: int) -> None:
        """End the read numbered ``read``, which may not have reached Redis yet."""
        try:
            for attempt in range(UNBLOCK_TRIES):
                if self._reading != read or self._stopping:
                    return
                client_id = self._client_id
                if client_id is not None and await self.redis.client_unblock(client_id):
                    return
                await asyncio.sleep(min(UNBLOCK_RETRY_S * 2**attempt, UNBLOCK_RETRY_MAX_S))
            self._client_id = None
        except redis_errors.RedisError:
            pass  # the read ends within its block anyway, or fails on its own
        finally:
            self._unblocker = None

    async def aclose(self) -> None:
        """Stop reading and close the connection."""
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is None:
            return
        for _ in range(HALT_UNBLOCK_TRIES):
            if task.done():
                break
            if self._reading and self._client_id is not None:
                with contextlib.suppress(redis_errors.RedisError):
                    await self.redis.client_unblock(self._client_id)
            await asyncio.wait([task], timeout=HALT_WAIT_S)
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=HALT_WAIT_S)
        unblocker = self._unblocker
        if unblocker is not None:
            unblocker.cancel()
            await asyncio.wait([unblocker])

    async def _run(self) -> None:
        client = reader_client(self.redis, read_timeout_s=READ_TIMEOUT_S)
        try:
            await self._read_forever(client)
        except Exception:
            # A bug: logged; the reader starts again at the next change of its feeds.
            log.exception("redis reader stopped", reader=self.name)
            self._reading = 0
            self._client_id = None
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _read_forever(self, client: Redis) -> None:
        failures = 0
        while not self._stopping:
            named = {key: feed for key, feed in self._feeds.items() if self.wants(feed)}
            if not named:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._wakeup.clear()
            try:
                reply = await self._read(client, named)
            except REDIS_LOST as exc:
                self._client_id = None  # a new connection has a new id
                if failures == 0:
                    self.lost(list(named.values()))
                delay = READ_RETRY_S[min(failures, len(READ_RETRY_S) - 1)]
                failures += 1
                log.warning(
                    "redis read failed; retrying",
                    reader=self.name,
                    streams=len(named),
                    error=str(exc),
                    retry_in_s=delay,
                    failures=failures,
                )
                await asyncio.sleep(delay)
                continue
            except Exception:
                # Not a lost connection: give these feeds up (their subscribers are cut
                # off and resume on fresh feeds); the reader goes on with the others.
                log.exception("redis read failed", reader=self.name, streams=len(named))
                for given_up in named.values():
                    self.unfollow(given_up)
                self.failed(list(named.values()))
                await asyncio.sleep(READ_RETRY_S[-1])
                continue
            failures = 0
            for raw_key, entries in reply:
                read = named.get(raw_key.decode())
                # Not a feed given up (or replaced) while the read was out.
                if read is not None and self._feeds.get(read.key) is read and entries:
                    try:
                        self.deliver(read, entries)
                    except Exception:
                        # One feed's failure must not stop the reading of the others.
                        log.exception("redis entries not applied", reader=self.name)
                        self.unfollow(read)
                        self.failed([read])

    async def _read(self, client: Redis, named: dict[str, F]) -> list[tuple[bytes, list[Entry]]]:
        if self._client_id is None:
            self._client_id = await client.client_id()
        streams = {key: feed.last_id for key, feed in named.items()}
        self._reads += 1
        self._reading = self._reads
        try:
            reply = await client.xread(
                streams,  # type: ignore[arg-type]
                count=READ_COUNT,
                block=round(READ_BLOCK_S * 1000),
            )
        finally:
            self._reading = 0
        return cast(list[tuple[bytes, list[Entry]]], reply or [])
