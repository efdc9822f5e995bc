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

from app.web.server.limits import (
    CONNECTIONS,
    ConnectionTracker,
    check_room,
    derive_connection_cap,
    derive_max_connections,
    tune_stream_socket,
    user_timeout_s,
)
from app.web.server.listener import AcceptErrorLog, Listener
from app.web.server.protocol import (
    DECODED_CODINGS,
    FlushlineRequestHandler,
    FlushlineServer,
)
from app.web.server.runner import FlushlineRunner, run

__all__ = [
    "CONNECTIONS",
    "DECODED_CODINGS",
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
