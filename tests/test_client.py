"""The Python client (app.client) against the real service on a real socket.

Drops are made by a cutting proxy between the two: it forwards each stream request to
the service and closes the connection abruptly after a number of bytes (mid-frame), as a
proxy timeout or a restart would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web

from app.client import ClientError, JobEvent, create_job, stream_url, watch_job
from tests.support.paths import serve

JOB_OPTIONS = {"steps": 2, "tokens_per_step": 40, "tokens_per_second": 200}


@attrs.define
class CuttingProxy:
    """Forwards GETs to ``upstream``; cuts each response after ``cut_bytes`` bytes."""

    upstream: str
    cut_bytes: int
    url: str = ""
    #: The Last-Event-ID of each request, None when absent.
    resume_points: list[str | None] = attrs.Factory(list)
    cuts: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.resume_points.append(request.headers.get("Last-Event-ID"))
        headers = {k: v for k, v in request.headers.items() if k.lower() == "last-event-id"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.upstream + request.path_qs, headers=headers) as upstream,
        ):
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_any():
                room = self.cut_bytes - sent
                await response.write(chunk[:room])
                sent += min(len(chunk), room)
                if sent >= self.cut_bytes:
                    self.cuts += 1
                    assert request.transport is not None
                    request.transport.close()
                    return response
            await response.write_eof()
            return response


@contextlib.asynccontextmanager
async def cutting_proxy(upstream: str, cut_bytes: int) -> AsyncIterator[CuttingProxy]:
    """Serve a :class:`CuttingProxy` in front of ``upstream``."""
    proxy = CuttingProxy(upstream, cut_bytes)
    app = web.Application()
    app.router.add_get("/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield proxy
    finally:
        await runner.cleanup()


async def collect(url: str, **kwargs: Any) -> tuple[list[JobEvent], list[tuple[int, int | None]]]:
    """Every event watch_job yields, and each on_connect call."""
    connects: list[tuple[int, int | None]] = []
    events = [
        event
        async for event in watch_job(url, on_connect=lambda a, s: connects.append((a, s)), **kwargs)
    ]
    return events, connects


async def test_resumes_across_cut_connections_without_gap_or_duplicate() -> None:
    """Cut every 1000 bytes mid-frame: reconnects with Last-Event-ID; every seq exactly once."""
    async with (
        serve({"FLUSHLINE_RETRY_MS": "20", "FLUSHLINE_STRATEGY": "frequency"}) as service,
        cutting_proxy(service, 1000) as proxy,
    ):
        job = await create_job(service, options=JOB_OPTIONS)
        events, connects = await collect(stream_url(proxy.url, job))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{service}/api/jobs/{job['id']}") as response,
        ):
            finished = await response.json()
    seqs = [event.seq for event in events]
    assert seqs == list(range(1, finished["last_event_id"] + 1))
    assert events[-1].type == "done"
    assert events[-1].data["status"] == "succeeded"
    assert proxy.cuts >= 3
    assert len(connects) == len(proxy.resume_points) >= 4
    # Each reconnect resumed after the last event it had yielded, and said so.
    assert proxy.resume_points[0] is None
    assert [int(p) for p in proxy.resume_points[1:] if p is not None] == [
        s for _, s in connects[1:] if s is not None
    ]
    assert all(a == i + 1 for i, (a, _) in enumerate(connects))


async def test_last_event_id_starts_after_it_and_a_finished_job_ends() -> None:
    """last_event_id=3 yields from seq 4; resuming after the done event yields nothing (204)."""
    async with serve({"FLUSHLINE_STRATEGY": "frequency"}) as service:
        job = await create_job(service, options=JOB_OPTIONS)
        url = stream_url(service, job)
        events, _ = await collect(url, last_event_id=3)
        last = events[-1].seq
        assert last is not None
        after_done, connects = await collect(url, last_event_id=last)
    assert [e.seq for e in events] == list(range(4, last + 1))
    assert after_done == []
    assert connects == []


async def test_errors_are_client_errors_with_the_field() -> None:
    """A bad body and an unknown job become ClientError with status, code and field."""
    async with serve() as service:
        with pytest.raises(ClientError) as created:
            await create_job(service, pipeline="nope")
        assert created.value.status == 400
        assert created.value.field == "pipeline"
        assert "demo" in created.value.message
        with pytest.raises(ClientError) as watched:
            _ = [e async for e in watch_job(f"{service}/api/jobs/missing/stream")]
        assert watched.value.status == 404
        assert watched.value.code == "job_not_found"


async def test_unreachable_service_raises_at_once() -> None:
    """A stream URL nobody serves raises the connection error instead of retrying."""
    async with serve() as service:
        pass  # closed now: the port is free
    with pytest.raises(aiohttp.ClientConnectionError):
        _ = [e async for e in watch_job(f"{service}/api/jobs/x/stream")]
