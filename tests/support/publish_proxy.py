"""A recording proxy in front of the publish API that can lose answers, as networks do.

Each ``POST /api/jobs/{id}/events`` is forwarded to the service and recorded
(:class:`Post`); every ``drop_every``-th answer is dropped after the service has processed
the request (the connection closes instead), which is the case ``producer_seq`` exists for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
from aiohttp import web

__all__ = ["Post", "PublishProxy", "publish_proxy"]


@attrs.frozen
class Post:
    """One publish the proxy forwarded: when, what, the service's status, whether its answer
    was dropped or held back."""

    at: float
    body: bytes
    status: int
    dropped: bool
    answered_at: float
    stalled: bool = False

    @property
    def producer_seq(self) -> int:
        """The batch's ``producer_seq``."""
        return int(json.loads(self.body)["producer_seq"])

    @property
    def events(self) -> list[dict[str, Any]]:
        """The batch's events."""
        events: list[dict[str, Any]] = json.loads(self.body)["events"]
        return events


@attrs.define
class PublishProxy:
    """Forwards publishes to ``upstream``; records each; drops every ``drop_every``-th
    answer (the service has processed that request: the client never hears of it), or
    holds every ``stall_every``-th answer back for ``stall_s`` (the client times out)."""

    upstream: str
    drop_every: int | None = None
    stall_every: int | None = None
    stall_s: float = 0.0
    url: str = ""
    posts: list[Post] = attrs.Factory(list)
    session: aiohttp.ClientSession | None = None

    @property
    def dropped(self) -> int:
        """How many answers were dropped."""
        return sum(p.dropped for p in self.posts)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        at = time.monotonic()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        assert self.session is not None
        async with self.session.post(
            self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            answer = await upstream.read()
            status = upstream.status
            answer_headers = {
                k: v for k, v in upstream.headers.items() if k.lower() in FORWARDED_BACK
            }
        number = len(self.posts) + 1
        drop = self.drop_every is not None and number % self.drop_every == 0
        stall = self.stall_every is not None and number % self.stall_every == 0
        self.posts.append(Post(at, body, status, drop, time.monotonic(), stall))
        if stall:
            await asyncio.sleep(self.stall_s)
        if drop:
            assert request.transport is not None
            request.transport.close()  # the answer is lost; the service did the work
        return web.Response(status=status, body=answer, headers=answer_headers)


FORWARDED = frozenset({"authorization", "content-type"})
FORWARDED_BACK = frozenset({"content-type", "retry-after"})


@contextlib.asynccontextmanager
async def publish_proxy(
    upstream: str,
    drop_every: int | None = None,
    *,
    stall_every: int | None = None,
    stall_s: float = 0.0,
) -> AsyncIterator[PublishProxy]:
    """Serve a :class:`PublishProxy` in front of ``upstream``'s publish API."""
    proxy = PublishProxy(upstream, drop_every, stall_every, stall_s)
    app = web.Application()
    app.router.add_post("/api/jobs/{job}/events", proxy.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    async with aiohttp.ClientSession() as session:
        proxy.session = session
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            yield proxy
        finally:
            await runner.cleanup()
