"""What the Redis bus costs Redis: commands per event, connections, idle cost, memory per job.

Run: ``python -m bench.redis_bus`` (about a minute; needs ``redis-server``, started here on a
free port, never the machine's own). Counts come from Redis itself (``INFO
commandstats`` after ``CONFIG RESETSTAT``), so they include every command any instance
sent, and the commands Lua scripts ran. Two bus instances share the server, as two
service processes would: A publishes, subscribers are split between A and B.

* publish: events published on A through the bus alone, with 0 to 1,000 subscribers, and
  the connections each instance holds meanwhile (its pool's and its readers');
* job: one demo job run by the real ``JobManager`` on A with the Redis bus and job store
  (each event is also folded into the job's snapshot), watched from A and B;
* idle: a job with watchers on both instances and nothing published for 3 s;
* many jobs: 5,000 finished jobs each read once on B (as a long-poll with ``wait_s=0``
  does: the snapshot, then the history) while a running job published on A is watched
  on B: B's connections, the commands that waited for one, and the running job's lag;
* lag: the memory bus (one instance) against the Redis bus (two), 1,000 subscribers;
* memory: ``MEMORY USAGE`` of a finished demo job's keys.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from app.bus import EventBus, MemoryEventBus
from app.bus.redis import RedisEventBus
from app.bus.redis_client import CountingPool, connect_redis
from app.core.events import InsightEvent
from app.jobs.manager import JobManager, JobRequest
from app.jobs.pipelines import DemoPipeline
from app.jobs.redis_store import RedisJobStore
from bench.common import print_table
from strategies import STRATEGIES, build_strategy
from tests.support.redis import find_redis_server, run_redis
from tests.support.redis_jobs import seed_finished_jobs

#: Commands of this bench's own measuring, left out of the counts.
ADMIN = {"config|resetstat", "info", "memory|usage", "ping", "dbsize"}
#: The demo job of the job and memory rows: 4 steps x 400 tokens, as fast as it goes.
JOB_OPTIONS = {"steps": 4, "tokens_per_step": 400, "tokens_per_second": 100_000, "seed": 7}


async def command_counts(admin: Redis) -> dict[str, int]:
    """Calls per command since the last reset, the bench's own left out."""
    stats: dict[str, Any] = await admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in ADMIN
    }


async def measure(admin: Redis, work: Callable[[], Awaitable[int]]) -> tuple[int, dict[str, int]]:
    """Run ``work`` (which returns how many events it published) between two counts."""
    await admin.config_resetstat()
    events = await work()
    await asyncio.sleep(0.2)  # let every reader's last read land
    return events, await command_counts(admin)


def per_event(counts: dict[str, int], events: int) -> str:
    parts = [f"{name} {calls / events:.2f}" for name, calls in sorted(counts.items()) if calls]
    return ", ".join(parts) or "none"


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds (subscribers have entered)."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


async def watch(bus: EventBus, job_id: str, lags_ms: list[float] | None = None) -> int:
    """Read the job to its end; ``lags_ms`` gets each event's arrival minus its ``ts``."""
    async with bus.subscribe(job_id) as sub:
        got = 0
        while True:
            batch = await sub.next_batch(None)
            if lags_ms is not None:
                now = time.time()
                lags_ms.extend((now - event.ts) * 1000 for event in batch.events)
            got += len(batch.events)
            if batch.ended:
                return got


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


async def lag_row(
    name: str, buses: tuple[EventBus, EventBus], watchers_each: int, events: int
) -> tuple[str, ...]:
    """Lag of ``events`` published on the first bus, watched on both, in bursts of 10."""
    a, b = buses
    job_id = uuid.uuid4().hex
    await a.open(job_id)
    lags: tuple[list[float], list[float]] = ([], [])
    watchers = [
        asyncio.create_task(watch(bus, job_id, side))
        for bus, side in zip(buses, lags, strict=True)
        for _ in range(watchers_each)
    ]
    await until(
        lambda: (
            a.subscriber_count(job_id) + b.subscriber_count(job_id) >= 2 * watchers_each
            if a is not b
            else a.subscriber_count(job_id) == 2 * watchers_each
        )
    )
    cpu = time.process_time()
    for i in range(events):
        await a.publish(job_id, InsightEvent(text=f"event {i} " + "x" * 200))
        # Yield after each event as a producer does (the memory bus would otherwise hand
        # a whole burst over in one wake-up), and pause after each burst of 10.
        await asyncio.sleep(0.005 if i % 10 == 9 else 0)
    await a.close(job_id)
    await asyncio.gather(*watchers)
    cpu_s = time.process_time() - cpu
    both = lags[0] + lags[1]
    return (
        name,
        str(len(both)),
        f"{percentile(lags[0], 50):.1f} / {percentile(lags[0], 99):.1f}",
        f"{percentile(lags[1], 50):.1f} / {percentile(lags[1], 99):.1f}",
        f"{percentile(both, 99):.1f}",
        f"{cpu_s / len(both) * 1e6:.1f}",
    )


