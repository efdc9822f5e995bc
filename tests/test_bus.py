"""Tests for the EventBus protocol (app/bus/), written against the protocol only.

Every test gets its bus from the parametrized ``make_bus``/``bus`` fixtures, so another
implementation is added by registering one more factory in BUS_FACTORIES (or, when it
needs a server such as redis-server, in SERVER_BUS_FACTORIES);
the tests themselves must not change. Job ids are unique per test so a shared backend
cannot leak state between tests. Waits use generous timeouts so a networked bus passes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import attrs
import orjson
import pytest

from app.bus import EventBus, MemoryEventBus, Subscription
from app.bus.local import EVENT_OVERHEAD_BYTES, event_cost
from app.bus.redis import RedisEventBus
from app.bus.redis_client import connect_redis
from app.core.errors import HistoryTruncated, JobNotFound, SubscriberLagged
from app.core.events import AnyEvent, EncodedEvent, InsightEvent
from tests.support.redis import RedisServer

# --- fixtures ----------------------------------------------------------------------


class BusFactory(Protocol):
    def __call__(
        self, *, history_limit: int, queue_limit: int, history_bytes: int
    ) -> Awaitable[EventBus]: ...


async def _memory_bus(*, history_limit: int, queue_limit: int, history_bytes: int) -> EventBus:
    return MemoryEventBus(
        history_limit=history_limit, queue_limit=queue_limit, history_bytes=history_bytes
    )


def _redis_bus(server: RedisServer) -> BusFactory:
    """Buses on the session's throw-away redis-server, each under its own key prefix."""

    async def make(*, history_limit: int, queue_limit: int, history_bytes: int) -> EventBus:
        return RedisEventBus(
            connect_redis(server.url),
            history_limit=history_limit,
            queue_limit=queue_limit,
            history_bytes=history_bytes,
            prefix=f"test-{uuid.uuid4().hex}:",
            owns_client=True,
        )

    return make


@attrs.define
class _TwoInstances:
    """Two Redis buses on one server and prefix: one publishes, the other subscribes.

    Every event a subscriber gets has then gone through Redis and the reading instance's
    reader (none is appended locally), as when a browser watches from another instance.
    """

    publisher: RedisEventBus
    reader: RedisEventBus

    async def open(self, job_id: str) -> None:
        await self.publisher.open(job_id)

    async def publish(self, job_id: str, event: AnyEvent) -> EncodedEvent:
        return await self.publisher.publish(job_id, event)

    async def close(self, job_id: str) -> None:
        await self.publisher.close(job_id)

    def subscribe(self, job_id: str, after_seq: int = 0) -> Subscription:
        return self.reader.subscribe(job_id, after_seq)

    async def last_seq(self, job_id: str) -> int:
        return await self.reader.last_seq(job_id)

    async def discard(self, job_id: str) -> None:
        await self.publisher.discard(job_id)

    def subscriber_count(self, job_id: str) -> int:
        return self.reader.subscriber_count(job_id)

    async def aclose(self) -> None:
        await self.publisher.aclose()
        await self.reader.aclose()


def _redis_two_instances(server: RedisServer) -> BusFactory:
    """A publishing and a subscribing instance sharing the session's redis-server."""
    one_instance = _redis_bus(server)

    async def make(*, history_limit: int, queue_limit: int, history_bytes: int) -> EventBus:
        publisher = await one_instance(
            history_limit=history_limit, queue_limit=queue_limit, history_bytes=history_bytes
        )
        assert isinstance(publisher, RedisEventBus)
        reader = RedisEventBus(
            connect_redis(server.url),
            history_limit=history_limit,
            queue_limit=queue_limit,
            history_bytes=history_bytes,
            prefix=publisher.prefix,
            owns_client=True,
        )
        return _TwoInstances(publisher, reader)

    return make


#: One factory per EventBus implementation; each builds a bus with the given limits.
BUS_FACTORIES: dict[str, BusFactory] = {"memory": _memory_bus}
#: Implementations that need a server: the server's fixture, and the factory given it.
SERVER_BUS_FACTORIES: dict[str, tuple[str, Callable[[RedisServer], BusFactory]]] = {
    "redis": ("redis_server", _redis_bus),
    "redis-two-instances": ("redis_server", _redis_two_instances),
}

