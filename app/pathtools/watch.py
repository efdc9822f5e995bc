"""``flushline watch URL``: print each event of a stream as it arrives, with its lag.

``URL`` is a job's stream URL (``.../api/jobs/ID/stream``), or a service's base URL, in
which case a job is started first: of any registered pipeline (``--pipeline``, default
the service's own, ``demo``) with its ``--input`` and ``--options`` (JSON objects) and
``--strategy``; the start-up lines name the job's pipeline and the registered ones. Each
line shows the arrival time, the lag (arrival minus the event's ``ts``: comparable only when
the two clocks agree, e.g. on one machine), seq, type and a summary; the end shows
events, lag p50/p99 and bursts (events held back and released together).

It reads the stream with the Python client (:mod:`app.client`), so a dropped connection
is resumed with ``Last-Event-ID`` (a line says so) and every event is printed once.
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

from app.client import ClientError, StreamLost, create_job, stream_url, watch_job
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
    resume_after = None if last_event_id is None else int(last_event_id)
    started = time.time()

    def connected(attempt: int, after_seq: int | None) -> None:
        if attempt == 1:
            print(f"headers after {(time.time() - started) * 1000:.0f} ms", file=out)
        else:
            print(f"reconnected (attempt {attempt}); resuming after seq {after_seq}", file=out)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if "/stream" not in url:
            pipelines = await registered_pipelines(session, url)
            try:
                snapshot = await create_job(url, session=session, **(job or {}))
            except ClientError as exc:
                known = f" (registered: {', '.join(pipelines)})" if pipelines else ""
                raise WatchError(f"starting a job failed: {exc}{known}") from None
            url = stream_url(url, snapshot)
            print(f"started a job; watching {url}", file=out)
            listed = f"; registered: {', '.join(pipelines)}" if pipelines else ""
            print(f"pipeline {snapshot.get('pipeline')}{listed}", file=out)
        started = time.time()
        try:
            async for event in watch_job(
                url,
                last_event_id=resume_after,
                session=session,
                heartbeats=True,
                on_connect=connected,
            ):
                now = time.time()
                data = dict(event.data)
                ts = float(data.get("ts", now))
                if event.type != "heartbeat":
                    received.append(Received(ts, now))
                clock = datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")[:-3]
                print(
                    f"{clock}  lag {(now - ts) * 1000:7.1f} ms  "
                    f"{data.get('seq', '-')!s:>5}  {event.type:<14} {_summary(data)}",
                    file=out,
                    flush=True,
                )
        except (ClientError, StreamLost) as exc:
            raise WatchError(f"{url}: {exc}") from None
    stats = delivery_stats(received)
    print(
        f"\n{stats.events} events; lag p50 {stats.lag_p50_ms:.0f} ms, "
        f"p99 {stats.lag_p99_ms:.0f} ms, "
        f"max {stats.lag_max_ms:.0f} ms; {stats.bursts} bursts holding "
        f"{stats.burst_share:.0%} of the events",
        file=out,
    )
    return stats


async def registered_pipelines(session: aiohttp.ClientSession, base_url: str) -> list[str]:
    """The pipelines a service runs, from its OpenAPI description ([] if it cannot say)."""
    try:
        async with session.get(base_url.rstrip("/") + "/openapi.json") as response:
            if response.status != 200:
                return []
            spec = await response.json()
        prop = spec["components"]["schemas"]["JobRequest"]["properties"]["pipeline"]
        return [str(name) for name in prop["enum"]]
    except (aiohttp.ClientError, ValueError, KeyError, TypeError):
        return []


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flushline watch``."""
    parser.add_argument("url", help="a job's stream URL, or a base URL to start a job on")
    parser.add_argument(
        "--pipeline", help="pipeline of the started job (default: the service's, demo)"
    )
    parser.add_argument("--input", default="{}", help="JSON input of the started job")
    parser.add_argument("--strategy", help="strategy of the started job")
    parser.add_argument("--options", default="{}", help="JSON options of the started job")
    parser.add_argument("--last-event-id", help="resume after this seq")


def _json_object(value: str, option: str) -> dict[str, Any]:
    """``value`` parsed as a JSON object; ValueError naming ``option`` otherwise."""
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f'{option} must be a JSON object, like \'{{"prompt": "hi"}}\'')
    return parsed


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``flushline watch``: 0 when the stream ended, 1 on an error, 2 on bad arguments."""
    try:
        job: dict[str, Any] = {
            "options": _json_object(args.options, "--options"),
            "input": _json_object(args.input, "--input"),
        }
    except ValueError as exc:
        print(f"flushline watch: {exc}", file=sys.stderr)
        return 2
    if args.pipeline:
        job["pipeline"] = args.pipeline
    if args.strategy:
        job["strategy"] = args.strategy
    try:
        asyncio.run(watch(args.url, job=job, last_event_id=args.last_event_id))
    except (WatchError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"flushline watch: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