def connections(bus: RedisEventBus) -> int:
    """The connections to Redis the instance of ``bus`` holds: its pool's and its readers'."""
    pool = bus.redis.connection_pool
    assert isinstance(pool, CountingPool)
    return pool.opened + bus.feeds.readers


async def publish_row(
    url: str, admin: Redis, on_a: int, on_b: int, events: int
) -> tuple[int, dict[str, int], int, tuple[int, int]]:
    a = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    b = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    job_id = uuid.uuid4().hex
    await a.open(job_id)
    watchers = [asyncio.create_task(watch(a, job_id)) for _ in range(on_a)]
    watchers += [asyncio.create_task(watch(b, job_id)) for _ in range(on_b)]
    await until(lambda: a.subscriber_count(job_id) == on_a and b.subscriber_count(job_id) == on_b)

    async def work() -> int:
        for i in range(events):
            await a.publish(job_id, InsightEvent(text=f"event {i} " + "x" * 200))
            if i % 10 == 9:
                await asyncio.sleep(0.001)  # a producer's pace: bursts of 10
        return events

    published, counts = await measure(admin, work)
    held = (connections(a), connections(b))
    await a.close(job_id)
    received = sum(await asyncio.gather(*watchers))
    await a.aclose()
    await b.aclose()
    return published, counts, received, held


def manager(bus: RedisEventBus, store: RedisJobStore) -> JobManager:
    return JobManager(
        bus=bus,
        store=store,
        pipelines={"demo": DemoPipeline()},
        strategies={name: build_strategy(name) for name in STRATEGIES},
    )


async def job_row(url: str, admin: Redis, watchers_each: int) -> tuple[int, dict[str, int], str]:
    client_a, client_b = connect_redis(url), connect_redis(url)
    a = RedisEventBus(client_a, prefix="bench:")
    b = RedisEventBus(client_b, prefix="bench:")
    store = RedisJobStore(client_a, prefix="bench:")
    jobs = manager(a, store)
    job_id = ""

    async def work() -> int:
        nonlocal job_id
        job = await jobs.create(JobRequest("demo", "aligned", options=JOB_OPTIONS))
        job_id = job.id
        watchers = [
            asyncio.create_task(watch(bus, job_id)) for bus in (a, b) for _ in range(watchers_each)
        ]
        got = await asyncio.gather(*watchers)
        assert len(set(got)) == 1, got
        return got[0]

    events, counts = await measure(admin, work)
    await a.aclose()
    await b.aclose()
    await client_a.aclose()
    await client_b.aclose()
    return events, counts, job_id


async def idle_row(url: str, admin: Redis, idle_s: float) -> dict[str, int]:
    a = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    b = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    job_id = uuid.uuid4().hex
    await a.open(job_id)
    await a.publish(job_id, InsightEvent(text="started"))
    watchers = [asyncio.create_task(watch(bus, job_id)) for bus in (a, b) for _ in range(100)]
    await until(lambda: a.subscriber_count(job_id) == b.subscriber_count(job_id) == 100)
    await asyncio.sleep(0.2)
    await admin.config_resetstat()
    await asyncio.sleep(idle_s)
    counts = await command_counts(admin)
    await a.close(job_id)
    await asyncio.gather(*watchers)
    await a.aclose()
    await b.aclose()
    return counts


#: Reads of finished jobs in flight at once in the many-jobs rows, and how many jobs.
POLLS_IN_FLIGHT = 32
FINISHED_JOBS = 5_000