DEFAULT_HISTORY = 10_000
DEFAULT_QUEUE = 1_000
DEFAULT_HISTORY_BYTES = 4 << 20
WAIT_S = 5.0  # upper bound on any single wait; never reached when the bus works

MakeBus = Callable[..., Awaitable[EventBus]]


@pytest.fixture(params=sorted([*BUS_FACTORIES, *SERVER_BUS_FACTORIES]))
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[MakeBus]:
    """Build buses of the parametrized kind with chosen limits; closed after the test."""
    if request.param in SERVER_BUS_FACTORIES:
        fixture, build = SERVER_BUS_FACTORIES[request.param]
        # Skips (or fails under FLUSHLINE_REQUIRE_INTEGRATION=1) without the server.
        factory = build(request.getfixturevalue(fixture))
    else:
        factory = BUS_FACTORIES[request.param]
    made: list[EventBus] = []

    async def make(
        *,
        history_limit: int = DEFAULT_HISTORY,
        queue_limit: int = DEFAULT_QUEUE,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
    ) -> EventBus:
        bus = await factory(
            history_limit=history_limit, queue_limit=queue_limit, history_bytes=history_bytes
        )
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.aclose()


@pytest.fixture
async def bus(make_bus: MakeBus) -> EventBus:
    """A bus of the parametrized kind with default limits."""
    return await make_bus()


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


# --- helpers -----------------------------------------------------------------------


def event(i: int) -> InsightEvent:
    return InsightEvent(text=f"event {i}")


async def publish_n(bus: EventBus, job_id: str, n: int, start: int = 1) -> list[EncodedEvent]:
    return [await bus.publish(job_id, event(i)) for i in range(start, start + n)]


async def publish_paced(bus: EventBus, job_id: str, n: int, start: int = 1) -> list[EncodedEvent]:
    """Publish n events, yielding to the loop between them like a real producer."""
    out = []
    for i in range(start, start + n):
        out.append(await bus.publish(job_id, event(i)))
        await asyncio.sleep(0.001)
    return out


async def drain(sub: Subscription, timeout_s: float = WAIT_S) -> list[EncodedEvent]:
    """Read batches until the subscription ends; fail if it does not within timeout_s."""
    out: list[EncodedEvent] = []
    async with asyncio.timeout(timeout_s):
        while True:
            batch = await sub.next_batch(timeout_s)
            out.extend(batch.events)
            if batch.ended:
                return out


async def read_n(sub: Subscription, n: int) -> list[EncodedEvent]:
    """Read exactly until n events have arrived (fails on end or timeout)."""
    out: list[EncodedEvent] = []
    async with asyncio.timeout(WAIT_S):
        while len(out) < n:
            batch = await sub.next_batch(WAIT_S)
            assert not batch.ended, f"ended after {len(out)} of {n} events"
            out.extend(batch.events)
    return out


