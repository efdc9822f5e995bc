"""Running the app: ``run``, a trimmed ``web.run_app`` over :class:`FlushlineRunner`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from aiohttp import web

from app.web.server.limits import CONNECTIONS, ConnectionTracker
from app.web.server.listener import AcceptErrorLog, Listener
from app.web.server.protocol import FlushlineServer

__all__ = [
    "KEEPALIVE_TIMEOUT_S",
    "FlushlineRunner",
    "run",
]

log = structlog.get_logger(__name__)

#: Idle keep-alive connections are closed by the header timeout first; this is aiohttp's.
KEEPALIVE_TIMEOUT_S = 75.0


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
