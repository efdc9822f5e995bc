"""The HTTP server around the app: connection limits, a header timeout, JSON parser errors.

``web.run_app`` builds its own ``AppRunner`` and ``web.Server`` and offers no way to pick
the protocol class, so ``flushline serve`` runs the app with :func:`run`, a trimmed copy
of ``run_app`` over :class:`FlushlineRunner`. The seam is ``AppRunner._make_server``: the
one method by which aiohttp's runners differ, called once from ``setup()`` right after
the app's start-up. It returns a :class:`FlushlineServer`, whose ``connection_made`` and
``connection_lost`` (the calls every ``RequestHandler`` makes to its server) count the
open connections, and whose protocol is :class:`FlushlineRequestHandler`:

- a connection that has not sent a complete request head within ``header_timeout_s`` of
  opening, or of its previous response, is closed (with a ``408`` when it sent part of
  one), so clients that drip headers cannot hold descriptors;
- errors the HTTP parser finds (head too large, bad chunk, unknown method, an encoding
  that cannot be decoded) are answered in the contract's JSON error shape, as are request
  bodies that cannot be read (read here, before the app, within the header timeout).

Connections are accepted by a :class:`Listener` (``loop.connect_accepted_socket``), not by
asyncio's accept loop, which stops for a second whenever descriptors run out: at its cap
(the descriptor limit less a reserve) it closes idle connections to make room and
accepts again at once, so ``/healthz`` is not stuck in the backlog behind idle clients.

The app finds the counts at ``app[CONNECTIONS]``; streams and long-polls ask
:func:`check_room` before they start. Under another server (a test client) there is
no tracker and no limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import attrs
import orjson
import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from app.core.errors import TooManyConnections
from app.web.keys import CONNECTIONS
from app.web.middleware import error_response

__all__ = [
    "SHED_GRACE_S",
    "AcceptErrorLog",
    "ConnectionTracker",
    "FlushlineRequestHandler",
    "FlushlineRunner",
    "FlushlineServer",
    "Listener",
    "check_room",
    "derive_connection_cap",
    "derive_max_connections",
    "run",
    "tune_stream_socket",
    "user_timeout_s",
]

log = structlog.get_logger(__name__)

#: At the cap, a silent connection that has waited this long for a head may be closed to
#: make room: any real client sends its head at once.
SHED_GRACE_S = 0.5
#: Connections accepted at most per wake-up of a listening socket (others get a turn).
ACCEPT_BATCH = 128
#: At the cap, accepting resumes this long after idle connections were closed.
ROOM_RETRY_S = 0.02
#: ``Retry-After`` of a stream refused because the server is full.
FULL_RETRY_AFTER_S = 2
#: Idle keep-alive connections are closed by the header timeout first; this is aiohttp's.
KEEPALIVE_TIMEOUT_S = 75.0
#: Headers every answer built here carries (the app adds them to its own answers).
SERVER_HEADERS = {"Server": "flushline", "X-Content-Type-Options": "nosniff"}
#: The codings aiohttp decodes (``br`` and ``zstd`` only with their libraries; without
#: them the parser refuses the head, see ``handle_error``). Any other is passed through
#: undecoded, so it is refused here.
DECODED_CODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: A well-formed request line: its method is a token, just not one we implement (501).
_REQUEST_LINE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/1\.[01]$")
_QUOTED_LINE = re.compile(r"b'([^'\\]*)'")


def derive_max_connections(nofile: int) -> int:
    """The default ``max_connections`` for a descriptor limit of ``nofile``.

    The head-room (an eighth of the limit, at least 64) is for everything else that needs
    a descriptor: the listening socket, logs, Redis, outgoing LLM calls, and the
    ``/healthz`` and API requests that arrive while the streams fill the rest.
    """
    return max(16, nofile - max(64, nofile // 8))


def derive_connection_cap(nofile: int) -> int:
    """How many connections may hold a descriptor at once: the limit less a reserve.

    The listener stops accepting there (and makes room by closing idle connections), so
    ``accept()`` never fails for want of descriptors: asyncio would then stop accepting
    for a whole second.
    """
    return max(8, nofile - max(32, nofile // 16))


@attrs.define
class ConnectionTracker:
    """Counts the server's open connections against ``FLUSHLINE_MAX_CONNECTIONS``."""

    #: Connections beyond this many get no new stream (``503``).
    limit: int
    open: int = 0
    #: Streams and long-polls refused because the server was full.
    refused: int = 0
    #: Connections closed because their request head did not arrive in time.
    header_timeouts: int = 0
    #: Idle connections closed early to make room at the cap.
    shed: int = 0

    @property
    def full(self) -> bool:
        """Whether the open connections (the asking one included) are past the limit."""
        return self.open > self.limit


