"""Helpers for tests that drive jobs through the real HTTP API and read their streams."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web
from aiohttp.test_utils import TestClient

from app.bus import EventBus
from app.jobs.pipelines import JobPlan, StepPlan
from app.jobs.tokens import TokenRequest
from app.web.keys import BUS
from tests.support.sse_client import StreamRecord, read_stream

__all__ = [
    "FAST_JOB",
    "FINISHED",
    "SLOW_JOB",
    "Client",
    "RawLine",
    "ScriptedPipeline",
    "bus_of",
    "create_job",
    "expect_json_error",
    "get_job",
    "open_stalled_stream",
    "raw_lines",
    "stream_job",
    "wait_finished",
    "wait_for_job",
    "wait_until",
]

Client = TestClient[web.Request, web.Application]

#: A demo job that finishes in a few milliseconds (1 step x 5 tokens at 1000 tokens/s).
FAST_JOB: dict[str, Any] = {"steps": 1, "tokens_per_step": 5, "tokens_per_second": 1000}
#: A demo job that runs for about 50 s unless cancelled (1 step x 500 tokens at 10 tokens/s).
SLOW_JOB: dict[str, Any] = {"steps": 1, "tokens_per_step": 500, "tokens_per_second": 10}
#: The final job statuses.
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


async def create_job(
    client: Client,
    options: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """POST a job (``options`` plus any other body ``fields``); assert 201; return the snapshot."""
    body = dict(fields)
    if options is not None:
        body["options"] = dict(options)
    response = await client.post("/api/jobs", json=body)
    text = await response.text()
    assert response.status == 201, text
    snapshot = await response.json()
    assert isinstance(snapshot, dict)
    return snapshot


async def get_job(client: Client, job_id: str) -> dict[str, Any]:
    """GET the job's snapshot; assert 200."""
    response = await client.get(f"/api/jobs/{job_id}")
    assert response.status == 200, await response.text()
    snapshot = await response.json()
    assert isinstance(snapshot, dict)
    return snapshot


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0, what: str = ""
) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        await asyncio.sleep(0.01)


async def wait_for_job(
    client: Client,
    job_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout_s: float = 15.0,
) -> dict[str, Any]:
    """Poll the snapshot until ``predicate`` holds; return that snapshot."""
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.update(await get_job(client, job_id))
        return predicate(seen)

    await wait_until(check, timeout_s, what=f"job {job_id}")
    return seen


async def wait_finished(client: Client, job_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """Poll the snapshot until the job has a final status; return it."""
    return await wait_for_job(client, job_id, lambda s: s["status"] in FINISHED, timeout_s)


async def stream_job(
    client: Client,
    job_id: str,
    *,
    headers: dict[str, str] | None = None,
    query: str = "",
    stop_after: int | None = None,
    timeout_s: float = 30.0,
) -> StreamRecord:
    """Read ``/api/jobs/{job_id}/stream`` (plus ``query``) with the recording client."""
    url = str(client.make_url(f"/api/jobs/{job_id}/stream{query}"))
    return await read_stream(
        client.session, url, headers=headers, stop_after=stop_after, timeout_s=timeout_s
    )


async def open_stalled_stream(client: Client, job_id: str) -> socket.socket:
    """A raw connection that requests the job's stream and then never reads.

    Its receive buffer is tiny, so the server's writes soon stall; returns once the bus
    counts it as a subscriber. The caller closes the socket.
    """
    loop = asyncio.get_running_loop()
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        assert client.port is not None
        await loop.sock_connect(stalled, (client.host, client.port))
        request = (
            f"GET /api/jobs/{job_id}/stream HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n\r\n"
        )
        await loop.sock_sendall(stalled, request.encode())
        subscribers = bus_of(client).subscriber_count(job_id)
        await wait_until(lambda: bus_of(client).subscriber_count(job_id) > subscribers, 5)
    except BaseException:
        stalled.close()
        raise
    return stalled


def bus_of(client: Client) -> EventBus:
    """The event bus of the app the client talks to."""
    return client.app[BUS]


async def expect_json_error(
    response: aiohttp.ClientResponse,
    status: int,
    names: str | None = None,
    *,
    field: str | None = None,
) -> dict[str, Any]:
    """Assert the contract's JSON error shape with ``status``; ``names`` must be in the message.

    With ``field``, the error's ``field`` must be exactly that (and the message names it).
    Returns the ``error`` object.
    """
    text = await response.text()
    assert response.status == status, f"{response.status}: {text}"
    assert response.content_type == "application/json", (response.content_type, text)
    body = await response.json()
    assert isinstance(body, dict), text
    assert set(body) == {"error"}, text
    error = body["error"]
    assert isinstance(error, dict), text
    assert isinstance(error.get("code"), str), text
    assert error["code"], text
    assert isinstance(error.get("message"), str), text
    assert error["message"], text
    if names is not None:
        assert names in error["message"], f"{names!r} not named in {error['message']!r}"
    if field is not None:
        assert error.get("field") == field, text
        assert field in error["message"], f"{field!r} not named in {error['message']!r}"
    return error


_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


class RawLine:
    """One raw line of a stream: its bytes (line break included) and where it ends."""

    __slots__ = ("end", "text")

    def __init__(self, text: bytes, end: int) -> None:
        self.text = text
        self.end = end

    @property
    def content(self) -> bytes:
        """The line without its line break."""
        return self.text.rstrip(b"\r\n")

    @property
    def is_comment(self) -> bool:
        return self.text.startswith(b":")

    @property
    def is_blank(self) -> bool:
        return not self.content

    def __repr__(self) -> str:
        return f"RawLine({self.text[:60]!r}..., end={self.end})"


def raw_lines(raw: bytes) -> list[RawLine]:
    """Split ``raw`` into complete lines; assert nothing is left after the last line break."""
    lines: list[RawLine] = []
    pos = 0
    for match in _LINE.finditer(raw):
        if match.start() != pos or not match.group():
            break
        pos = match.end()
        lines.append(RawLine(match.group(), pos))
    assert pos == len(raw), f"stream ends with an incomplete line: {raw[pos : pos + 80]!r}"
    return lines


@attrs.frozen
class ScriptedSource:
    """Yields each token after its delay (seconds since the previous token)."""

    script: tuple[tuple[float, str], ...]

    async def stream(self, request: TokenRequest) -> AsyncIterator[str]:
        for delay, token in self.script:
            await asyncio.sleep(delay)
            yield token


@attrs.frozen
class ScriptedPipeline:
    """A one-step pipeline whose tokens arrive on a fixed timetable: ``(delay_s, token)``."""

    script: tuple[tuple[float, str], ...]
    name: str = "scripted"

    def plan(self, input: Mapping[str, Any], options: Mapping[str, Any]) -> JobPlan:
        source = ScriptedSource(self.script)
        request = TokenRequest(prompt="", max_tokens=len(self.script), step="script")
        step = StepPlan("script", len(self.script), source, request, ("Following the script...",))
        return JobPlan((step,))

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        return {"text": "".join(outputs)}
