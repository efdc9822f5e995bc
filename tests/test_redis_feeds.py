"""How one instance reads the jobs it watches from Redis: a few readers, finished jobs not at all.

Two ``RedisEventBus`` instances on a real ``redis-server``: one publishes, the other (the
reader) watches, so every event a test sees went through Redis and the reader's
``XREAD``. What ``tests/test_bus.py`` cannot see from the protocol: connections, the
readers' key sets, the feeds' byte budget, and the socket timeout.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from app.bus.local import event_cost
from app.bus.redis import RedisEventBus
from app.bus.redis_client import READER_CLIENT_NAME, connect_redis
from app.bus.redis_feed import FEED_OVERHEAD_BYTES
from app.bus.redis_reader import READ_BLOCK_S, READERS
from app.core.errors import JobNotFound
from app.core.events import InsightEvent
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

#: A live event's way through Redis, with a woken read: far below the read's block.
PROMPT_S = 1.0

MakeBus = Callable[..., RedisEventBus]


@pytest.fixture
async def make_bus(redis_server: RedisServer) -> AsyncIterator[MakeBus]:
    """Buses on the session's Redis under one prefix of the test's own (closed after it)."""
    prefix = f"feeds-{uuid.uuid4().hex}:"
    made: list[RedisEventBus] = []

    def make(url: str = redis_server.url, **limits: Any) -> RedisEventBus:
        made.append(RedisEventBus(connect_redis(url), prefix=prefix, owns_client=True, **limits))
        return made[-1]

    yield make
    for bus in made:
        await bus.aclose()


def ids_of_one_reader(count: int) -> list[str]:
    """Job ids whose streams the same reader follows."""
    ids: list[str] = []
    while len(ids) < count:
        job_id = uuid.uuid4().hex
        if zlib.crc32(job_id.encode()) % READERS == 0:
            ids.append(job_id)
    return ids


async def next_events(bus: RedisEventBus, job_id: str, after: int = 0) -> float:
    """Seconds until the job's next event after ``after`` reaches a subscriber of ``bus``."""
    started = time.monotonic()
    async with bus.subscribe(job_id, after) as sub:
        batch = await sub.next_batch(READ_BLOCK_S * 2)
        assert batch.events, "no event within two blocks"
    return time.monotonic() - started


class TestReaders:
    """Live jobs share a few readers, and a new one is read at once."""

    async def test_a_job_watched_while_the_read_blocks_is_read_at_once(
        self, make_bus: MakeBus
    ) -> None:
        """Job Y watched while the reader blocks on job X: Y's event arrives within 1 s."""
        publisher, reader = make_bus(), make_bus()
        x, y = ids_of_one_reader(2)
        for job_id in (x, y):
            await publisher.open(job_id)
            await publisher.publish(job_id, InsightEvent("first"))
        async with reader.subscribe(x) as on_x:
            assert len((await on_x.next_batch(PROMPT_S)).events) == 1
            await asyncio.sleep(0.3)  # the reader is blocked in XREAD, naming X only
            async with reader.subscribe(y) as on_y:
                assert len((await on_y.next_batch(PROMPT_S)).events) == 1
                started = time.monotonic()
                await publisher.publish(y, InsightEvent("second"))
                batch = await on_y.next_batch(READ_BLOCK_S * 2)
                took = time.monotonic() - started
        assert [e.seq for e in batch.events] == [2]
        assert took < PROMPT_S

    async def test_fifty_live_jobs_cost_at_most_the_readers_connections(
        self, make_bus: MakeBus, redis_server: RedisServer
    ) -> None:
        """50 running jobs watched on one instance: every event arrives, readers <= READERS."""
        publisher, reader = make_bus(), make_bus()
        admin = Redis.from_url(redis_server.url)
        ids = [uuid.uuid4().hex for _ in range(50)]
        for job_id in ids:
            await publisher.open(job_id)
        readers_before = sum(c.get("name") == READER_CLIENT_NAME for c in await admin.client_list())
        subs = [reader.subscribe(job_id) for job_id in ids]
        for sub in subs:
            await sub.__aenter__()
        try:
            await asyncio.sleep(0.2)
            for job_id in ids:
                await publisher.publish(job_id, InsightEvent("one"))
            batches = await asyncio.gather(*(sub.next_batch(PROMPT_S * 5) for sub in subs))
            readers_now = sum(
                c.get("name") == READER_CLIENT_NAME for c in await admin.client_list()
            )
        finally:
            for sub in subs:
                await sub.__aexit__(None, None, None)
            await admin.aclose()
        assert [len(batch.events) for batch in batches] == [1] * 50
        assert reader.feeds.followed == 50
        assert reader.feeds.readers <= READERS
        assert readers_now - readers_before <= READERS

    async def test_a_blocking_read_outlives_a_short_socket_timeout(
        self, make_bus: MakeBus, redis_server: RedisServer
    ) -> None:
        """socket_timeout=0.5 in the URL: a quiet watch past a whole block is not cut."""
        publisher = make_bus()
        reader = make_bus(f"{redis_server.url}?socket_timeout=0.5")
        job_id = uuid.uuid4().hex
        await publisher.open(job_id)
        async with reader.subscribe(job_id) as sub:
            quiet = await sub.next_batch(READ_BLOCK_S + 1.0)
            assert not quiet.events
            assert not sub.cut
            await publisher.publish(job_id, InsightEvent("after the quiet"))
            batch = await sub.next_batch(PROMPT_S)
        assert [e.seq for e in batch.events] == [1]