def check_room(request: web.Request) -> None:
    """Raise :class:`TooManyConnections` for a new stream or long-poll past the limit."""
    tracker = request.app.get(CONNECTIONS)
    if tracker is not None and tracker.full:
        tracker.refused += 1
        raise TooManyConnections(tracker.open, tracker.limit, FULL_RETRY_AFTER_S)


def user_timeout_s(send_timeout_s: float) -> float:
    """The stream socket's ``TCP_USER_TIMEOUT``: the send timeout and a margin.

    The kernel applies it to a reader that stopped reading too (zero-window probes), and
    its clock starts when the window closes, before a write blocks. The margin lets the
    send timeout cut a live, stalled reader first (logged ``send_timeout``, resumable)
    and leaves the kernel the peers that are gone.
    """
    return send_timeout_s + max(2.0, send_timeout_s / 2)


def tune_stream_socket(transport: asyncio.BaseTransport | None, send_timeout_s: float) -> None:
    """Make the kernel drop a stream whose peer vanished, even on a quiet stream.

    ``TCP_USER_TIMEOUT`` (:func:`user_timeout_s`) bounds how long written data (a
    heartbeat, say) may stay unacknowledged; keep-alive probes (after half the send
    timeout of silence, then three more within the rest) catch a dead peer with nothing
    in flight. Linux only; elsewhere only ``SO_KEEPALIVE``.
    """
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    timeout_s = max(send_timeout_s, 2.0)
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    if sys.platform.startswith("linux"):
        options += [
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s(timeout_s) * 1000)),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(timeout_s / 2))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(timeout_s / 6))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        ]
    with contextlib.suppress(OSError):  # the peer may be gone already
        for level, option, value in options:
            sock.setsockopt(level, option, value)


@attrs.define
class AcceptErrorLog:
    """Accept trouble (out of descriptors, at the cap) logged once a second at most.

    asyncio's own accept loop logs every failed ``accept()`` with a traceback and retries
    up to the backlog each time: thousands of lines a second. :class:`Listener` reports
    here instead; one line a second, with the count suppressed in between, says the same.
    As the loop's exception handler it also catches asyncio's (other servers in the
    process); anything else goes to the default handler.
    """

    interval_s: float = 1.0
    _last_at: float = float("-inf")
    _suppressed: int = 0

    def report(self, message: str, **fields: Any) -> None:
        """Log ``message`` unless a line went out less than ``interval_s`` ago."""
        now = asyncio.get_running_loop().time()
        if now - self._last_at < self.interval_s:
            self._suppressed += 1
            return
        log.error(message, suppressed=self._suppressed, **fields)
        self._last_at, self._suppressed = now, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS and "socket" in context:
            self.report("cannot accept connections", reason=os.strerror(exc.errno or 0).lower())
        else:
            loop.default_exception_handler(context)


