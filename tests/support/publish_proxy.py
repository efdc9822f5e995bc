"""A recording proxy in front of the publish API that can lose answers, as networks do.

Each ``POST /api/jobs/{id}/events`` is forwarded to the service and recorded
(:class:`Post`); every ``drop_every``-th answer is dropped after the service has processed
the request (the connection closes instead), which is the case ``producer_seq`` exists for.
"""

from __future__ import annotations

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
    """One publish the proxy forwarded: when, what, the service's status, whether dropped."""

    at: float
    body: bytes
    status: int
    dropped: bool
    answered_at: float

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
    answer (the service has processed that request: the client never hears of it)."""

    upstream: str
    drop_every: int | None = None
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
        drop = self.drop_every is not None and (len(self.posts) + 1) % self.drop_every == 0
        self.posts.append(Post(at, body, status, drop, time.monotonic()))
        if drop:
            assert request.transport is not None
            request.transport.close()  # the answer is lost; the service did the work
        return web.Response(status=status, body=answer, headers=answer_headers)


FORWARDED = frozenset({"authorization", "content-type"})
FORWARDED_BACK = frozenset({"content-type", "retry-after"})


@contextlib.asynccontextmanager
async def publish_proxy(
    upstream: str, drop_every: int | None = None
) -> AsyncIterator[PublishProxy]:
    """Serve a :class:`PublishProxy` in front of ``upstream``'s publish API."""
    proxy = PublishProxy(upstream, drop_every)
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
