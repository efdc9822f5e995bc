"""Accepting connections without asyncio's accept loop, which stalls when descriptors run out."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

import attrs
import structlog

from app.web.server.protocol import FlushlineServer

__all__ = [
    "ACCEPT_BATCH",
    "ROOM_RETRY_S",
    "AcceptErrorLog",
    "Listener",
]

log = structlog.get_logger(__name__)

#: Connections accepted at most per wake-up of a listening socket (others get a turn).
ACCEPT_BATCH = 128
#: At the cap, accepting resumes this long after idle connections were closed.
ROOM_RETRY_S = 0.02
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
                self.server.tracker.accept_errors += 1
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
