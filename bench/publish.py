"""The publish API: throughput over HTTP, and the lag it adds to delivery.

Run: ``python -m bench.publish`` (about half a minute; ``--duration`` per measurement,
``--producers``). One real ``flushline serve`` (memory bus, defaults) on this machine:

* **throughput**: ``--producers`` producers at once, each publishing to a job of its own
  batch after batch (each waits for its answer, as a producer does), with batches of 1
  and of 50 ``tokens`` events: producer events accepted per second, all together, beside
  the floor, as many clients asking ``GET /healthz`` (what a request costs here now),
  and the server's CPU per event (``/proc/<pid>/stat``), which the client's share of the
  cores does not move: ``events/s/core`` is what one busy server core takes;
* **lag at 1,000 events/s**: one watcher's stream (``?proxy_buffer=0``) of one job fed at
  1,000 events/s (``insight`` events, 10 every 10 ms, each carrying the time it was
  emitted; the producer sends what has come due since its last answer), from the
  moment the event left its producer to the watcher's read: published over HTTP by a
  producer in this process, against the same pace emitted by a built-in step in the
  server (``bench.publish:pipeline``, registered through
  ``FLUSHLINE_PIPELINES``) in the same run. The difference is what the publish API adds.

Client and server share the machine's cores (and, here, other work): the figures are for
comparing the two paths within one run, not absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs

from app.jobs.steps import FunctionStep, Input, StepContext, StepPipeline
from bench.common import print_table

#: Events per tick and ticks per second of the lag measurement (1,000 events/s).
TICK_EVENTS = 10
TICK_S = 0.01


async def _emit(ctx: StepContext) -> str:
    """The built-in side of the lag measurement: insights at the bench's pace."""
    duration_s = float(ctx.input.get("duration_s", "3"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    tick = 0
    while loop.time() - started < duration_s:
        tick += 1
        for _ in range(TICK_EVENTS):
            ctx.report.insight(repr(time.time()))
        await asyncio.sleep(max(started + tick * TICK_S - loop.time(), 0))
    return "done"


#: ``FLUSHLINE_PIPELINES=bench.publish:pipeline``: the built-in emitter of the lag bench.
pipeline = StepPipeline(
    name="bench_emit",
    inputs=(Input("duration_s", required=False),),
    steps=(FunctionStep("emit", _emit, expected_tokens=1),),
)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * pct / 100), len(ordered) - 1)]


@contextlib.asynccontextmanager
async def flushline_serve() -> AsyncIterator[tuple[str, int]]:
    """A ``flushline serve`` on a free port with the bench pipeline; its URL and pid."""
    from tests.support.process import (
        ROOT,
        clean_env,
        find_flushline_script,
        free_port,
        server_process,
        wait_accepting,
    )

    script = find_flushline_script()
    if script is None:
        raise SystemExit("the flushline console script is not installed (pip install -e .)")
    port = free_port()
    env = clean_env(
        FLUSHLINE_LOG_LEVEL="warning",
        FLUSHLINE_PIPELINES="bench.publish:pipeline",
        FLUSHLINE_MAX_ACTIVE_JOBS="1000",
        PYTHONPATH=str(ROOT),
    )
    with tempfile.TemporaryDirectory() as tmp:
        argv = [script, "serve", "--host", "127.0.0.1", "--port", str(port)]
        async with server_process(argv, env, pathlib.Path(tmp) / "serve.log") as process:
            await wait_accepting(process, port)
            yield f"http://127.0.0.1:{port}", process.pid


