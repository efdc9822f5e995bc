"""A local fake OpenAI-compatible provider (aiohttp, a real socket) for the LLM tests.

Each request takes the next :class:`Reply` of the script (the last one repeats). A reply
streams deltas at a set pace, and can instead answer an HTTP error (with
``Retry-After``), stall before its first token, cut the stream mid-way, send a malformed
chunk or an ``error`` object, and send ``usage``. The server records every request's body
and headers, and every client that disconnected before its reply ended (and when).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import orjson
from aiohttp import web

__all__ = ["FakeLLM", "Reply", "fake_llm"]


@attrs.frozen
class Reply:
    """How the fake answers one request.

    ``tokens`` None: the reply is ``("reply", " N", " to", " C", " chars")`` where N counts
    the requests (from 1) and C is the user message's length, so every reply differs.
    ``usage``: ``"none"``, ``"final"`` (a last chunk with ``usage`` and no choices, as
    OpenAI sends) or ``"each"`` (every chunk carries the running usage, as vLLM can);
    ``usage_per_delta`` is how many tokens each delta counts as.
    """

    tokens: tuple[str, ...] | None = None
    delay_s: float = 0.0
    status: int = 200
    message: str = "something went wrong"
    retry_after: str | None = None
    stall_s: float = 0.0
    cut_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    usage: str = "none"
    usage_per_delta: int = 1
    send_done: bool = True


@attrs.define
class Request:
    """One request the fake received."""

    body: dict[str, Any]
    headers: dict[str, str]
    at: float

    @property
    def prompt(self) -> str:
        """The last user message."""
        users = [m["content"] for m in self.body["messages"] if m["role"] == "user"]
        return str(users[-1])


@attrs.define
class FakeLLM:
    """The fake provider's script and what it saw."""

    script: list[Reply] = attrs.Factory(lambda: [Reply()])
    url: str = ""
    requests: list[Request] = attrs.Factory(list)
    #: ``time.monotonic()`` of each client that left before its reply ended.
    disconnects: list[float] = attrs.Factory(list)
    #: Replies streamed to their end.
    completed: int = 0

    @property
    def base_url(self) -> str:
        """The ``/v1`` root a client is configured with."""
        return self.url + "/v1"

    def _reply(self) -> Reply:
        index = min(len(self.requests) - 1, len(self.script) - 1)
        return self.script[index]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Request(body, dict(request.headers), time.monotonic()))
        reply = self._reply()
        if reply.status != 200:
            headers = {"Retry-After": reply.retry_after} if reply.retry_after else {}
            error = {"error": {"message": reply.message, "type": "fake", "code": reply.status}}
            return web.json_response(error, status=reply.status, headers=headers)
        tokens = reply.tokens
        if tokens is None:
            n, chars = len(self.requests), len(self.requests[-1].prompt)
            tokens = ("reply", f" {n}", " to", f" {chars}", " chars")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            await self._stream(request, response, reply, tokens, str(body.get("model")))
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects.append(time.monotonic())
            raise
        return response

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        reply: Reply,
        tokens: tuple[str, ...],
        model: str,
    ) -> None:
        def chunk(
            delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None
        ) -> bytes:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **(extra or {}),
            }
            return b"data: " + orjson.dumps(data) + b"\n\n"

        def usage(count: int) -> dict[str, int]:
            completion = count * reply.usage_per_delta
            total = 7 + completion
            return {"prompt_tokens": 7, "completion_tokens": completion, "total_tokens": total}

        await response.write(b": keep-alive\n\n" + chunk({"role": "assistant", "content": ""}))
        if reply.stall_s:
            await asyncio.sleep(reply.stall_s)
        for i, token in enumerate(tokens):
            if i == reply.cut_after:
                # An abrupt end: no terminating chunk, the connection just goes.
                assert request.transport is not None
                request.transport.close()
                return
            if i == reply.malformed_after:
                await response.write(b'data: {"choices": [{"delta": {"content": "oops"\n\n')
            if i == reply.error_after:
                error = {"error": {"message": reply.message, "type": "server_error"}}
                await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            extra = {"usage": usage(i + 1)} if reply.usage == "each" else None
            await response.write(chunk({"content": token}, extra=extra))
        await response.write(chunk({}, "stop"))
        if reply.usage == "final":
            final = {"id": "chatcmpl-fake", "choices": [], "usage": usage(len(tokens))}
            await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
        if reply.send_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.completed += 1


@contextlib.asynccontextmanager
async def fake_llm(*script: Reply) -> AsyncIterator[FakeLLM]:
    """Serve a :class:`FakeLLM` with ``script`` on a free port; yield it."""
    fake = FakeLLM(list(script) or [Reply()])
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    # handler_cancellation: a client leaving cancels the handler, so stalls see it too.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield fake
    finally:
        await runner.cleanup()
