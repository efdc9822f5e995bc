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

import argparse
import asyncio
import contextlib
import enum
import math
import signal
import sys
import zlib
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import attrs
import orjson
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

_log = structlog.get_logger(__name__)

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Without this aiohttp's client would add its own defaults (notably
# ``Accept-Encoding: gzip, deflate``) and the upstream would see a different request.
_NO_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
_CONNECT_TIMEOUT_S = 10.0


class ReleaseModel(enum.StrEnum):
    """How much of the held body a threshold release forwards."""

    ALL = "all"  # everything held
    BLOCKS = "blocks"  # only whole blocks of threshold bytes; the remainder stays held


class ReleaseReason(enum.StrEnum):
    """Why held bytes were released."""

    THRESHOLD = "threshold"
    MAX_HOLD = "max_hold"
    EOF = "eof"


@attrs.frozen
class Release:
    """Bytes leaving the buffer, how long the oldest of them was held, and why."""

    data: bytes
    held_ms: float
    reason: ReleaseReason


@attrs.define
class _Segment:
    arrived_at: float
    size: int


def _check_threshold(_instance: object, _attribute: object, value: int) -> None:
    if value < 0:
        raise ValueError(f"--threshold must be >= 0 bytes, got {value}")


def _check_max_hold(_instance: object, _attribute: object, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"--max-hold-s must be a positive number of seconds, got {value}")


def _to_release_model(value: str) -> ReleaseModel:
    try:
        return ReleaseModel(value)
    except ValueError:
        raise ValueError(f"--release must be 'all' or 'blocks', got {value!r}") from None