async def _create(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> Any:
    async with session.post(f"{base}/api/jobs", json=body) as response:
        assert response.status == 201, await response.text()
        return await response.json()


class _Producer:
    """One job's producer: next producer_seq, its token."""

    def __init__(self, session: aiohttp.ClientSession, base: str, job: dict[str, Any]) -> None:
        self.session = session
        self.url = f"{base}/api/jobs/{job['id']}/events"
        self.headers = {"Authorization": f"Bearer {job['publish_token']}"}
        self.seq = 0

    async def publish(self, events: list[dict[str, Any]]) -> None:
        self.seq += 1
        body = {"producer_seq": self.seq, "events": events}
        async with self.session.post(self.url, json=body, headers=self.headers) as response:
            if response.status != 200:
                raise RuntimeError(f"publish {self.seq}: {response.status} {await response.text()}")
            await response.read()


async def _external(session: aiohttp.ClientSession, base: str) -> _Producer:
    job = await _create(session, base, {"pipeline": "external", "steps": [{"name": "s"}]})
    producer = _Producer(session, base, job)
    await producer.publish([{"type": "step_started", "step": "s"}])
    return producer


@attrs.frozen
class Throughput:
    """Events accepted per second, and the server CPU they took."""

    events_per_s: float
    requests_per_s: float
    #: Server CPU (user + system) per event, microseconds.
    cpu_us_per_event: float

    @property
    def per_core(self) -> float:
        """Events per second one busy server core would take at this cost."""
        return 1e6 / self.cpu_us_per_event


async def throughput(
    base: str, pid: int, producers: int, batch: int, duration_s: float
) -> Throughput:
    """``producers`` publishing ``batch`` events at a time, each waiting for its answer."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        running = [await _external(session, base) for _ in range(producers)]
        events = [{"type": "tokens", "step": "s", "count": 1, "text": "tok "}] * batch
        sent = 0
        stop_at = time.monotonic() + duration_s

        async def loop(producer: _Producer) -> None:
            nonlocal sent
            while time.monotonic() < stop_at:
                await producer.publish(events)
                sent += batch

        started, cpu_before = time.monotonic(), cpu_s(pid)
        await asyncio.gather(*(loop(p) for p in running))
        elapsed, cpu = time.monotonic() - started, cpu_s(pid) - cpu_before
        for producer in running:
            await producer.publish([{"type": "succeeded"}])
    return Throughput(sent / elapsed, sent / batch / elapsed, cpu * 1e6 / sent)


async def http_floor(base: str, clients: int, duration_s: float) -> float:
    """Requests per second of ``GET /healthz`` from ``clients`` at once: what HTTP itself
    costs on this machine now (the floor of a batch of 1)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        done = 0
        stop_at = time.monotonic() + duration_s

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async with session.get(f"{base}/healthz") as response:
                    await response.read()
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return done / (time.monotonic() - started)


async def _watch(session: aiohttp.ClientSession, base: str, job_id: str) -> list[float]:
    """Lags (s) of the job's insights: read time minus the time in their text."""
    from app.core.sse import SSEParser

    lags: list[float] = []
    parser = SSEParser()
    url = f"{base}/api/jobs/{job_id}/stream?proxy_buffer=0"
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as response:
        async for chunk in response.content.iter_any():
            now = time.time()
            for message in parser.feed(chunk):
                if message.event == "insight" and message.data is not None:
                    import orjson

                    text = orjson.loads(message.data)["text"]
                    with contextlib.suppress(ValueError):
                        lags.append(now - float(text))
    return lags


async def lag_external(base: str, duration_s: float) -> list[float]:
    """Lags of events published over HTTP at 1,000 events/s."""
    async with aiohttp.ClientSession() as session:
        producer = await _external(session, base)
        watcher = asyncio.create_task(_watch(session, base, producer.url.split("/")[-2]))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        while (elapsed := loop.time() - started) < duration_s:
            # What the pace has made due since the last batch (a slow answer makes the
            # next batch larger, as a producer's batching window does).
            due = int(elapsed / TICK_S + 1) * TICK_EVENTS - sent
            at = repr(time.time())
            await producer.publish([{"type": "insight", "text": at}] * due)
            sent += due
            await asyncio.sleep(max(started + (sent // TICK_EVENTS) * TICK_S - loop.time(), 0))
        await producer.publish([{"type": "succeeded"}])
        return await watcher


async def lag_builtin(base: str, duration_s: float) -> list[float]:
    """Lags of events a built-in step emits at 1,000 events/s."""
    async with aiohttp.ClientSession() as session:
        job = await _create(
            session, base, {"pipeline": "bench_emit", "input": {"duration_s": str(duration_s)}}
        )
        return await _watch(session, base, job["id"])


async def main(duration_s: float, producers: int) -> None:
    async with flushline_serve() as (base, pid):
        floor = await http_floor(base, producers, duration_s)
        rates = {
            batch: await throughput(base, pid, producers, batch, duration_s) for batch in (1, 50)
        }
        builtin = await lag_builtin(base, duration_s)
        external = await lag_external(base, duration_s)
    print(f"Throughput over HTTP, one instance, {producers} producers at once:\n")
    print_table(
        ["batch size", "producer events/s", "requests/s", "server CPU µs/event", "events/s/core"],
        [
            ["(floor: GET /healthz)", "-", f"{floor:,.0f}", "-", "-"],
            *(
                [
                    batch,
                    f"{rate.events_per_s:,.0f}",
                    f"{rate.requests_per_s:,.0f}",
                    f"{rate.cpu_us_per_event:.1f}",
                    f"{rate.per_core:,.0f}",
                ]
                for batch, rate in rates.items()
            ),
        ],
    )
    print("\nDelivery lag at 1,000 events/s, emit to a watcher's read:\n")
    rows = []
    for name, lags in (("built-in step (in process)", builtin), ("publish API (HTTP)", external)):
        ms = [lag * 1000 for lag in lags]
        rows.append([name, len(ms), f"{statistics.median(ms):.1f}", f"{percentile(ms, 99):.1f}"])
    print_table(["path", "events", "lag p50 ms", "lag p99 ms"], rows)
    added_p50 = statistics.median(external) - statistics.median(builtin)
    added_p99 = percentile(external, 99) - percentile(builtin, 99)
    print(
        f"\nAdded by the publish API: p50 {added_p50 * 1000:+.1f} ms, p99 "
        f"{added_p99 * 1000:+.1f} ms (targets: batches of 50 at >= 20,000 events/s; "
        "added p99 <= 20 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--producers", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.producers))
