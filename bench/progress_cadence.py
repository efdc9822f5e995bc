"""Progress as it is reported: latency and padding cost per strategy, behind a 4 KB buffer.

Run: ``python -m bench.progress_cadence`` (about 25 s). Jobs per strategy, each read by
one watcher through the buffering emulator at 4096 bytes ("all" release), the service
told the buffer size (``FLUSHLINE_PROXY_BUFFER_BYTES=4096``), defaults otherwise; the
reporter job also on a direct connection (what the cadence alone costs in latency):

- **reporter**: a blocking ``FunctionStep`` calling ``report.progress(pct)`` every
  500 ms, 8 times: how many reported values the watcher saw, and the longest time from a
  report to the watcher's read of it (or of a later value it was merged into);
- **tokens**: the demo job at its default rate (2 steps x 200 tokens at 80 tokens/s,
  a bar moving 1 point per 25 ms): ``step_progress`` events and the lag of every event.

For each: events on the wire, wire bytes and padding bytes (SSE comment lines), per job
and per second: the cost per watcher.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
import time
from typing import Any

import aiohttp
import attrs

from app.core.logs import configure_logging
from app.pathtools.delivery import Received, delivery_stats
from bench.common import print_table
from strategies import STRATEGIES
from tests.support.paths import EMULATOR_PATHS, comment_bytes, open_path
from tests.support.reporting import ReportingWorker, report_delays, serve_pipelines
from tests.support.sse_client import StreamRecord, read_stream

PATH = next(p for p in EMULATOR_PATHS if p.name == "emulator-4096-all")
TOKENS_JOB: dict[str, Any] = {"steps": 2, "tokens_per_step": 200, "tokens_per_second": 80}


@attrs.frozen
class Run:
    """One strategy's job as its watcher read it."""

    strategy: str
    record: StreamRecord

    @property
    def progress_events(self) -> int:
        """``step_progress`` events delivered."""
        return sum(1 for p in self.record.payloads() if p["type"] == "step_progress")

    @property
    def span_s(self) -> float:
        """First to last event's ``ts``."""
        payloads = self.record.payloads()
        return float(payloads[-1]["ts"]) - float(payloads[0]["ts"])

    @property
    def padding_bytes(self) -> int:
        """SSE comment bytes on the wire."""
        return comment_bytes(self.record.raw)

    def cost(self) -> tuple[object, ...]:
        """Events, wire bytes, padding bytes, padding bytes per second."""
        return (
            len(self.record.payloads()),
            len(self.record.raw),
            self.padding_bytes,
            f"{self.padding_bytes / self.span_s:.0f}",
        )


async def _run(
    session: aiohttp.ClientSession, service: str, front: str, body: dict[str, Any]
) -> StreamRecord:
    async with session.post(f"{service}/api/jobs", json=body) as response:
        job = await response.json()
        if response.status != 201:
            raise RuntimeError(f"job not created: {job}")
    return await read_stream(session, front + job["links"]["stream"], timeout_s=120)


async def _direct_reporter() -> list[tuple[object, ...]]:
    workers = {name: ReportingWorker(f"report-{name}") for name in STRATEGIES}
    async with (
        serve_pipelines({}, [w.pipeline() for w in workers.values()]) as service,
        aiohttp.ClientSession() as session,
    ):
        records = await asyncio.gather(
            *(
                _run(session, service, service, {"pipeline": w.name, "strategy": name})
                for name, w in workers.items()
            )
        )
    return _reporter_rows(workers, records)


def _reporter_rows(
    workers: dict[str, ReportingWorker], records: list[StreamRecord]
) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for (name, worker), record in zip(workers.items(), records, strict=True):
        run = Run(name, record)
        delays = report_delays(worker.reports, record)
        shown = sum(1 for d in delays if d is not None)
        latest = max((d for d in delays if d is not None), default=float("nan"))
        values = f"{shown}/{len(delays)}"
        rows.append((name, values, f"{latest * 1000:.0f}", run.progress_events, *run.cost()))
    return rows


async def main() -> None:
    """Run the jobs with every strategy, behind the 4 KB emulator and direct; print tables."""
    configure_logging("warning", "console")
    direct = await _direct_reporter()
    workers = {name: ReportingWorker(f"report-{name}") for name in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            serve_pipelines(PATH.env, [w.pipeline() for w in workers.values()]) as service,
            open_path(PATH, service, pathlib.Path(tmp)) as front,
            aiohttp.ClientSession() as session,
        ):
            reporter = await asyncio.gather(
                *(
                    _run(session, service, front, {"pipeline": w.name, "strategy": name})
                    for name, w in workers.items()
                )
            )
            tokens = await asyncio.gather(
                *(
                    _run(session, service, front, {"strategy": name, "options": TOKENS_JOB})
                    for name in STRATEGIES
                )
            )
    print(f"defaults; {time.strftime('%Y-%m-%d %H:%M')}\n")
    headers = ["strategy", "values seen", "max report->read ms", "step_progress"]
    cost = ["events", "wire bytes", "padding bytes", "padding B/s"]
    print("reporter: report.progress(pct) every 500 ms, 8 values; direct connection\n")
    print_table([*headers, *cost], direct)
    print(f"\nreporter, behind {PATH.name}\n")
    print_table([*headers, *cost], _reporter_rows(workers, reporter))
    print(f"\ntokens: demo job {TOKENS_JOB}, behind {PATH.name}\n")
    rows = []
    for name, record in zip(STRATEGIES, tokens, strict=True):
        run = Run(name, record)
        received = [
            Received(float(p["ts"]), a.at)
            for p, a in zip(record.payloads(), record.events, strict=True)
        ]
        stats = delivery_stats(received)
        rows.append(
            (
                name,
                run.progress_events,
                f"{stats.lag_p50_ms:.0f}",
                f"{stats.lag_max_ms:.0f}",
                *run.cost(),
            )
        )
    print_table(["strategy", "step_progress", "lag p50 ms", "lag max ms", *cost], rows)


if __name__ == "__main__":
    asyncio.run(main())