async def eventually(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Wait until predicate() holds (an asynchronous bus may take a moment)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def seqs(events: list[EncodedEvent]) -> list[int]:
    return [e.seq for e in events]


# --- publish -----------------------------------------------------------------------


class TestPublish:
    async def test_seq_starts_at_1_and_increments_per_job(self, bus: EventBus) -> None:
        """publish assigns 1, 2, 3... independently for each job."""
        a, b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
        await bus.open(a)
        await bus.open(b)
        assert await bus.last_seq(a) == 0
        got_a = [(await bus.publish(a, event(i))).seq for i in range(5)]
        got_b = [(await bus.publish(b, event(i))).seq for i in range(3)]
        assert got_a == [1, 2, 3, 4, 5]
        assert got_b == [1, 2, 3]
        assert (await bus.last_seq(a), await bus.last_seq(b)) == (5, 3)

    async def test_published_frame_is_the_contract_event_frame(
        self, bus: EventBus, job_id: str
    ) -> None:
        """The encoded frame has id/event/data lines and data with type, job_id, seq, ts."""
        await bus.open(job_id)
        before = time.time()
        published = await bus.publish(job_id, InsightEvent(text="Tailoring summary..."))
        after = time.time()
        lines = published.frame.split(b"\n")
        assert lines[0] == b"id: 1"
        assert lines[1] == b"event: insight"
        assert lines[2].startswith(b"data: ")
        assert published.frame.endswith(b"\n\n")
        data = orjson.loads(lines[2].removeprefix(b"data: "))
        assert data["type"] == "insight"
        assert data["job_id"] == job_id
        assert data["seq"] == 1
        assert data["text"] == "Tailoring summary..."
        assert before - 1 <= data["ts"] <= after + 1

    async def test_every_subscriber_gets_the_same_encoding(
        self, bus: EventBus, job_id: str
    ) -> None:
        """Events are encoded once: all subscribers get equal frames with one shared ts."""
        await bus.open(job_id)
        async with bus.subscribe(job_id) as s1, bus.subscribe(job_id) as s2:
            published = await publish_n(bus, job_id, 5)
            await bus.close(job_id)
            got1, got2 = await drain(s1), await drain(s2)
        assert seqs(got1) == seqs(got2) == [1, 2, 3, 4, 5]
        for p, e1, e2 in zip(published, got1, got2, strict=True):
            assert e1.frame == e2.frame == p.frame
            assert e1.payload == e2.payload == p.payload
            assert e1.ts == e2.ts == p.ts  # one stamp, so one encoding

    async def test_late_subscriber_gets_the_same_bytes_as_live_ones(
        self, bus: EventBus, job_id: str
    ) -> None:
        """A replay delivers the very frames that live subscribers received."""
        await bus.open(job_id)
        async with bus.subscribe(job_id) as live:
            published = await publish_n(bus, job_id, 4)
            live_got = await read_n(live, 4)
        async with bus.subscribe(job_id) as late:
            late_got = await read_n(late, 4)
        assert [e.frame for e in late_got] == [e.frame for e in live_got]
        assert [e.frame for e in late_got] == [e.frame for e in published]


# --- replay and live ---------------------------------------------------------------


class TestReplay:
    async def test_subscribe_from_every_position_of_a_closed_log(
        self, bus: EventBus, job_id: str
    ) -> None:
        """From each after_seq 0..n of a finished log: exactly the remainder, then ended."""
        n = 12
        await bus.open(job_id)
        published = await publish_n(bus, job_id, n)
        await bus.close(job_id)
        for after in range(n + 1):
            async with bus.subscribe(job_id, after) as sub:
                got = await drain(sub)
                assert [e.frame for e in got] == [e.frame for e in published[after:]]
                assert sub.last_seq == n
                again = await sub.next_batch(0.01)
                assert again.ended
                assert not again.events

    async def test_default_after_seq_is_whole_history(self, bus: EventBus, job_id: str) -> None:
        """subscribe() without after_seq replays from seq 1."""
        await bus.open(job_id)
        await publish_n(bus, job_id, 3)
        await bus.close(job_id)
        async with bus.subscribe(job_id) as sub:
            assert seqs(await drain(sub)) == [1, 2, 3]

    async def test_mid_stream_join_gets_history_then_live_without_gap(
        self, bus: EventBus, job_id: str
    ) -> None:
        """Joining a running job yields its history then live events, seamlessly."""
        await bus.open(job_id)
        await publish_n(bus, job_id, 10)
        async with bus.subscribe(job_id) as sub:
            history = await read_n(sub, 10)
            await publish_n(bus, job_id, 5, start=11)
            await bus.close(job_id)
            rest = await drain(sub)
        assert seqs(history + rest) == list(range(1, 16))

    async def test_publishing_during_replay_is_neither_lost_nor_repeated(
        self, bus: EventBus, job_id: str
    ) -> None:
        """Publishes interleaved with reading a long replay come after it, once each."""
        history = 700  # longer than one batch, so the replay takes several reads
        await bus.open(job_id)
        await publish_n(bus, job_id, history)
        got: list[EncodedEvent] = []
        next_i = history + 1
        async with bus.subscribe(job_id, 5) as sub:
            async with asyncio.timeout(WAIT_S):
                while len(got) < history - 5 + 40:
                    batch = await sub.next_batch(WAIT_S)
                    got.extend(batch.events)
                    if next_i <= history + 40:
                        for _ in range(min(3, history + 41 - next_i)):
                            await bus.publish(job_id, event(next_i))
                            next_i += 1
            await bus.close(job_id)
            got.extend(await drain(sub))
        assert seqs(got) == list(range(6, history + 41))
        assert [orjson.loads(e.payload)["text"] for e in got][-1] == f"event {history + 40}"

    async def test_resume_from_the_newest_seq_gets_only_new_events(
        self, bus: EventBus, job_id: str
    ) -> None:
        """after_seq == last_seq delivers nothing old, only what is published next."""
        await bus.open(job_id)
        await publish_n(bus, job_id, 4)
        async with bus.subscribe(job_id, await bus.last_seq(job_id)) as sub:
            await publish_n(bus, job_id, 2, start=5)
            await bus.close(job_id)
            assert seqs(await drain(sub)) == [5, 6]

    async def test_fifty_concurrent_subscribers_see_identical_sequences(
        self, bus: EventBus, job_id: str
    ) -> None:
        """50 subscribers joining at different moments all get seq 1..n exactly once."""
        n = 200
        await bus.open(job_id)

        async def watch() -> list[EncodedEvent]:
            async with bus.subscribe(job_id) as sub:
                return await drain(sub)

        watchers: list[asyncio.Task[list[EncodedEvent]]] = []
        async with asyncio.TaskGroup() as tg:
            for i in range(1, n + 1):
                if i % 5 == 1:  # join at many different points of the stream
                    watchers.append(tg.create_task(watch()))
                await bus.publish(job_id, event(i))
                if i % 7 == 0:
                    await asyncio.sleep(0)
            while len(watchers) < 50:
                watchers.append(tg.create_task(watch()))
            await bus.close(job_id)
        results = [w.result() for w in watchers]
        assert len(results) == 50
        want = list(range(1, n + 1))
        for got in results:
            assert seqs(got) == want
        frames = [e.frame for e in results[0]]
        assert all([e.frame for e in got] == frames for got in results)


# --- slow subscribers --------------------------------------------------------------


class TestBackpressure:
    async def test_stalled_subscriber_is_cut_off_others_unaffected(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """Past queue_limit pending live events a never-reading subscriber is cut off alone."""
        limit = 8
        bus = await make_bus(queue_limit=limit)
        await bus.open(job_id)
        cuts: list[str] = []
        async with bus.subscribe(job_id) as stalled, bus.subscribe(job_id) as reader:
            stalled.on_cut(lambda: cuts.append("cut"))
            reading = asyncio.create_task(drain(reader))

            await publish_paced(bus, job_id, limit)  # exactly queue_limit pending: still fine
            await asyncio.sleep(0.05)
            assert not stalled.cut
            assert cuts == []

            await publish_paced(bus, job_id, 3 * limit, start=limit + 1)
            await eventually(lambda: stalled.cut)
            assert cuts == ["cut"]  # callback ran, and only once
            with pytest.raises(SubscriberLagged):
                await stalled.next_batch(WAIT_S)
            with pytest.raises(SubscriberLagged):
                await stalled.next_batch(0)

            more = await publish_paced(bus, job_id, 5, start=4 * limit + 1)
            assert seqs(more) == list(range(4 * limit + 1, 4 * limit + 6))
            await bus.close(job_id)
            got = await reading
        assert not reader.cut
        assert seqs(got) == list(range(1, 4 * limit + 6))
        assert cuts == ["cut"]

    async def test_on_cut_registered_after_the_cut_runs_at_once(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """A callback registered on an already cut subscriber still runs."""
        bus = await make_bus(queue_limit=2)
        await bus.open(job_id)
        async with bus.subscribe(job_id) as stalled:
            await publish_n(bus, job_id, 5)
            await eventually(lambda: stalled.cut)
            ran: list[bool] = []
            stalled.on_cut(lambda: ran.append(True))
            await eventually(lambda: ran == [True])

    async def test_reading_subscriber_survives_bursts_larger_than_queue(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """A subscriber that keeps reading is never cut, however many events flow."""
        limit = 8
        bus = await make_bus(queue_limit=limit)
        await bus.open(job_id)
        got: list[EncodedEvent] = []
        async with bus.subscribe(job_id) as sub:
            for burst in range(20):
                await publish_n(bus, job_id, limit // 2, start=burst * (limit // 2) + 1)
                got.extend(await read_n(sub, limit // 2))
            await bus.close(job_id)
            got.extend(await drain(sub))
            assert not sub.cut
        assert seqs(got) == list(range(1, 20 * (limit // 2) + 1))

    async def test_long_history_alone_does_not_cut_a_reading_subscriber(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """Joining with history far beyond queue_limit and reading it is not lagging."""
        limit = 8
        bus = await make_bus(queue_limit=limit)
        await bus.open(job_id)
        await publish_n(bus, job_id, 50 * limit)
        async with bus.subscribe(job_id) as sub:
            first = await sub.next_batch(WAIT_S)
            await publish_n(bus, job_id, limit - 1, start=50 * limit + 1)  # live, under limit
            await bus.close(job_id)
            rest = await drain(sub)
            assert not sub.cut
        assert seqs([*first.events, *rest]) == list(range(1, 51 * limit))


# --- history limit -----------------------------------------------------------------


class TestHistoryLimit:
    async def test_resume_before_the_window_raises_history_truncated(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """Once history is trimmed, resuming from a seq before it raises."""
        limit = 20
        bus = await make_bus(history_limit=limit)
        await bus.open(job_id)
        await publish_n(bus, job_id, 5 * limit)
        await bus.close(job_id)
        for after in (1, 3 * limit):
            with pytest.raises(HistoryTruncated):
                async with bus.subscribe(job_id, after):
                    pass
        assert bus.subscriber_count(job_id) == 0

    async def test_a_new_subscriber_gets_the_kept_history(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """Subscribing from 0 (no resume point) after trimming starts at the oldest kept event."""
        limit = 20
        bus = await make_bus(history_limit=limit)
        await bus.open(job_id)
        await publish_n(bus, job_id, 5 * limit)
        await bus.close(job_id)
        async with bus.subscribe(job_id, 0) as sub:
            got = seqs(await drain(sub))
        assert got == list(range(got[0], 5 * limit + 1))
        assert 5 * limit - limit < got[0] <= 5 * limit - limit // 2

    async def test_resume_inside_the_window_still_works(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """A resume point within the retained window gets exactly the remainder."""
        limit = 20
        bus = await make_bus(history_limit=limit)
        await bus.open(job_id)
        await publish_n(bus, job_id, 5 * limit)
        await bus.close(job_id)
        after = 5 * limit - limit // 2
        async with bus.subscribe(job_id, after) as sub:
            assert seqs(await drain(sub)) == list(range(after + 1, 5 * limit + 1))

    async def test_unread_events_trimmed_away_cut_the_subscriber_instead_of_a_gap(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """If history trimming drops events a subscriber has not read, it is cut, never skipped."""
        bus = await make_bus(history_limit=10, queue_limit=1_000)
        await bus.open(job_id)
        async with bus.subscribe(job_id) as sub:
            await publish_n(bus, job_id, 50)
            with pytest.raises(SubscriberLagged):
                await read_n(sub, 50)
            assert sub.cut

    async def test_live_subscriber_is_unaffected_by_trimming(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """A subscriber keeping up gets every event even as old history is dropped."""
        limit = 10
        bus = await make_bus(history_limit=limit)
        await bus.open(job_id)
        got: list[EncodedEvent] = []
        async with bus.subscribe(job_id) as sub:
            for i in range(1, 101):
                await bus.publish(job_id, event(i))
                if i % 3 == 0:
                    got.extend(await read_n(sub, i - len(got)))
            await bus.close(job_id)
            got.extend(await drain(sub))
        assert seqs(got) == list(range(1, 101))


class TestHistoryBytes:
    """The per-job byte budget: each event costs its frame plus EVENT_OVERHEAD_BYTES."""

    #: Events alike in size (``event 100`` to ``event 999``), so the window is easy to bound.
    FIRST = 100
    COUNT = 200
    #: About 20 events' worth.
    BUDGET = 20 * (EVENT_OVERHEAD_BYTES + 110)

    async def publish_all(self, bus: EventBus, job_id: str) -> list[EncodedEvent]:
        await bus.open(job_id)
        published = await publish_n(bus, job_id, self.COUNT, start=self.FIRST)
        await bus.close(job_id)
        return published

    async def test_the_oldest_events_go_past_the_byte_budget(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """A new subscriber gets a contiguous newest window that fits the byte budget."""
        bus = await make_bus(history_bytes=self.BUDGET)
        published = await self.publish_all(bus, job_id)
        async with bus.subscribe(job_id, 0) as sub:
            kept = await drain(sub)
        assert seqs(kept) == list(range(kept[0].seq, self.COUNT + 1))
        kept_bytes = sum(event_cost(e) for e in kept)
        assert kept_bytes <= self.BUDGET
        # Trimmed to at most nine tenths of the budget at a time, never further.
        biggest = max(event_cost(e) for e in published)
        assert kept_bytes > self.BUDGET - self.BUDGET // 10 - biggest
        assert [e.frame for e in kept] == [e.frame for e in published[-len(kept) :]]

    async def test_resume_before_the_byte_window_raises_history_truncated(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """Resuming before the oldest event the byte budget kept is HistoryTruncated (410)."""
        bus = await make_bus(history_bytes=self.BUDGET)
        await self.publish_all(bus, job_id)
        async with bus.subscribe(job_id, 0) as sub:
            first = (await drain(sub))[0].seq
        assert first > 1
        for after in (1, first - 2):
            with pytest.raises(HistoryTruncated):
                async with bus.subscribe(job_id, after):
                    pass
        async with bus.subscribe(job_id, first - 1) as sub:
            assert seqs(await drain(sub)) == list(range(first, self.COUNT + 1))

    async def test_an_event_larger_than_the_budget_is_still_kept(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """The newest event stays even alone past the budget: a subscriber still gets it."""
        bus = await make_bus(history_bytes=4096)
        await bus.open(job_id)
        await publish_n(bus, job_id, 5)
        big = await bus.publish(job_id, InsightEvent(text="x" * 10_000))
        await bus.close(job_id)
        async with bus.subscribe(job_id, 0) as sub:
            assert [e.frame for e in await drain(sub)] == [big.frame]

    async def test_unread_events_trimmed_by_bytes_cut_the_subscriber(
        self, make_bus: MakeBus, job_id: str
    ) -> None:
        """A subscriber whose unread events the byte budget dropped is cut off, never skipped."""
        bus = await make_bus(history_bytes=self.BUDGET, queue_limit=1_000)
        await bus.open(job_id)
        async with bus.subscribe(job_id) as sub:
            await publish_n(bus, job_id, self.COUNT, start=self.FIRST)
            with pytest.raises(SubscriberLagged):
                await read_n(sub, self.COUNT)
            assert sub.cut


class TestRedisHistoryBytes:
    """Redis itself keeps a job's stream within the byte budget (exact XADD MINID)."""

    async def test_the_stream_in_redis_fits_the_budget(self, redis_server: RedisServer) -> None:
        """After 300 events, the stream holds the newest ones, within the budget, nothing else."""
        budget = 20 * (EVENT_OVERHEAD_BYTES + 110)
        bus = RedisEventBus(
            connect_redis(redis_server.url),
            history_bytes=budget,
            prefix=f"test-{uuid.uuid4().hex}:",
            owns_client=True,
        )
        job_id = f"job-{uuid.uuid4().hex}"
        try:
            await bus.open(job_id)
            published = await publish_n(bus, job_id, 300, start=100)
            entries = await bus.redis.xrange(bus.key(job_id))
        finally:
            await bus.aclose()
        ids = [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]
        assert ids == list(range(ids[0], 301))
        stored = sum(len(fields[b"f"]) + EVENT_OVERHEAD_BYTES for _, fields in entries)
        assert stored <= budget
        # Exact: one more event would not have fitted.
        assert stored + event_cost(published[ids[0] - 2]) > budget


# --- lifecycle ---------------------------------------------------------------------


class TestLifecycle:
    async def test_unknown_job_raises_job_not_found(self, bus: EventBus) -> None:
        """Entering a subscription of a job that was never opened raises JobNotFound."""
        with pytest.raises(JobNotFound):
            async with bus.subscribe(f"missing-{uuid.uuid4().hex}"):
                pass

    async def test_next_batch_timeout_returns_empty_not_ended(
        self, bus: EventBus, job_id: str
    ) -> None:
        """With nothing to deliver, next_batch(t) returns an empty open batch after ~t."""
        await bus.open(job_id)
        async with bus.subscribe(job_id) as sub:
            started = time.monotonic()
            batch = await sub.next_batch(0.2)
            elapsed = time.monotonic() - started
        assert list(batch.events) == []
        assert not batch.ended
        assert 0.15 <= elapsed < 2.0

    async def test_waiting_subscriber_wakes_on_publish(self, bus: EventBus, job_id: str) -> None:
        """A subscriber blocked in next_batch(None) receives an event as soon as it is published."""
        await bus.open(job_id)
        async with bus.subscribe(job_id) as sub:
            waiting = asyncio.create_task(sub.next_batch(None))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await bus.publish(job_id, event(1))
            async with asyncio.timeout(WAIT_S):
                batch = await waiting
        assert seqs(list(batch.events)) == [1]

    async def test_close_ends_subscribers_after_the_last_event(
        self, bus: EventBus, job_id: str
    ) -> None:
        """close() lets waiting subscribers finish the remaining events, then end."""
        await bus.open(job_id)
        await publish_n(bus, job_id, 2)
        async with bus.subscribe(job_id) as a, bus.subscribe(job_id) as b:
            assert seqs(await read_n(a, 2)) == [1, 2]
            waiting = asyncio.create_task(drain(a))
            await asyncio.sleep(0.02)
            await publish_n(bus, job_id, 3, start=3)
            await bus.close(job_id)
            assert seqs(await waiting) == [3, 4, 5]
            assert seqs(await drain(b)) == [1, 2, 3, 4, 5]
            assert a.last_seq == b.last_seq == 5

    async def test_discard_ends_subscribers(self, bus: EventBus, job_id: str) -> None:
        """discard() ends live subscribers and forgets the job."""
        await bus.open(job_id)
        await publish_n(bus, job_id, 3)
        async with bus.subscribe(job_id) as sub:
            assert seqs(await read_n(sub, 3)) == [1, 2, 3]
            waiting = asyncio.create_task(drain(sub))
            await asyncio.sleep(0.02)
            await bus.discard(job_id)
            assert await waiting == []
        with pytest.raises(JobNotFound):
            async with bus.subscribe(job_id):
                pass

    async def test_subscriber_count_follows_enter_and_exit(
        self, bus: EventBus, job_id: str
    ) -> None:
        """subscriber_count rises on entering a subscription and falls on leaving it."""
        await bus.open(job_id)
        assert bus.subscriber_count(job_id) == 0
        s1 = bus.subscribe(job_id)
        assert bus.subscriber_count(job_id) == 0  # not counted until entered
        async with s1:
            assert bus.subscriber_count(job_id) == 1
            async with bus.subscribe(job_id):
                assert bus.subscriber_count(job_id) == 2
            assert bus.subscriber_count(job_id) == 1
        assert bus.subscriber_count(job_id) == 0

    async def test_subscriber_count_drops_when_body_raises(
        self, bus: EventBus, job_id: str
    ) -> None:
        """Leaving a subscription through an exception also unregisters it."""
        await bus.open(job_id)

        async def failing_body() -> None:
            async with bus.subscribe(job_id):
                assert bus.subscriber_count(job_id) == 1
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await failing_body()
        assert bus.subscriber_count(job_id) == 0

    async def test_last_seq_tracks_delivery(self, bus: EventBus, job_id: str) -> None:
        """Subscription.last_seq starts at after_seq and follows delivered events."""
        await bus.open(job_id)
        await publish_n(bus, job_id, 6)
        async with bus.subscribe(job_id, 2) as sub:
            assert sub.last_seq == 2
            got = await read_n(sub, 4)
            assert sub.last_seq == got[-1].seq == 6
