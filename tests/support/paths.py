"""The real service behind each delivery path (direct, the buffering emulator, real nginx).

Shared by the delivery, probe and watch tests. The service is built by the real app
factory and served on a real port; in front of it sits nothing (``direct``), the
``flushline proxy`` emulator, or a real nginx (``tests/support/nginx.py``). Every
stream read here is timestamped with ``time.time()`` on the same machine as the
service, so an event's lag is simply its arrival minus its ``ts``.

Slow end-to-end measurements are run once per test module, all paths side by side, on
an event loop of their own in a worker thread (:func:`run_in_thread`); the tests then
only assert on the recorded results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import attrs
from aiohttp import web

from app.core.settings import Settings
from app.pathtools.delivery import DeliveryStats, Received, delivery_stats
from app.pathtools.proxy import BufferingProxy, ProxyConfig
from app.web.factory import init_app
from tests.support.nginx import NginxMode, run_nginx
from tests.support.sse_client import StreamRecord, read_stream

__all__ = [
    "ALL_PATHS",
    "DIRECT",
    "EMULATOR_PATHS",
    "NGINX_GZIP",
    "NGINX_HTTP10",
    "NGINX_HTTP11",
    "SHORT_JOB",
    "DeliveryPath",
    "JobDelivery",
    "comment_bytes",
    "deliver_job",
    "open_path",
    "run_in_thread",
    "serve",
    "start_job",
]

T = TypeVar("T")

#: A demo job of about 3 s (2 steps x 60 tokens at 40 tokens/s, 16 events with ``none``).
#: Unshaped, its stream holds about 3.1 KB until its final instant (last chunk,
#: ``step_completed`` and ``done``, which carries the result): under the first release
#: of every buffering path here (nginx HTTP/1.0: 4096 minus its ~200-byte response
#: head), so through them ``none`` arrives all at the end. At 80 tokens/s the same
#: would hold 3.6 KB, too close to nginx's ~3.9 KB first release.
SHORT_JOB: dict[str, Any] = {"steps": 2, "tokens_per_step": 60, "tokens_per_second": 40}

_PLACEHOLDER = "http://placeholder.invalid"


@attrs.frozen
class DeliveryPath:
    """One way from the service to the client, and the buffer size a probe reports for it."""

    name: str
    buffer_bytes: int  # 0: the path does not buffer
    proxy: ProxyConfig | None = None
    nginx: NginxMode | None = None

    @property
    def env(self) -> dict[str, str]:
        """The service settings for this path (``aligned`` told the path's buffer size)."""
        return {"FLUSHLINE_PROXY_BUFFER_BYTES": str(self.buffer_bytes)}

    def __str__(self) -> str:
        return self.name


def _emulator(size: int, release: str) -> DeliveryPath:
    config = ProxyConfig(upstream=_PLACEHOLDER, threshold_bytes=size, release=release)
    return DeliveryPath(f"emulator-{size}-{release}", size, proxy=config)


DIRECT = DeliveryPath("direct", 0)
EMULATOR_PATHS = tuple(
    _emulator(size, release) for size in (4096, 16384) for release in ("all", "blocks")
)
NGINX_HTTP10 = DeliveryPath("nginx-http10", 4096, nginx=NginxMode.HTTP10)
NGINX_GZIP = DeliveryPath("nginx-gzip", 4096, nginx=NginxMode.GZIP)
NGINX_HTTP11 = DeliveryPath("nginx-http11", 0, nginx=NginxMode.HTTP11)
ALL_PATHS = (DIRECT, *EMULATOR_PATHS, NGINX_HTTP10, NGINX_GZIP, NGINX_HTTP11)


@contextlib.asynccontextmanager
async def serve(env: Mapping[str, str] | None = None) -> AsyncIterator[str]:
    """Run the app (real factory, ``FLUSHLINE_*`` from ``env``) on a free port; yield its URL.

    Unlike ``bench.common.serve`` it leaves the global logging configuration alone, so
    other tests' ``structlog.testing.capture_logs`` keep working.
    """
    app = init_app(Settings.from_environ({"FLUSHLINE_LOG_LEVEL": "warning", **(env or {})}))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def open_path(
    path: DeliveryPath, upstream: str, tmp_dir: pathlib.Path, **proxy_overrides: Any
) -> AsyncIterator[str]:
    """Put ``path`` in front of ``upstream``; yield the base URL a client should use.

    ``tmp_dir`` must be private to this call (nginx keeps its pid file and logs there).
    ``proxy_overrides`` change the emulator's config (e.g. ``max_hold_s``).
    """
    if path.proxy is not None:
        config = attrs.evolve(path.proxy, upstream=upstream, **proxy_overrides)
        async with BufferingProxy(config) as proxy:
            yield proxy.url
    elif path.nginx is not None:
        port = int(upstream.rsplit(":", 1)[1])
        async with run_nginx(port, path.nginx, tmp_dir=tmp_dir) as nginx:
            yield nginx.url
    else:
        yield upstream


def comment_bytes(raw: bytes) -> int:
    """Bytes of SSE comment lines (padding) in ``raw``, line breaks included."""
    return sum(len(line) + 1 for line in raw.split(b"\n") if line.startswith(b":"))


@attrs.frozen
class JobDelivery:
    """What one job's stream delivered through a path, and when."""

    strategy: str
    requested_at: float  # time.time() just before the stream request
    record: StreamRecord
    received: tuple[Received, ...]

    @property
    def stats(self) -> DeliveryStats:
        """Lag percentiles and bursts, as ``flushline watch`` and the benchmarks judge them."""
        return delivery_stats(self.received)

    @property
    def lags_s(self) -> list[float]:
        """Arrival minus ``ts`` of every event, in stream order."""
        return [r.lag_s for r in self.received]

    @property
    def headers_after_s(self) -> float:
        """How long after the request the response headers arrived."""
        return self.record.headers_at - self.requested_at

    @property
    def emitted_span_s(self) -> float:
        """Time between the first and the last event's ``ts``."""
        return self.received[-1].ts - self.received[0].ts

    @property
    def arrival_span_s(self) -> float:
        """Time between the first and the last event's arrival."""
        return self.received[-1].arrived - self.received[0].arrived

    @property
    def padding_bytes(self) -> int:
        """Comment (padding) bytes in the stream."""
        return comment_bytes(self.record.raw)

    @property
    def padding_per_s(self) -> float:
        """Comment bytes per second of job time (first to last event)."""
        return self.padding_bytes / self.emitted_span_s

    def describe(self) -> str:
        """One line for assertion messages."""
        s = self.stats
        return (
            f"{self.strategy}: {s.events} events, lag p50 {s.lag_p50_ms:.0f} ms "
            f"max {s.lag_max_ms:.0f} ms, {s.burst_share:.0%} in bursts, headers after "
            f"{self.headers_after_s * 1000:.0f} ms, arrivals over {self.arrival_span_s:.2f} s "
            f"of {self.emitted_span_s:.2f} s emitted"
        )


async def start_job(
    session: aiohttp.ClientSession, service: str, strategy: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """POST a demo job to ``service``; return its snapshot."""
    body = {"strategy": strategy, "options": dict(options)}
    async with session.post(f"{service}/api/jobs", json=body) as response:
        snapshot = await response.json()
        assert response.status == 201, snapshot
    assert isinstance(snapshot, dict)
    return snapshot


async def deliver_job(
    session: aiohttp.ClientSession,
    service: str,
    front: str,
    strategy: str,
    options: Mapping[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> JobDelivery:
    """Start a job on ``service`` and record its stream read through ``front``."""
    job = await start_job(session, service, strategy, options)
    requested_at = time.time()
    record = await read_stream(
        session, front + job["links"]["stream"], headers=headers, timeout_s=timeout_s
    )
    assert record.status == 200, (record.status, record.raw[:200])
    payloads = record.payloads()
    assert payloads, f"{strategy}: no events arrived"
    assert payloads[-1]["type"] == "done", payloads[-1]
    received = tuple(
        Received(float(p["ts"]), a.at) for p, a in zip(payloads, record.events, strict=True)
    )
    return JobDelivery(strategy, requested_at, record, received)


def run_in_thread(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a fresh event loop in a worker thread.

    For module-scoped measurements: the test's own event loop is left untouched.
    """

    async def runner() -> T:
        return await main()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(runner())).result()
