"""How long a ``/metrics`` scrape takes with 10 to 10,000 kept jobs, on each job store.

Run: ``python -m bench.metrics_scrape`` (about a minute; the Redis rows need
``redis-server``, started here on a free port, or are left out).

For each store and each number of kept jobs (statuses cycling through succeeded, failed,
cancelled and queued, each succeeded one with a 200-byte result) it times ``GET
/metrics`` over a real connection: the median and the 95th percentile of
:data:`SCRAPES` scrapes. ``flushline_jobs`` comes from counts the store keeps as jobs
change status, so the scrape time stays flat. The last column times what the scrape did
before, reading every kept snapshot (``store.newest(limit=kept)``), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pathlib
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp
import attrs
from aiohttp import web

from app.core.logs import configure_logging
from app.core.settings import Settings
from app.jobs.store import JobSnapshot, JobStatus, JobStore, StepState
from app.web.factory import init_app
from app.web.keys import MANAGER
from bench.common import print_table
from tests.support.redis import find_redis_server, run_redis

#: Kept jobs per row.
SIZES = (10, 100, 1_000, 10_000)
#: Scrapes timed per row.
SCRAPES = 50
STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED)


@contextlib.asynccontextmanager
async def serve_app(env: Mapping[str, str]) -> AsyncIterator[tuple[web.Application, str]]:
    """The real app on a free port: the app (for its store) and its base URL."""
    settings = Settings.from_environ({"FLUSHLINE_LOG_LEVEL": "warning", **env})
    configure_logging(settings.log_level, "console")
    app = init_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield app, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def keep(store: JobStore, first: int, count: int) -> None:
    """Add jobs ``first`` to ``first + count`` to ``store``, statuses cycling."""
    for n in range(first, first + count):
        status = STATUSES[n % len(STATUSES)]
        job = JobSnapshot(
            id=f"bench-{n}-{uuid.uuid4().hex[:8]}",
            pipeline="demo",
            strategy="none",
            steps=(StepState("only"),),
            created_at=time.time(),
        )
        await store.add(job)
        if status is not JobStatus.QUEUED:
            result = {"text": "x" * 200} if status is JobStatus.SUCCEEDED else None
            await store.put(attrs.evolve(job, status=status, result=result))


async def time_scrapes(session: aiohttp.ClientSession, base: str) -> list[float]:
    """Milliseconds of each of :data:`SCRAPES` scrapes (after one to warm up)."""
    times: list[float] = []
    for n in range(SCRAPES + 1):
        started = time.perf_counter()
        async with session.get(f"{base}/metrics") as response:
            await response.read()
            assert response.status == 200
        if n:
            times.append((time.perf_counter() - started) * 1000)
    return times


async def measure(name: str, env: Mapping[str, str]) -> list[list[object]]:
    """One row per size for the store that ``env`` configures."""
    rows: list[list[object]] = []
    async with serve_app(env) as (app, base), aiohttp.ClientSession() as session:
        store = app[MANAGER].store
        kept = 0
        for size in SIZES:
            await keep(store, kept, size - kept)
            kept = size
            times = sorted(await time_scrapes(session, base))
            started = time.perf_counter()
            await store.newest(limit=kept)
            scan_ms = (time.perf_counter() - started) * 1000
            counts = await store.count_by_status()
            assert sum(counts.values()) == kept, counts
            rows.append(
                [
                    name,
                    f"{size:,}",
                    f"{statistics.median(times):.2f}",
                    f"{times[int(len(times) * 0.95) - 1]:.2f}",
                    f"{scan_ms:.1f}",
                ]
            )
    return rows


async def main(argv: Sequence[str] | None = None) -> None:
    """Measure the memory store, then Redis (a throw-away server) when there is one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args(argv)
    rows = await measure("memory", {})
    binary = find_redis_server()
    if binary is None:
        print("(redis-server not found: the Redis rows are left out)")
    else:
        with tempfile.TemporaryDirectory() as tmp, run_redis(pathlib.Path(tmp), binary=binary) as r:
            rows += await measure("redis", {"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": r.url})
    print_table(
        [
            "store",
            "kept jobs",
            "scrape median ms",
            "scrape p95 ms",
            "reading every snapshot ms (the scrape before)",
        ],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
