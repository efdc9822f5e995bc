"""The producer-state store seam: one suite, run unchanged against memory and Redis.

What the publish API relies on: a job's state is read back as stored, its lock lets one
holder in at a time (on Redis across store objects, as across instances), a save is a
compare-and-set on ``producer_seq``, and the silence sweep finds exactly the open jobs
whose producer has been quiet.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import attrs
import pytest
from redis.asyncio import Redis

from app.core.errors import ProducerBusy
from app.jobs import producers as producers_module
from app.jobs import redis_producers
from app.jobs.producers import MemoryProducerStore, ProducerState, ProducerStore
from app.jobs.redis_producers import RedisProducerStore
from tests.support.redis import RedisServer

#: Makes a store; a second call makes another one sharing the first's data (another
#: instance's, on Redis; the same object in memory, where there is one instance).
StoreFactory = Callable[[], ProducerStore]


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Store factories for the parametrised implementation."""
    if request.param == "memory":
        store = MemoryProducerStore()
        yield lambda: store
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{secrets.token_hex(4)}:"
    clients: list[Redis] = []

    def make() -> ProducerStore:
        client = Redis.from_url(server.url)
        clients.append(client)
        return RedisProducerStore(client, job_ttl_s=60, prefix=prefix)

    yield make
    for client in clients:
        await client.aclose()


def state(**changes: object) -> ProducerState:
    return attrs.evolve(ProducerState(token_hash="ab" * 32, last_publish_at=time.time()), **changes)


class TestState:
    """A job's state is stored and read back whole."""

    async def test_created_state_reads_back_and_unknown_jobs_are_none(
        self, stores: StoreFactory
    ) -> None:
        """create then load: equal; a job never created: None."""
        store = stores()
        created = state(emitter={"started": False, "steps": ["a", "b"]}, bucket=10.0)
        await store.create("job-1", created)
        assert await store.load("job-1") == created
        assert await store.load("job-2") is None

    async def test_a_save_is_a_compare_and_set_on_producer_seq(self, stores: StoreFactory) -> None:
        """Saving from the seq stored succeeds; from any other, ProducerBusy, state kept."""
        store = stores()
        await store.create("job", state())
        async with store.locked("job"):
            await store.save("job", state(producer_seq=1, last_event_id=4), expected_seq=0)
        async with store.locked("job"):
            with pytest.raises(ProducerBusy):
                await store.save("job", state(producer_seq=2), expected_seq=0)
        loaded = await store.load("job")
        assert loaded is not None
        assert (loaded.producer_seq, loaded.last_event_id) == (1, 4)


class TestLock:
    """One holder per job at a time, on every instance."""

    async def test_holders_of_one_job_take_turns_and_other_jobs_do_not_wait(
        self, stores: StoreFactory
    ) -> None:
        """A second holder of job A waits for the first; job B's holder does not."""
        store, other = stores(), stores()
        order: list[str] = []
        first_in = asyncio.Event()

        async def first() -> None:
            async with store.locked("A"):
                first_in.set()
                await asyncio.sleep(0.2)
                order.append("first out")

        async def second() -> None:
            await first_in.wait()
            async with other.locked("A"):
                order.append("second in")

        async def unrelated() -> None:
            await first_in.wait()
            async with other.locked("B"):
                order.append("B in")

        await asyncio.gather(first(), second(), unrelated())
        assert order == ["B in", "first out", "second in"]

    async def test_concurrent_read_modify_writes_lose_no_update(self, stores: StoreFactory) -> None:
        """Forty increments of producer_seq from two store objects at once: 40."""
        store, other = stores(), stores()
        await store.create("job", state())

        async def increment(on: ProducerStore) -> None:
            async with on.locked("job"):
                current = await on.load("job")
                assert current is not None
                await asyncio.sleep(0)
                bumped = attrs.evolve(current, producer_seq=current.producer_seq + 1)
                await on.save("job", bumped, expected_seq=current.producer_seq)

        await asyncio.gather(*(increment(store if i % 2 else other) for i in range(40)))
        final = await store.load("job")
        assert final is not None
        assert final.producer_seq == 40

    async def test_a_lock_held_too_long_is_producer_busy(
        self, stores: StoreFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A waiter gives up with ProducerBusy after LOCK_WAIT_S."""
        monkeypatch.setattr(producers_module, "LOCK_WAIT_S", 0.2)
        monkeypatch.setattr(redis_producers, "LOCK_WAIT_S", 0.2)
        store, other = stores(), stores()
        async with store.locked("job"):
            started = time.monotonic()
            with pytest.raises(ProducerBusy):
                async with other.locked("job"):
                    pass
            assert 0.15 < time.monotonic() - started < 2.0


class TestSilence:
    """The sweep's view: open jobs whose producer has been quiet since a cutoff."""

    async def test_silent_open_jobs_are_found_and_finished_ones_are_not(
        self, stores: StoreFactory
    ) -> None:
        """Quiet and open: listed; quiet but ended, or recent: not; statuses as saved."""
        store = stores()
        now = time.time()
        await store.create("quiet", state(last_publish_at=now - 30))
        await store.create("ended", state(last_publish_at=now - 30))
        await store.create("recent", state(last_publish_at=now))
        async with store.locked("ended"):
            await store.save(
                "ended", state(status="cancelled", last_publish_at=now - 30), expected_seq=0
            )
        assert await store.silent_since(now - 10) == ["quiet"]
        statuses = await store.statuses(["quiet", "ended", "recent", "missing"])
        assert statuses == {"quiet": None, "ended": "cancelled", "recent": None}

    async def test_a_publish_moves_a_job_out_of_the_silent_ones(self, stores: StoreFactory) -> None:
        """A save with a new last publish time: no longer silent."""
        store = stores()
        now = time.time()
        await store.create("job", state(last_publish_at=now - 30))
        assert await store.silent_since(now - 10) == ["job"]
        async with store.locked("job"):
            await store.save("job", state(producer_seq=1, last_publish_at=now), expected_seq=0)
        assert await store.silent_since(now - 10) == []


class TestRedisOnly:
    """What only the shared store has to handle: holders that die, states that expire."""

    async def test_the_lock_of_a_holder_that_died_expires(self, redis_server: RedisServer) -> None:
        """A lock left by a dead instance (its key still set) is taken once it expires."""
        client = Redis.from_url(redis_server.url)
        try:
            prefix = f"test:{secrets.token_hex(4)}:"
            store = RedisProducerStore(client, prefix=prefix)
            await client.set(f"{prefix}job:j:producer:lock", b"dead", px=300)
            started = time.monotonic()
            async with store.locked("j"):
                waited = time.monotonic() - started
            assert 0.2 < waited < 2.0
        finally:
            await client.aclose()

    async def test_a_save_without_the_lock_is_refused(self, redis_server: RedisServer) -> None:
        """A save by a holder whose lock is gone (expired, taken over) changes nothing."""
        client = Redis.from_url(redis_server.url)
        try:
            prefix = f"test:{secrets.token_hex(4)}:"
            store = RedisProducerStore(client, prefix=prefix)
            await store.create("j", state())
            async with store.locked("j"):
                await client.delete(f"{prefix}job:j:producer:lock")  # lost: expired
                with pytest.raises(ProducerBusy):
                    await store.save("j", state(producer_seq=1), expected_seq=0)
            loaded = await store.load("j")
            assert loaded is not None
            assert loaded.producer_seq == 0
        finally:
            await client.aclose()
