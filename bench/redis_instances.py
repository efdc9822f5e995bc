"""One job, 1,000 SSE subscribers: one real memory-bus process against two on Redis.

Run: ``python -m bench.redis_instances`` (about half a minute; needs ``redis-server``,
started here on a free port, never the machine's own). Real ``flushline serve``
processes, as deployed:

* memory: one process (``FLUSHLINE_BUS=memory``) serves all the subscribers;
* redis: A and B (``FLUSHLINE_BUS=redis``) on one Redis; the job runs on A, half the
  subscribers stream from A and half from B.

Each subscriber is an SSE stream (``?proxy_buffer=0``: every event is written when it is
published) read by this process. Lag is arrival time minus the event's ``ts`` (stamped
at publish, same clock), over the events published after every subscriber had its
first event. Server CPU per delivered event is the processes' user + system time
(``/proc/<pid>/stat``) over that same stretch, divided by the events they delivered;
Redis's CPU is shown on its own. The client shares the machine's cores with the
servers: figures are for comparing the two setups, not absolute; ``--runs`` rounds of
both, alternated, show how much they vary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import tempfile
import time
from typing import Any

import aiohttp
import orjson

from bench.common import print_table
from tests.support.process import (
    clean_env,
    find_flushline_script,
    free_port,
    server_process,
    wait_accepting,
)
from tests.support.redis import find_redis_server, run_redis

#: About 8 s of events: 4 steps x 160 tokens at 80 tokens/s, a small chunk every 0.3 s.
JOB: dict[str, Any] = {
    "strategy": "frequency",
    "options": {"steps": 4, "tokens_per_step": 160, "tokens_per_second": 80, "seed": 11},
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


class Subscriber:
    """One SSE stream: the arrival lag of every event, and when the first one came."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.arrivals: list[tuple[float, float]] = []  # (event ts, arrival time)

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        buffer = b""
        async with session.get(url) as response:
            assert response.status == 200, (response.status, await response.text())
            async for chunk in response.content.iter_any():
                now = time.time()
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    for line in block.split(b"\n"):
                        if line.startswith(b"data:"):
                            payload = orjson.loads(line[5:])
                            self.arrivals.append((payload["ts"], now))
                            self.first.set()


async def run_setup(
    name: str, urls: list[str], pids: list[int], redis_pid: int | None, subscribers: int
) -> tuple[object, ...]:
    """The job created on ``urls[0]``, its subscribers spread over ``urls``."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.post(f"{urls[0]}/api/jobs", json=JOB) as response:
            assert response.status == 201, await response.text()
            job_id = (await response.json())["id"]
        subs = [Subscriber() for _ in range(subscribers)]
        tasks = [
            asyncio.create_task(
                sub.run(session, f"{urls[i % len(urls)]}/api/jobs/{job_id}/stream?proxy_buffer=0")
            )
            for i, sub in enumerate(subs)
        ]
        await asyncio.wait_for(asyncio.gather(*(sub.first.wait() for sub in subs)), 60)
        start = time.time()
        cpu_before = [cpu_s(pid) for pid in pids]
        redis_before = cpu_s(redis_pid) if redis_pid is not None else 0.0
        await asyncio.gather(*tasks)
        cpu_used = sum(cpu_s(pid) for pid in pids) - sum(cpu_before)
        redis_used = cpu_s(redis_pid) - redis_before if redis_pid is not None else 0.0
    lags_ms = [(at - ts) * 1000 for sub in subs for ts, at in sub.arrivals if ts >= start]
    events = len({ts for sub in subs for ts, _ in sub.arrivals if ts >= start})
    delivered = len(lags_ms)
    return (
        name,
        subscribers,
        events,
        delivered,
        f"{percentile(lags_ms, 50):.1f}",
        f"{percentile(lags_ms, 99):.1f}",
        f"{cpu_used / delivered * 1e6:.1f}" if delivered else "-",
        f"{redis_used / delivered * 1e6:.2f}" if redis_pid is not None and delivered else "-",
    )


async def main(subscribers: int, runs: int) -> None:
    script = find_flushline_script()
    binary = find_redis_server()
    if script is None or binary is None:
        raise SystemExit("needs the flushline script (pip install -e .) and redis-server")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        with run_redis(tmp_path / "redis", binary=binary) as redis:
            assert redis.process is not None
            setups = [("memory (1 process)", "memory", 1), ("redis (A + B)", "redis", 2)]
            # Alternated, so that a neighbour's load on the machine hits both alike.
            for name, bus, count in setups * runs:
                env = clean_env(
                    FLUSHLINE_BUS=bus, FLUSHLINE_REDIS_URL=redis.url, FLUSHLINE_LOG_LEVEL="warning"
                )
                async with contextlib.AsyncExitStack() as stack:
                    urls, pids = [], []
                    for i in range(count):
                        port = free_port()
                        argv = [script, "serve", "--host", "127.0.0.1", "--port", str(port)]
                        log = tmp_path / f"{bus}-{i}.log"
                        process = await stack.enter_async_context(server_process(argv, env, log))
                        await wait_accepting(process, port)
                        urls.append(f"http://127.0.0.1:{port}")
                        pids.append(process.pid)
                    redis_pid = redis.process.pid if bus == "redis" else None
                    rows.append(await run_setup(name, urls, pids, redis_pid, subscribers))
    print_table(
        [
            "bus",
            "subscribers",
            "events",
            "deliveries",
            "lag p50 ms",
            "lag p99 ms",
            "server CPU µs / delivery",
            "redis CPU µs / delivery",
        ],
        rows,
    )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="rounds of both setups")
    args = parser.parse_args()
    asyncio.run(main(args.subscribers, args.runs))


if __name__ == "__main__":
    run()
