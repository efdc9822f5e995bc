"""Reading the diagnostics stream: ``run_probe`` times every read (``Read``) of
``/api/diagnostics/stream`` through the path, then hands the reads to ``analyse``."""

from __future__ import annotations

import time

import aiohttp

from app.pathtools.probe.analysis import Read, analyse
from app.pathtools.probe.pattern import probe_pattern
from app.pathtools.probe.report import DEFAULT_LATENCY_BUDGET_MS, ProbeReport
from app.web.diagnostics import DiagnosticsPattern

__all__ = ["DIAGNOSTICS_PATH", "ProbeError", "Read", "run_probe"]

DIAGNOSTICS_PATH = "/api/diagnostics/stream"


class ProbeError(Exception):
    """The diagnostics stream could not be read."""


async def run_probe(
    base_url: str,
    pattern: DiagnosticsPattern | None = None,
    *,
    timeout_s: float = 90.0,
    headers: dict[str, str] | None = None,
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS,
) -> ProbeReport:
    """Read the diagnostics stream of the service at ``base_url`` and analyse it."""
    pattern = pattern or probe_pattern()
    url = base_url.rstrip("/") + DIAGNOSTICS_PATH
    reads: list[Read] = []
    # Like a browser: accept compression, but count the bytes as the server wrote them.
    request_headers = {"Accept": "text/event-stream", "Accept-Encoding": "gzip, deflate"}
    request_headers.update(headers or {})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        started = time.monotonic()
        async with session.get(url, params=pattern.as_query(), headers=request_headers) as response:
            headers_at_s = time.monotonic() - started
            if response.status != 200:
                body = await response.text()
                raise ProbeError(f"{url} answered HTTP {response.status}: {body[:200]}")
            total = 0
            async for chunk in response.content.iter_any():
                total += len(chunk)
                reads.append(Read(time.monotonic() - started, total))
            encoding = response.headers.get("Content-Encoding")
            length = response.content_length
    return analyse(
        reads,
        pattern,
        headers_at_s=headers_at_s,
        url=base_url,
        status=response.status,
        content_encoding=encoding,
        content_length=length,
        latency_budget_ms=latency_budget_ms,
    )
