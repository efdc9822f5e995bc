"""Helpers for the publish API's tests: a producer over HTTP, and a proxy that loses answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = [
    "AnswerDroppingProxy",
    "HttpProducer",
    "assert_progress_rules",
    "create_external",
    "dropping_proxy",
]

#: Errors a producer takes for "the answer was lost": it retries the same batch.
LOST_ANSWER = (aiohttp.ClientConnectionError, asyncio.TimeoutError)


async def create_external(
    session: aiohttp.ClientSession,
    base: str,
    steps: Sequence[str | tuple[str, int]],
    *,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """POST an external job with these steps (names, or ``(name, expected_tokens)``)."""
    declared = [
        {"name": s} if isinstance(s, str) else {"name": s[0], "expected_tokens": s[1]}
        for s in steps
    ]
    body = {"pipeline": "external", "steps": declared, **fields}
    async with session.post(f"{base}/api/jobs", json=body, headers=headers) as response:
        text = await response.text()
        assert response.status == 201, text
        created = await response.json()
    assert isinstance(created, dict)
    return created


@attrs.define
class HttpProducer:
    """Publishes one job's batches over HTTP with rising ``producer_seq``, retrying a batch
    whose answer was lost with the same ``producer_seq`` (as a real producer must)."""

    session: aiohttp.ClientSession
    base: str
    job_id: str
    token: str
    seq: int = 0
    #: Answers lost and retried.
    retries: int = 0
    answers: list[dict[str, Any]] = attrs.Factory(list)

    @property
    def url(self) -> str:
        return f"{self.base}/api/jobs/{self.job_id}/events"

    async def post(self, seq: int, events: Sequence[dict[str, Any]]) -> aiohttp.ClientResponse:
        """One raw publish (the caller reads the answer)."""
        return await self.session.post(
            self.url,
            json={"producer_seq": seq, "events": list(events)},
            headers={"Authorization": f"Bearer {self.token}"},
        )

    async def publish(self, *events: dict[str, Any], tries: int = 10) -> dict[str, Any]:
        """Publish the next batch; return its 200 answer (retrying lost answers)."""
        self.seq += 1
        for _ in range(tries):
            try:
                async with await self.post(self.seq, events) as response:
                    text = await response.text()
                    assert response.status == 200, f"{response.status}: {text}"
                    answer = await response.json()
            except LOST_ANSWER:
                self.retries += 1
                continue
            assert isinstance(answer, dict)
            self.answers.append(answer)
            return answer
        raise AssertionError(f"batch {self.seq} not answered in {tries} tries")


@attrs.define
class AnswerDroppingProxy:
    """Forwards every request to ``upstream``; of the publishes (``POST .../events``),
    every ``every``-th has its answer dropped after the server processed it: the client's
    connection is cut instead of answered."""

    upstream: str
    every: int = 3
    publishes: int = 0
    dropped: int = 0
    _session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            payload = await upstream.read()
            status, content_type = upstream.status, upstream.content_type
        if request.method == "POST" and request.path.endswith("/events"):
            self.publishes += 1
            if self.publishes % self.every == 0:
                self.dropped += 1
                assert request.transport is not None
                request.transport.abort()  # processed upstream; the answer never arrives
                return web.Response(status=204)
        return web.Response(status=status, body=payload, content_type=content_type)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@attrs.define
class _Running:
    proxy: AnswerDroppingProxy
    base: str


@contextlib.asynccontextmanager
async def dropping_proxy(upstream: str, every: int = 3) -> AsyncIterator[_Running]:
    """Serve an :class:`AnswerDroppingProxy` to ``upstream`` on a free port."""
    proxy = AnswerDroppingProxy(upstream, every)
    async with aiohttp.ClientSession() as session:
        proxy._session = session
        server = TestServer(proxy.app())
        await server.start_server()
        try:
            yield _Running(proxy, str(server.make_url("")).rstrip("/"))
        finally:
            await server.close()


def assert_progress_rules(payloads: Sequence[dict[str, Any]], job_id: str) -> None:
    """The built-in events' rules: seq 1..n without gaps, job_started first, done last;
    pct and overall_pct never decrease, 100 at step_completed and a succeeded done."""
    assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
    assert all(p["job_id"] == job_id for p in payloads)
    assert payloads[0]["type"] == "job_started"
    assert payloads[-1]["type"] == "done"
    overall = 0.0
    step_pct: dict[str, float] = {}
    for p in payloads:
        if "overall_pct" in p:
            assert p["overall_pct"] >= overall, p
            overall = p["overall_pct"]
        if p["type"] in ("step_progress", "step_completed"):
            assert p["pct"] >= step_pct.get(p["step"], 0.0), p
            step_pct[p["step"]] = p["pct"]
            if p["type"] == "step_progress":
                assert p["pct"] < 100, p
        if p["type"] == "step_completed":
            assert p["pct"] == 100, p
    if payloads[-1]["status"] == "succeeded":
        assert payloads[-1]["overall_pct"] == 100