@attrs.define
class ReleaseBuffer:
    """Pure model of a buffering proxy's body buffer; callers pass the clock in.

    With ``gzip`` the fed bytes go through a gzip compressor first and the threshold
    counts compressed bytes; the compressor is only sync-flushed by a ``max_hold``
    release (otherwise that release could carry nothing decodable) and finished by
    :meth:`flush`.
    """

    threshold_bytes: int = attrs.field(validator=_check_threshold)
    release: ReleaseModel = attrs.field(default=ReleaseModel.ALL, converter=_to_release_model)
    max_hold_s: float | None = attrs.field(default=None, validator=_check_max_hold)
    gzip: bool = False
    _held: bytearray = attrs.field(factory=bytearray, init=False)
    _segments: deque[_Segment] = attrs.field(factory=deque, init=False)
    _compressor: zlib._Compress | None = attrs.field(default=None, init=False)
    # Arrival time of the oldest input still inside the compressor (gzip only).
    _unemitted_since: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.gzip:
            self._compressor = zlib.compressobj(wbits=31)

    @property
    def held_bytes(self) -> int:
        """Bytes currently held (compressed bytes in gzip mode)."""
        return len(self._held)

    @property
    def deadline(self) -> float | None:
        """Clock value at which ``max_hold_s`` forces a release, or None."""
        if self.max_hold_s is None:
            return None
        times = [self._segments[0].arrived_at] if self._segments else []
        if self._unemitted_since is not None:
            times.append(self._unemitted_since)
        return min(times) + self.max_hold_s if times else None

    def feed(self, data: bytes, now: float) -> Release | None:
        """Takes upstream bytes that arrived at ``now``; returns what must go out now."""
        if not data:
            return None
        if self._compressor is None:
            self._hold(data, now)
        else:
            if self._unemitted_since is None:
                self._unemitted_since = now
            out = self._compressor.compress(data)
            if out:
                self._hold(out, self._unemitted_since)
                # Part of this chunk may still sit in the compressor.
                self._unemitted_since = now
        if self._held and len(self._held) >= self.threshold_bytes:
            count = len(self._held)
            if self.release is ReleaseModel.BLOCKS and self.threshold_bytes > 0:
                count -= count % self.threshold_bytes
            return self._take(count, now, ReleaseReason.THRESHOLD)
        return self.due(now)

    def due(self, now: float) -> Release | None:
        """Releases everything held if the oldest byte has waited ``max_hold_s``."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        if self._compressor is not None and self._unemitted_since is not None:
            self._hold(self._compressor.flush(zlib.Z_SYNC_FLUSH), self._unemitted_since)
            self._unemitted_since = None
        return self._take(len(self._held), now, ReleaseReason.MAX_HOLD)

    def flush(self, now: float) -> Release | None:
        """Upstream EOF: finishes the gzip stream and releases everything held."""
        if self._compressor is not None:
            self._hold(self._compressor.flush(), self._unemitted_since or now)
            self._compressor = None
            self._unemitted_since = None
        return self._take(len(self._held), now, ReleaseReason.EOF)

    def _hold(self, data: bytes, arrived_at: float) -> None:
        if data:
            self._held += data
            self._segments.append(_Segment(arrived_at, len(data)))

    def _take(self, count: int, now: float, reason: ReleaseReason) -> Release | None:
        if count <= 0:
            return None
        held_ms = (now - self._segments[0].arrived_at) * 1000.0
        data = bytes(self._held[:count])
        del self._held[:count]
        remaining = count
        while remaining:
            segment = self._segments[0]
            if segment.size <= remaining:
                remaining -= segment.size
                self._segments.popleft()
            else:
                segment.size -= remaining
                remaining = 0
        return Release(data, round(held_ms, 1), reason)


def _check_upstream(_instance: object, _attribute: object, value: str) -> None:
    try:
        url = URL(value)
    except (TypeError, ValueError):
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"--upstream must be an http:// or https:// URL with a host, got {value!r}"
        )


@attrs.frozen
class ProxyConfig:
    """Settings of one emulated buffering proxy; invalid values raise ValueError."""

    upstream: str = attrs.field(validator=_check_upstream)
    threshold_bytes: int = attrs.field(default=4096, validator=_check_threshold)
    release: ReleaseModel = attrs.field(default=ReleaseModel.ALL, converter=_to_release_model)
    gzip: bool = False
    max_hold_s: float | None = attrs.field(default=None, validator=_check_max_hold)


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


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get(hdrs.CONNECTION, "")
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def _request_headers(
    headers: Mapping[str, str], *, strip_accept_encoding: bool
) -> CIMultiDict[str]:
    drop = _HOP_BY_HOP | _connection_tokens(headers) | {"host"}
    if strip_accept_encoding:
        drop |= {"accept-encoding"}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _response_headers(headers: Mapping[str, str], *, keep_length: bool) -> CIMultiDict[str]:
    drop = _HOP_BY_HOP | _connection_tokens(headers)
    if not keep_length:
        drop |= {"content-length"}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        key, _, qvalue = params.strip().partition("=")
        try:
            return key.strip().lower() != "q" or float(qvalue) > 0
        except ValueError:
            return False
    return False


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
                headers=_request_headers(request.headers, strip_accept_encoding=self.config.gzip),
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
            and _accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING, ""))
            and upstream.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() == "identity"
        )
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_response_headers(upstream.headers, keep_length=not has_body),
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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the ``flushline proxy`` options to ``parser``."""
    parser.add_argument("--upstream", required=True, help="base URL to forward to")
    parser.add_argument(
        "--threshold",
        type=int,
        default=4096,
        metavar="BYTES",
        help="hold body bytes until this many are held; 0 passes through (default 4096)",
    )
    parser.add_argument(
        "--release",
        choices=[m.value for m in ReleaseModel],
        default=ReleaseModel.ALL.value,
        help="'all' forwards everything held, 'blocks' only whole threshold blocks",
    )
    parser.add_argument(
        "--gzip", action="store_true", help="gzip the body; threshold counts compressed bytes"
    )
    parser.add_argument(
        "--max-hold-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="release held bytes after this long even below the threshold",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on")


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the proxy from parsed arguments until Ctrl-C or SIGTERM.

    Returns 0 after a clean stop, 2 for invalid option values, 1 if it cannot listen.
    """
    try:
        config = ProxyConfig(
            upstream=args.upstream,
            threshold_bytes=args.threshold,
            release=args.release,
            gzip=args.gzip,
            max_hold_s=args.max_hold_s,
        )
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    except ValueError as exc:
        print(f"flushline proxy: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(
            f"flushline proxy: cannot listen on --host {args.host} --port {args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


async def _serve(config: ProxyConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows; Ctrl-C then arrives as KeyboardInterrupt.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    proxy = BufferingProxy(config)
    await proxy.start(host, port)
    try:
        _log.info(
            "proxy_listening",
            url=proxy.url,
            upstream=config.upstream,
            threshold_bytes=config.threshold_bytes,
            release=str(config.release),
            gzip=config.gzip,
            max_hold_s=config.max_hold_s,
        )
        await stop.wait()
    finally:
        await proxy.close()
