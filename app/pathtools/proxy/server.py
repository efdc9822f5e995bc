"""Buffering reverse proxy emulator behind ``flushline proxy``.

Forwards every request to an upstream base URL and streams the response back, but
holds the response body the way a buffering front end (Cloud Run, nginx with
``proxy_buffering on``, a gzip-ing CDN) does: bytes are released only once
``threshold_bytes`` are held, after ``max_hold_s``, or at upstream EOF. Response
headers are held until the first body release. Every release and every finished
request is logged, so a laptop run shows exactly when and why bytes reached the client.

The buffering policy lives in :class:`ReleaseBuffer`, a pure class fed with
explicit timestamps; :class:`BufferingProxy` only moves bytes and waits on timers.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self

import aiohttp
import attrs
import orjson
import structlog
from aiohttp import hdrs, web
from yarl import URL

from app.pathtools.proxy.config import ProxyConfig
from app.pathtools.proxy.headers import accepts_gzip, request_headers, response_headers
from app.pathtools.proxy.release import Release, ReleaseBuffer

_log = structlog.get_logger(__name__)

__all__ = ["BufferingProxy", "ProxyConfig"]

# Without this aiohttp's client would add its own defaults (notably
# ``Accept-Encoding: gzip, deflate``) and the upstream would see a different request.
_NO_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
_CONNECT_TIMEOUT_S = 10.0


@attrs.define
class _Exchange:
    """Per-request counters for the final log line."""

    path: str
    status: int = 502
    upstream_bytes: int = 0
    body_bytes: int = 0
    releases: int = 0
    gzip: bool = False
    outcome: str = "cancelled"


def _bad_gateway(message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": "bad_gateway", "message": message}})
    return web.Response(status=502, body=body, content_type="application/json")


@attrs.define
class BufferingProxy:
    """Reverse proxy that forwards to ``config.upstream`` and buffers response bodies.

    Use ``async with BufferingProxy(config) as proxy`` (listens on a free port) or
    :meth:`start` / :meth:`close`.
    """

    config: ProxyConfig
    _runner: web.AppRunner | None = attrs.field(default=None, init=False)
    _session: aiohttp.ClientSession | None = attrs.field(default=None, init=False)
    _host: str = attrs.field(default="127.0.0.1", init=False)
    _port: int | None = attrs.field(default=None, init=False)
    _streams: set[asyncio.Task[Any]] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Starts listening on ``host:port``; port 0 picks a free port."""
        if self._runner is not None:
            raise RuntimeError("proxy already started")
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S),
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_shutdown.append(self._cancel_streams)
        # handler_cancellation: a client that disconnects while its bytes are held
        # is only noticed this way, since nothing is written to it meanwhile.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            await self._session.close()
            self._session = None
            raise
        self._runner = runner
        self._closing = False
        self._host = host
        self._port = int(runner.addresses[0][1])

    @property
    def port(self) -> int:
        """The TCP port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the proxy, e.g. ``http://127.0.0.1:8081``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stops listening, cuts open streams and closes the upstream session."""
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()
        self._port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _cancel_streams(self, _app: web.Application) -> None:
        self._closing = True
        streams = set(self._streams)
        for task in streams:
            task.cancel()
        if streams:
            await asyncio.wait(streams)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        exchange = _Exchange(path=request.path_qs)
        try:
            return await self._proxy(request, exchange)
        except asyncio.CancelledError:
            exchange.outcome = "proxy_closing" if self._closing else "client_disconnected"
            raise
        finally:
            self._streams.discard(task)
            _log.info("proxy_request", **attrs.asdict(exchange))

    async def _proxy(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        if self._session is None:
            raise RuntimeError("proxy not started")
        base = URL(self.config.upstream)
        target = URL(f"{base.origin()}{base.raw_path.rstrip('/')}{request.raw_path}", encoded=True)
        try:
            upstream = await self._session.request(
                request.method,
                target,
                headers=request_headers(request.headers, strip_accept_encoding=self.config.gzip),
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            exchange.outcome = "bad_gateway"
            _log.warning("proxy_upstream_failed", path=exchange.path, error=str(exc))
            message = f"upstream {self.config.upstream} failed: {exc or type(exc).__name__}"
            return _bad_gateway(message)
        exchange.status = upstream.status
        complete = False
        try:
            response = await self._relay(request, upstream, exchange)
            complete = exchange.outcome == "complete"
            return response
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, exchange: _Exchange
    ) -> web.StreamResponse:
        has_body = request.method != "HEAD" and upstream.status not in (204, 304)
        exchange.gzip = (
            self.config.gzip
            and has_body
            and accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING, ""))
            and upstream.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() == "identity"
        )
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers, keep_length=not has_body),
        )
        if exchange.gzip:
            response.headers[hdrs.CONTENT_ENCODING] = "gzip"
        buffer = ReleaseBuffer(
            self.config.threshold_bytes,
            self.config.release,
            self.config.max_hold_s,
            gzip=exchange.gzip,
        )
        loop = asyncio.get_running_loop()
        read: asyncio.Task[bytes] | None = None
        try:
            if self.config.threshold_bytes == 0:
                await response.prepare(request)  # pass-through: no reason to hold headers
            while True:
                if read is None:
                    read = asyncio.ensure_future(upstream.content.readany())
                deadline = buffer.deadline
                timeout_s = None if deadline is None else max(0.0, deadline - loop.time())
                # Waiting on the task (not wait_for on the read) keeps an in-flight
                # read alive across timer wake-ups.
                done, _ = await asyncio.wait({read}, timeout=timeout_s)
                if not done:
                    await self._send(request, response, buffer.due(loop.time()), exchange)
                    continue
                finished, read = read, None
                try:
                    chunk = finished.result()
                except (aiohttp.ClientError, TimeoutError):
                    exchange.outcome = "upstream_error"
                    break
                if not chunk:
                    break
                exchange.upstream_bytes += len(chunk)
                await self._send(request, response, buffer.feed(chunk, loop.time()), exchange)
            clean_end = exchange.outcome != "upstream_error"
            await self._send(
                request, response, buffer.flush(loop.time()), exchange, known_length=clean_end
            )
            if not response.prepared:
                if clean_end and has_body:
                    response.content_length = 0
                await response.prepare(request)
            if not clean_end:
                # Cut the client connection so it sees a truncated body, not a clean end.
                if request.transport is not None:
                    request.transport.close()
            else:
                await response.write_eof()
                exchange.outcome = "complete"
        except ConnectionError:
            exchange.outcome = "client_disconnected"
        finally:
            if read is not None:
                read.cancel()
                await asyncio.wait({read})
        return response

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        release: Release | None,
        exchange: _Exchange,
        *,
        known_length: bool = False,
    ) -> None:
        if release is None:
            return
        _log.info(
            "proxy_release",
            path=exchange.path,
            bytes=len(release.data),
            held_ms=release.held_ms,
            reason=str(release.reason),
        )
        if not response.prepared:
            if known_length:  # whole body held until EOF: send it with a Content-Length
                response.content_length = len(release.data)
            await response.prepare(request)
        await response.write(release.data)
        exchange.body_bytes += len(release.data)
        exchange.releases += 1
