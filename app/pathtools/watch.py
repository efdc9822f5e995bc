"""``flushline watch URL``: print each event of a stream as it arrives, with its lag.

``URL`` is a job's stream URL (``.../api/jobs/ID/stream``), or a service's base URL, in
which case a ``demo`` job is started first (``--strategy``, ``--options``). Each line
shows the arrival time, the lag (arrival minus the event's ``ts``: comparable only when
the two clocks agree, e.g. on one machine), seq, type and a summary; the end shows
events, lag p50/p99 and bursts (events held back and released together).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from typing import Any, TextIO

import aiohttp
import orjson

from app.core.sse import SSEParser
from app.pathtools.delivery import DeliveryStats, Received, delivery_stats

__all__ = ["configure_parser", "run_from_args", "watch"]


def _summary(data: dict[str, Any]) -> str:
    kind = data.get("type")
    if kind == "chunk":
        text = str(data.get("text", "")).replace("\n", " ")
        return f"{data.get('step')}: {text[:60]!r}{'...' if len(text) > 60 else ''}"
    if kind == "step_progress":
        overall, eta = data.get("overall_pct"), data.get("eta_s")
        return f"{data.get('step')}: {data.get('pct')}% (overall {overall}%, eta {eta} s)"
    if kind in ("step_started", "step_completed"):
        return f"{data.get('step')} (#{data.get('index')})"
    if kind == "insight":
        return str(data.get("text"))
    if kind == "done":
        return f"status {data.get('status')}"
    if kind == "error":
        return str(data.get("message"))
    return ""


async def _start_job(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> str:
    async with session.post(base.rstrip("/") + "/api/jobs", json=body) as response:
        payload = await response.json()
        if response.status != 201:
            raise WatchError(f"starting a job failed: HTTP {response.status}: {payload}")
        return str(base.rstrip("/") + payload["links"]["stream"])


class WatchError(Exception):
    """The stream could not be watched."""


async def watch(
    url: str,
    *,
    out: TextIO = sys.stdout,
    job: dict[str, Any] | None = None,
    last_event_id: str | None = None,
    timeout_s: float = 3600.0,
) -> DeliveryStats:
    """Watch ``url`` (a stream, or a base URL to start ``job`` on) until it ends."""
    received: list[Received] = []
    parser = SSEParser()
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        if "/stream" not in url:
            url = await _start_job(session, url, job or {})
            print(f"started a job; watching {url}", file=out)
        started = time.time()
        async with session.get(url, headers=headers) as response:
            if response.status != 200:
                raise WatchError(
                    f"{url} answered HTTP {response.status}: {(await response.text())[:200]}"
                )
            print(f"headers after {(time.time() - started) * 1000:.0f} ms", file=out)
            async for chunk in response.content.iter_any():
                now = time.time()
                for message in parser.feed(chunk):
                    if message.data is None:
                        continue
                    data = orjson.loads(message.data)
                    ts = float(data.get("ts", now))
                    if message.event != "heartbeat":
                        received.append(Received(ts, now))
                    clock = datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")[:-3]
                    print(
                        f"{clock}  lag {(now - ts) * 1000:7.1f} ms  "
                        f"{data.get('seq', '-')!s:>5}  {message.event:<14} {_summary(data)}",
                        file=out,
                        flush=True,
                    )
    stats = delivery_stats(received)
    print(
        f"\n{stats.events} events; lag p50 {stats.lag_p50_ms:.0f} ms, "
        f"p99 {stats.lag_p99_ms:.0f} ms, "
        f"max {stats.lag_max_ms:.0f} ms; {stats.bursts} bursts holding "
        f"{stats.burst_share:.0%} of the events",
        file=out,
    )
    return stats


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flushline watch``."""
    parser.add_argument("url", help="a job's stream URL, or a base URL to start a demo job on")
    parser.add_argument("--strategy", help="strategy of the started job")
    parser.add_argument("--options", default="{}", help="JSON options of the started job")
    parser.add_argument("--last-event-id", help="resume after this seq")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``flushline watch``: 0 when the stream ended, 1 on an error."""
    try:
        options = orjson.loads(args.options)
    except orjson.JSONDecodeError as exc:
        print(f"flushline watch: --options is not valid JSON: {exc}", file=sys.stderr)
        return 2
    job: dict[str, Any] = {"options": options}
    if args.strategy:
        job["strategy"] = args.strategy
    try:
        asyncio.run(watch(args.url, job=job, last_event_id=args.last_event_id))
    except (WatchError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"flushline watch: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