def _raw_error(status: int, code: str, message: str) -> bytes:
    """A complete ``Connection: close`` answer, for a connection with no request object."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in SERVER_HEADERS.items())
        + "\r\n"
    )
    return head.encode("ascii") + body


def _parser_error(exc: BaseException | None, status: int) -> tuple[int, str, str]:
    """The status, code and message of an error found before the app saw the request."""
    if isinstance(exc, http_exceptions.LineTooLong) or (
        isinstance(exc, http_exceptions.BadHttpMessage)
        and "too many headers" in exc.message.lower()
    ):
        # 431 rather than 400: it names the size, not the syntax, as the cause, and the
        # parser does not tell the request line from a header field (both 8190 bytes).
        return (
            431,
            "header_too_large",
            "the request line, a header or the number of headers is too large",
        )
    if isinstance(exc, http_exceptions.ContentEncodingError):
        return 415, "unsupported_encoding", "this Content-Encoding cannot be decoded here"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        # The C parser leaves ``line`` empty and quotes the line in its message.
        quoted = _QUOTED_LINE.search(str(exc.message))
        line = exc.line or (quoted.group(1) if quoted else "")
        if _REQUEST_LINE.match(line):
            method = line.split(" ", 1)[0]
            return 501, "method_not_implemented", f"method {method[:32]!r} is not implemented"
        return 400, "bad_request", "malformed request line"
    if isinstance(exc, http_exceptions.HttpProcessingError):
        first = str(exc.message).strip().splitlines()[0] if exc.message else "bad request"
        return exc.code or 400, "bad_request", f"malformed request: {first.rstrip(':')[:200]}"
    if status >= 500:
        return status, "internal_error", "internal error; see the server log"
    return status, "bad_request", "bad request"


class FlushlineRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with a header timeout and JSON parser errors."""

    def __init__(self, manager: FlushlineServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # The base class drops its reference to the server when the connection is lost.
        self._owner = manager
        self._head_timer: asyncio.TimerHandle | None = None
        #: Bytes received of a head not complete yet.
        self.head_bytes = 0
        self._head_tail = b""  # the last bytes seen, for a blank line split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection, then start waiting for its first request head."""
        super().connection_made(transport)
        self.await_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the header timer; the server uncounts the connection."""
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Note bytes of a head still incomplete (a timeout then answers ``408``).

        A head counts as complete at its blank line, before its handler starts (which
        may be later under load): a complete head is never cut or shed as a dripping one.
        """
        if self._head_timer is not None:
            self.head_bytes += len(data)
            seen = self._head_tail + data
            if b"\r\n\r\n" in seen:
                self.head_received()
            else:
                self._head_tail = seen[-3:]
        super().data_received(data)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """After each answer on a kept-alive connection, the next head has its timeout."""
        answered, reset = await super().finish_response(request, resp, start_time)
        if not reset and answered.keep_alive and self.transport is not None:
            self.await_head()
        return answered, reset

    def await_head(self) -> None:
        """Start (again) the wait for a request head, bounded by the header timeout."""
        self._stop_head_timer()
        self.head_bytes = 0
        self._head_tail = b""
        self._head_timer = self._owner.loop.call_later(
            self._owner.header_timeout_s, self._head_timed_out
        )
        self._owner.waiting_for_head(self)

    def head_received(self) -> None:
        """A complete request head arrived: its handler runs, unbounded by the timeout."""
        self._stop_head_timer()
        self._owner.head_done(self)

    def drop_idle(self) -> None:
        """Close a connection that has no complete head (``408`` if it sent part of one)."""
        self.head_received()
        if self.transport is not None and self.head_bytes:
            self.transport.write(
                _raw_error(408, "request_timeout", "the request head did not arrive in time")
            )
        self.force_close()  # closes the transport once the 408 is flushed

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._owner.tracker.header_timeouts += 1
        self.drop_idle()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's error log, without the bodies already answered ``400`` here.

        After such an answer aiohttp still tries to read the rest of the body (to close
        cleanly), meets the same error again and would log it with a traceback.
        """
        if isinstance(kw.get("exc_info"), RequestPayloadError):
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The contract's JSON error for what the parser (or aiohttp itself) refused.

        aiohttp answers these in plain text and logs each with a traceback; a bad
        request from the internet is no server error, so it gets one info line.
        """
        self._stop_head_timer()
        status, code, text = _parser_error(exc, status)
        if status >= 500 and not isinstance(exc, http_exceptions.HttpProcessingError):
            log.error("request failed before the app", status=status, exc_info=exc)
        else:
            log.info("bad request", status=status, code=code, remote=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is dropped")
        response = error_response(status, code, text, dict(SERVER_HEADERS))
        response.force_close()
        return response


class FlushlineServer(web.Server):
    """aiohttp's server, counting its connections and bounding the wait for heads."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        tracker: ConnectionTracker,
        header_timeout_s: float,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        handler_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation")
        }
        super().__init__(self._wrap(handler), loop=loop, **kwargs)
        self.tracker = tracker
        self.header_timeout_s = header_timeout_s
        self.loop = loop
        self._protocol_kwargs = handler_kwargs
        #: Connections waiting for a head, oldest first, with the time they began.
        self._waiting: dict[FlushlineRequestHandler, float] = {}

    def __call__(self) -> RequestHandler:
        """A new connection's protocol."""
        return FlushlineRequestHandler(self, loop=self.loop, **self._protocol_kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Count it."""
        super().connection_made(handler, transport)
        self.tracker.open += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        """Uncount it."""
        super().connection_lost(handler, exc)
        self.tracker.open -= 1
        if isinstance(handler, FlushlineRequestHandler):
            self._waiting.pop(handler, None)

    def waiting_for_head(self, handler: FlushlineRequestHandler) -> None:
        """``handler`` waits for a head from now on (it becomes the newest waiting)."""
        self._waiting.pop(handler, None)
        self._waiting[handler] = self.loop.time()

    def head_done(self, handler: FlushlineRequestHandler) -> None:
        """``handler`` no longer waits for a head."""
        self._waiting.pop(handler, None)

    def shed_idle(self, count: int) -> int:
        """Close up to ``count`` connections without a request in progress; how many.

        First those that sent part of a head, longest waiting first (no real client
        drips its head), then silent ones (idle keep-alive included) that have waited
        :data:`SHED_GRACE_S`. A connection just accepted whose head is unread yet is
        never among them.
        """
        now = self.loop.time()
        partial = [h for h in self._waiting if h.head_bytes > 0]
        silent = [
            h
            for h, since in self._waiting.items()
            if not h.head_bytes and now - since >= SHED_GRACE_S
        ]
        chosen = (partial + silent)[:count]
        for handler in chosen:
            handler.drop_idle()
        self.tracker.shed += len(chosen)
        return len(chosen)

    def _wrap(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            if isinstance(protocol, FlushlineRequestHandler):
                protocol.head_received()
            refusal = await self._read_body(request)
            return refusal if refusal is not None else await handler(request)

        return handle

    async def _read_body(self, request: web.BaseRequest) -> web.Response | None:
        """Read an encoded or chunked body before the app, or the JSON error saying why not.

        A body that cannot be decoded (``gzip`` that is not), a bad chunk arriving after
        the head, or one longer than the app accepts then gets its 4xx here, never a
        500 from the handler; such a body must also arrive within the header timeout.
        Bodies are small (``FLUSHLINE_MAX_BODY_BYTES``); the app reads the same bytes
        from the request's cache. A plain ``Content-Length`` body is left to the app.
        """
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in DECODED_CODINGS:
            return self._refuse(
                415,
                "unsupported_encoding",
                f"Content-Encoding {coding[:40]!r} is not supported; "
                "send gzip, deflate or no encoding",
            )
        if coding == "identity" and "chunked" not in request.headers.get("Transfer-Encoding", ""):
            return None  # a plain body the app reads itself: nothing to fail before it
        try:
            async with asyncio.timeout(self.header_timeout_s):
                await request.read()
        except TimeoutError:
            return self._refuse(408, "request_timeout", "the request body did not arrive in time")
        except web.HTTPRequestEntityTooLarge as exc:
            return self._refuse(413, "body_too_large", f"request body too large: {exc.text}")
        except RequestPayloadError as exc:
            if isinstance(exc.__cause__, http_exceptions.ContentEncodingError):
                return self._refuse(400, "invalid_body", f"the body is not valid {coding} data")
            _, _, message = _parser_error(exc.__cause__ or exc, 400)
            return self._refuse(400, "bad_request", message)
        return None

    @staticmethod
    def _refuse(status: int, code: str, message: str) -> web.Response:
        log.info("bad request", status=status, code=code)
        response = error_response(status, code, message, dict(SERVER_HEADERS))
        response.force_close()  # what is left of the body is not read
        return response


@attrs.define
class Listener:
    """Accepts connections for a :class:`FlushlineServer`, never past ``cap`` of them.

    asyncio's accept loop (``loop.create_server``) accepts until ``accept()`` fails with
    ``EMFILE``, then stops accepting for a second: behind a crowd of idle clients the
    next ``/healthz`` then waits seconds in the backlog. Here, at the cap, the listener
    closes idle connections to make room (:meth:`FlushlineServer.shed_idle`) and
    resumes moments later, once their descriptors are free; a failed ``accept()`` is
    logged once a second at most.
    """

    server: FlushlineServer
    cap: int
    accept_log: AcceptErrorLog
    backlog: int = 1024
    _sockets: list[socket.socket] = attrs.field(factory=list)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set)
    #: Accepted, not yet counted by the server (their transport is being made).
    _pending: int = 0
    _resume: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on every address of ``host`` (as ``create_server`` does); ``OSError`` if not."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self.backlog)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._listen()

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        self._pause()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    async def wait_closed(self) -> None:
        """Wait for connections accepted before :meth:`close` to reach the server."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _listen(self) -> None:
        self._resume = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self, resume_after_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if resume_after_s is not None:
            self._resume = loop.call_later(resume_after_s, self._listen)

    def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if self.server.tracker.open + self._pending >= self.cap:
                self._make_room()
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self.accept_log.report(
                        "cannot accept connections", reason=os.strerror(exc.errno or 0).lower()
                    )
                    self._make_room()
                else:
                    log.warning("accept failed", error=str(exc))
                return
            conn.setblocking(False)
            self._pending += 1
            task = loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _make_room(self) -> None:
        """At the cap: close idle connections, and accept again once they are gone."""
        if not self.server.shed_idle(max(1, self.cap // 16)):
            self.accept_log.report(
                "connection cap reached",
                open=self.server.tracker.open,
                cap=self.cap,
                hint="every connection is busy; raise the descriptor limit",
            )
        self._pause(resume_after_s=ROOM_RETRY_S)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.server, conn)
        except OSError:
            conn.close()  # the client left already
        finally:
            self._pending -= 1


class FlushlineRunner(web.AppRunner):
    """``AppRunner`` serving the app through a :class:`FlushlineServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        tracker: ConnectionTracker,
        header_timeout_s: float,
        shutdown_timeout_s: float,
    ) -> None:
        super().__init__(
            app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout_s
        )
        self._tracker = tracker
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        # The base runs the app's start-up and freezes it; its server, never started, only
        # lends us the app's handler and request factory.
        app_server = await super()._make_server()
        return FlushlineServer(
            app_server.request_handler,
            tracker=self._tracker,
            header_timeout_s=self._header_timeout_s,
            loop=asyncio.get_running_loop(),
            request_factory=app_server.request_factory,
            handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            access_log=None,
        )


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    tracker: ConnectionTracker,
    cap: int,
    header_timeout_s: float,
    on_listening: Callable[[], None],
    shutdown_timeout_s: float = 10.0,
    backlog: int = 1024,
) -> None:
    """Serve ``app`` until SIGINT or ``web.GracefulExit``, as ``web.run_app`` does.

    At most ``cap`` connections at once (:class:`Listener`); past ``tracker.limit``
    new streams are refused.

    ``app[CONNECTIONS]`` is set before the app starts (it freezes then). Start-up errors
    and bind errors (``OSError``) propagate, as from ``run_app``.
    """
    app[CONNECTIONS] = tracker
    loop = asyncio.new_event_loop()
    accept_log = AcceptErrorLog()
    loop.set_exception_handler(accept_log)
    runner = FlushlineRunner(
        app,
        tracker=tracker,
        header_timeout_s=header_timeout_s,
        shutdown_timeout_s=shutdown_timeout_s,
    )

    async def serve() -> None:
        await runner.setup()
        listener: Listener | None = None
        try:
            assert isinstance(runner.server, FlushlineServer)
            listener = Listener(runner.server, cap, accept_log, backlog)
            await listener.start(host, port)
            on_listening()
            await asyncio.Event().wait()  # until cancelled
        finally:
            if listener is not None:
                listener.close()
                await listener.wait_closed()
            await runner.cleanup()

    main = loop.create_task(serve())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