class TestFinishedJobs:
    """A finished job's feed is not read; it still learns the job was discarded."""

    async def test_a_finished_jobs_lingering_feed_is_not_read(self, make_bus: MakeBus) -> None:
        """Drained and left: the feed lingers, and no reader names its stream."""
        publisher, reader = make_bus(), make_bus()
        job_id = uuid.uuid4().hex
        await publisher.open(job_id)
        await publisher.publish(job_id, InsightEvent("only"))
        await publisher.close(job_id)
        async with reader.subscribe(job_id) as sub:
            assert (await sub.next_batch(PROMPT_S)).events
            assert (await sub.next_batch(PROMPT_S)).ended
        assert reader.feeds.count == 1
        assert reader.feeds.followed == 0
        assert reader.feeds.readers == 0

    async def test_a_finished_job_discarded_elsewhere_is_not_found(self, make_bus: MakeBus) -> None:
        """A finished job's feed lingers here, the publisher discards it: JobNotFound here."""
        publisher, reader = make_bus(), make_bus()
        job_id = uuid.uuid4().hex
        await publisher.open(job_id)
        await publisher.publish(job_id, InsightEvent("only"))
        await publisher.close(job_id)
        async with reader.subscribe(job_id) as sub:
            assert (await sub.next_batch(PROMPT_S)).events
        await publisher.discard(job_id)
        with pytest.raises(JobNotFound):
            async with reader.subscribe(job_id):
                pass
        assert reader.feeds.count == 0


class TestFeedBudget:
    """The feeds of one instance stay within ``feeds_bytes``: lingering ones go first."""

    async def test_lingering_feeds_go_oldest_first_and_a_feed_in_use_stays(
        self, make_bus: MakeBus
    ) -> None:
        """Ten finished jobs read past a budget of about four: the newest stay, the held one too."""
        publisher = make_bus()
        ids = [uuid.uuid4().hex for _ in range(10)]
        sizes = []
        for job_id in ids:
            await publisher.open(job_id)
            encoded = await publisher.publish(job_id, InsightEvent("x" * 4_000))
            await publisher.close(job_id)
            sizes.append(FEED_OVERHEAD_BYTES + event_cost(encoded))
        budget = 4 * max(sizes) + max(sizes) // 2
        reader = make_bus(feeds_bytes=budget)
        async with reader.subscribe(ids[0]) as held:
            assert (await held.next_batch(PROMPT_S)).events
            for job_id in ids[1:]:
                async with reader.subscribe(job_id) as sub:
                    assert (await sub.next_batch(PROMPT_S)).events
                assert reader.feeds.bytes <= budget
            assert (await held.next_batch(PROMPT_S)).ended
            assert ids[0] in reader.feeds  # in use: never dropped
            assert ids[1] not in reader.feeds  # the oldest lingering one went first
            assert ids[-1] in reader.feeds
        assert reader.feeds.count <= 5
        assert reader.feeds.bytes <= budget
