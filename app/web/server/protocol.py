"""The connection protocol: a header timeout, and parser errors answered in JSON."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from aiohttp import http_exceptions, streams, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from app.web.middleware import SERVER_HEADERS, error_response
from app.web.server.limits import ConnectionTracker

__all__ = [
    "DECODED_CODINGS",
    "SHED_GRACE_S",
    "FlushlineRequestHandler",
    "FlushlineServer",
]

log = structlog.get_logger(__name__)

#: At the cap, a silent connection that has waited this long for a head may be closed to
#: make room: any real client sends its head at once.
SHED_GRACE_S = 0.5
#: The codings aiohttp decodes (``br`` and ``zstd`` only with their libraries; without
#: them the parser refuses the head, see ``handle_error``). Any other is passed through
#: undecoded, so it is refused here.
DECODED_CODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})
#: A well-formed request line: its method is a token, just not one we implement (501).
_REQUEST_LINE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/1\.[01]$")
_QUOTED_LINE = re.compile(r"b'([^'\\]*)'")


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
        #: The body of the newest request head parsed, while the parser feeds it.
        self._body: streams.StreamReader | None = None

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
        queued = len(self._messages)
        super().data_received(data)
        self._hand_body_errors_to_the_body(queued)

    def _hand_body_errors_to_the_body(self, queued: int) -> None:
        """Fail the body being read with a parser error found in it, not queue the error.

        aiohttp's C parser, meeting a bad chunk in a later read, raises without failing
        the body it was feeding; aiohttp then queues the error as the next request's, to
        be answered after the current one, whose handler waits for the rest of its body
        forever. The body is failed here as the pure-Python parser fails it, so the
        reader gets ``RequestPayloadError`` (``_read_body`` answers ``400``).
        """
        for entry in list(itertools.islice(self._messages, queued, None)):
            message, payload = entry
            if isinstance(message, RawRequestMessage):
                self._body = payload
                continue
            body = self._body
            if isinstance(message, _ErrInfo) and body is not None and not body.is_eof():
                self._body = None
                self._messages.remove(entry)
                error = RequestPayloadError(str(message.exc))
                error.__cause__ = message.exc
                body.set_exception(error)

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
        from the request's cache. A plain ``Content-Length`` body is left to the app,
        which reads it under the same timeout (``app.web.api``), inside its request
        log line (a client that leaves mid-body is a ``client_gone`` there).
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
            return None  # a plain body the app reads itself, under the same timeout
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
