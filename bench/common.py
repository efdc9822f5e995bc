"""Shared pieces of the benchmarks: a real server, a measured job run, table printing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from app.core.logs import configure_logging
from app.core.settings import Settings
from app.pathtools.delivery import DeliveryStats, Received, delivery_stats
from app.web.factory import init_app
from tests.support.sse_client import read_stream

__all__ = ["JobRun", "print_table", "run_job", "serve"]

#: The benchmark job: 3 steps x 240 tokens at 80 tokens/s, about 9 s.
BENCH_OPTIONS: dict[str, Any] = {
    "steps": 3,
    "tokens_per_step": 240,
    "tokens_per_second": 80,
    "seed": 7,
}


@contextlib.asynccontextmanager
async def serve(env: Mapping[str, str] | None = None) -> AsyncIterator[str]:
    """Run the app (built by the real factory) on a free port; yields its base URL."""
    settings = Settings.from_environ({"FLUSHLINE_LOG_LEVEL": "warning", **(env or {})})
    configure_logging(settings.log_level, "console")
    app = init_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@attrs.frozen
class JobRun:
    """What one job's stream delivered."""

    strategy: str
    events: int
    wire_bytes: int
    padding_bytes: int
    duration_s: float
    delivery: DeliveryStats
    headers_after_ms: float

    @property
    def bytes_per_event(self) -> float:
        """Wire bytes divided by events."""
        return self.wire_bytes / self.events if self.events else 0.0

    @property
    def padding_per_s(self) -> float:
        """Comment (padding) bytes per second of the job."""
        return self.padding_bytes / self.duration_s if self.duration_s else 0.0


def _comment_bytes(raw: bytes) -> int:
    return sum(len(line) + 1 for line in raw.split(b"\n") if line.startswith(b":"))


async def run_job(
    session: aiohttp.ClientSession,
    service_url: str,
    stream_base: str,
    strategy: str,
    options: Mapping[str, Any] | None = None,
) -> JobRun:
    """Start a job on ``service_url`` and read its stream through ``stream_base``."""
    body = {"strategy": strategy, "options": dict(options or BENCH_OPTIONS)}
    async with session.post(f"{service_url}/api/jobs", json=body) as response:
        job = await response.json()
        if response.status != 201:
            raise RuntimeError(f"job not created: {job}")
    started = time.time()
    record = await read_stream(session, stream_base + job["links"]["stream"], timeout_s=300)
    payloads = record.payloads()
    received = [
        Received(float(p["ts"]), a.at) for p, a in zip(payloads, record.events, strict=True)
    ]
    duration = float(payloads[-1]["ts"]) - float(payloads[0]["ts"]) if payloads else 0.0
    return JobRun(
        strategy=strategy,
        events=len(payloads),
        wire_bytes=len(record.raw),
        padding_bytes=_comment_bytes(record.raw),
        duration_s=duration,
        delivery=delivery_stats(received),
        headers_after_ms=(record.headers_at - started) * 1000,
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (so it pastes into the README as is)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