async def print_many_jobs(url: str, admin: Redis) -> None:
    print(
        f"\n## many jobs: {FINISHED_JOBS:,} finished jobs each read once on B"
        f" ({POLLS_IN_FLIGHT} at a time), a running job published on A (an event every"
        " 50 ms) watched on B\n"
    )
    print_table(["what", "value"], await many_jobs_rows(url, admin, FINISHED_JOBS))


async def many_jobs_rows(url: str, admin: Redis, finished: int) -> list[tuple[str, object]]:
    """B reads ``finished`` finished jobs once each while watching a running job of A's."""
    ids = await seed_finished_jobs(admin, finished, prefix="bench:")
    a = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    b_client = connect_redis(url)
    b = RedisEventBus(b_client, owns_client=True, prefix="bench:")
    b_store = RedisJobStore(b_client, prefix="bench:")
    b.feed_linger_s = 600.0  # every feed stays: all the reads as if within 10 s
    running = uuid.uuid4().hex
    await a.open(running)
    lags: list[tuple[float, float]] = []  # (arrival, lag ms)
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            await a.publish(running, InsightEvent(text=f"event {i}"))
            i += 1
            await asyncio.sleep(0.05)
        await a.close(running)

    async def follow() -> None:
        async with b.subscribe(running) as sub:
            while not (batch := await sub.next_batch(None)).ended:
                now = time.time()
                lags.extend((now, (now - e.ts) * 1000) for e in batch.events)

    async def read_once(job_id: str, gate: asyncio.Semaphore) -> None:
        async with gate:
            await b_store.get(job_id)
            async with b.subscribe(job_id) as sub:
                batch = await sub.next_batch(0)
                assert len(batch.events) == 2, batch

    delays: list[tuple[float, float]] = []  # (when, how late a 10 ms sleep woke, ms)

    async def tick() -> None:
        while not stop.is_set():
            started = time.monotonic()
            await asyncio.sleep(0.01)
            delays.append((time.time(), (time.monotonic() - started - 0.01) * 1000))

    ticker = asyncio.create_task(tick())
    watcher = asyncio.create_task(follow())
    publisher = asyncio.create_task(publish())
    await asyncio.sleep(2.0)
    before = connections(b)
    names_before = len(await admin.client_list())
    burst_from = time.time()
    gate = asyncio.Semaphore(POLLS_IN_FLIGHT)
    await asyncio.gather(*(read_once(job_id, gate) for job_id in ids))
    burst_to = time.time()
    names_after = len(await admin.client_list())
    after = connections(b)
    feeds, feed_bytes = b.feeds.count, b.feeds.bytes
    stop.set()
    await publisher
    await watcher
    await ticker
    loop_busy = [delay for at, delay in delays if burst_from <= at < burst_to]
    pool = b_client.connection_pool
    assert isinstance(pool, CountingPool)
    quiet = [lag for at, lag in lags if at < burst_from]
    busy = [lag for at, lag in lags if burst_from <= at < burst_to]
    await a.aclose()
    await b.aclose()
    return [
        ("reads, s", f"{burst_to - burst_from:.1f}"),
        ("feeds on B after the reads (none has expired)", feeds),
        ("their bytes (feeds_bytes budget: 64 MiB)", f"{feed_bytes / 2**20:.1f} MiB"),
        ("B's connections before / after (pool + readers)", f"{before} / {after}"),
        ("pool connections in use at most", pool.peak_in_use),
        ("commands that waited for a connection", pool.waits),
        ("CLIENT LIST, every client, before / after", f"{names_before} / {names_after}"),
        (
            "running job's lag on B, p50 / p99 ms, before",
            f"{percentile(quiet, 50):.1f} / {percentile(quiet, 99):.1f}",
        ),
        (
            "running job's lag on B, p50 / p99 ms, during the reads",
            f"{percentile(busy, 50):.1f} / {percentile(busy, 99):.1f}",
        ),
        (
            "the loop's own delay (a 10 ms sleep woken late), p50 / p99 ms, during the reads",
            f"{percentile(loop_busy, 50):.1f} / {percentile(loop_busy, 99):.1f}",
        ),
    ]


