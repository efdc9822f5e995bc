"""Connection limits (the tracker streams ask for room); dead-peer socket timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

import attrs
import structlog
from aiohttp import web

from app.core.errors import TooManyConnections

__all__ = [
    "CONNECTIONS",
    "FULL_RETRY_AFTER_S",
    "ConnectionTracker",
    "check_room",
    "derive_connection_cap",
    "derive_max_connections",
    "tune_stream_socket",
    "user_timeout_s",
]

log = structlog.get_logger(__name__)

#: ``Retry-After`` of a stream refused because the server is full.
FULL_RETRY_AFTER_S = 2


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
    #: ``accept()`` calls that failed (out of descriptors or buffers).
    accept_errors: int = 0

    @property
    def full(self) -> bool:
        """Whether the open connections (the asking one included) are past the limit."""
        return self.open > self.limit


#: Open connections of the server running the app; absent when the app runs under
#: another server (e.g. a test client).
CONNECTIONS = web.AppKey("connections", ConnectionTracker)


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