async def memory_row(url: str, admin: Redis, job_id: str) -> list[tuple[str, object]]:
    store = RedisJobStore(admin, prefix="bench:")
    bus = RedisEventBus(admin, prefix="bench:")
    stream = await admin.memory_usage(bus.key(job_id), samples=0)
    snapshot = await admin.memory_usage(store.key(job_id), samples=0)
    length = await admin.xlen(bus.key(job_id))
    entries = await admin.xrange(bus.key(job_id))
    frames = sum(len(fields.get(b"f", b"")) for _, fields in entries)
    return [
        ("stream entries (events + markers)", length),
        ("frame bytes in the stream", frames),
        ("stream key (MEMORY USAGE)", stream),
        ("snapshot key (MEMORY USAGE)", snapshot),
        ("total, B", stream + snapshot),
    ]


async def main(url: str, events: int, only: str = "all") -> None:
    admin = connect_redis(url)
    if only == "many":
        await print_many_jobs(url, admin)
        await admin.aclose()
        return
    rows = []
    for on_a, on_b in ((0, 0), (1, 1), (10, 10), (500, 500)):
        published, counts, received, held = await publish_row(url, admin, on_a, on_b, events)
        assert received == published * (on_a + on_b), (received, published)
        xadd = counts.get("xadd", 0) / published
        reads = counts.get("xread", 0) / published
        rows.append(
            (
                f"{on_a} + {on_b}",
                published,
                f"{xadd:.2f}",
                f"{reads:.2f}",
                f"{sum(counts.values()) / published:.2f}",
                f"{held[0]} + {held[1]}",
                per_event(counts, published),
            )
        )
    print(f"## bus alone: {events} events published on A, subscribers on A + B\n")
    print_table(
        [
            "subscribers",
            "events",
            "XADD/event",
            "XREAD/event",
            "all/event",
            "connections A + B",
            "by command",
        ],
        rows,
    )

    job_events, counts, job_id = await job_row(url, admin, 500)
    publish_side = counts.get("xadd", 0) + counts.get("set", 0)
    memory = MemoryEventBus()
    a = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    b = RedisEventBus(connect_redis(url), owns_client=True, prefix="bench:")
    lag_rows = [
        await lag_row("memory, one instance", (memory, memory), 500, events),
        await lag_row("redis, two instances", (a, b), 500, events),
    ]
    await a.aclose()
    await b.aclose()
    print(
        f"\n## delivery lag: {events} events in bursts of 10 (a yield after each, 5 ms after"
        " each burst), 1,000 subscribers"
        " (500 on A, the publisher, 500 on B; one process, so both share one core)\n"
    )
    print_table(
        [
            "bus",
            "deliveries",
            "lag A p50 / p99 ms",
            "lag B p50 / p99 ms",
            "p99 all ms",
            "CPU µs/delivery",
        ],
        lag_rows,
    )

    print(f"\n## one demo job {JOB_OPTIONS} on A, 500 watchers on A and 500 on B\n")
    print_table(
        ["events", "XADD+SET/event", "all/event", "by command (per event)"],
        [
            (
                job_events,
                f"{publish_side / job_events:.2f}",
                f"{sum(counts.values()) / job_events:.2f}",
                per_event(counts, job_events),
            )
        ],
    )

    idle_s = 3.0
    idle = await idle_row(url, admin, idle_s)
    print(f"\n## idle: a running job, 100 watchers on A and 100 on B, {idle_s:g} s quiet\n")
    print_table(["commands", "by command"], [(sum(idle.values()), per_event(idle, 1))])

    await print_many_jobs(url, admin)

    print(f"\n## Redis memory of the finished demo job ({job_events} events)\n")
    print_table(["what", "value"], await memory_row(url, admin, job_id))
    await admin.aclose()


def run() -> None:
    """Parse arguments, start a throw-away redis-server (or use ``--url``) and measure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events per publish row")
    parser.add_argument("--url", help="an existing Redis to use (it is reset: CONFIG RESETSTAT)")
    parser.add_argument(
        "--only", choices=["all", "many"], default="all", help="many: the many-jobs rows alone"
    )
    args = parser.parse_args()
    if args.url:
        asyncio.run(main(args.url, args.events, args.only))
        return
    if find_redis_server() is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    with tempfile.TemporaryDirectory() as tmp, run_redis(pathlib.Path(tmp)) as server:
        started = time.monotonic()
        asyncio.run(main(server.url, args.events, args.only))
        print(f"\n(redis-server {server.url}, {time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    run()
