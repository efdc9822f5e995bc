"""The ``flushline`` command: ``serve`` (the default), ``proxy``, ``probe`` and ``watch``.

Each command is a thin wrapper: parsing arguments here, the work in its own module.
``python -m app`` and the ``flushline`` console script both call :func:`main`.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import structlog

from app import __version__

if TYPE_CHECKING:
    from aiohttp import web

    from app.core.settings import Settings

__all__ = ["build_parser", "main", "normalize_url"]

COMMANDS = ("serve", "proxy", "probe", "watch")
#: Arguments that belong to ``flushline`` itself rather than to the implied ``serve``.
_TOP_LEVEL = ("-h", "--help", "--version")
#: Bind failures that are the operator's to fix (not a bug): one line, exit status 2.
_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

log = structlog.get_logger(__name__)

_SERVE_DESCRIPTION = """\
Run the service. It is configured by FLUSHLINE_* environment variables
(config/reference.md); --host and --port win over the environment
(FLUSHLINE_HOST; PORT, then FLUSHLINE_PORT)."""


def _port(raw: str) -> int:
    """An argparse type: a TCP port from 1 to 65535."""
    try:
        port = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {raw!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, got {port}")
    return port


def normalize_url(raw: str) -> str:
    """``localhost:8080`` -> ``http://localhost:8080``; ``ValueError`` saying what is wrong."""
    text = raw.strip()
    if not text:
        raise ValueError("the URL is empty")
    if any(c.isspace() for c in text):
        raise ValueError(f"{raw!r} contains whitespace")
    if "://" not in text:
        text = "http://" + text
    url = urlsplit(text)
    if url.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{raw!r} has the scheme {url.scheme!r}; use http:// or https://")
    if not url.hostname:
        raise ValueError(f"{raw!r} has no host (expected e.g. localhost:8080)")
    try:
        url.port  # noqa: B018 (urlsplit checks the port only when it is read)
    except ValueError:
        port = url.netloc.rpartition(":")[2]
        raise ValueError(f"{raw!r} has an invalid port {port!r} (1-65535)") from None
    return text


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class FdLimit:
    """The process's descriptor limit (``RLIMIT_NOFILE``) after start-up raised it."""

    soft: int
    hard: int
    #: The soft limit the process started with.
    soft_before: int


def raise_fd_limit() -> FdLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit: every connection is a descriptor.

    An unlimited hard limit is not a value the kernel takes for the soft one (it is
    capped by ``fs.nr_open``); the soft limit then stays where it is.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            raised = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit", soft=soft, hard=hard, error=str(exc))
    return FdLimit(soft=raised, hard=hard, soft_before=soft)


def _startup_fields(
    app: web.Application,
    settings: Settings,
    fd_limit: FdLimit,
    max_connections: int,
    connection_cap: int,
) -> dict[str, Any]:
    """The effective settings of a started service, for its one start-up line."""
    from app.web.keys import MANAGER

    return {
        "version": __version__,
        "host": settings.host,
        "port": settings.port,
        "strategy": app[MANAGER].strategies[settings.strategy].describe(),
        "bus": settings.bus,
        "pipeline": settings.pipeline,
        "pipelines": sorted(app[MANAGER].pipelines),
        "auth": "on" if settings.api_tokens else "off",
        "allowed_hosts": None if settings.api_tokens else list(settings.allowed_hosts),
        "cors_origins": list(settings.cors_origins),
        "limits": {
            "max_active_jobs": settings.max_active_jobs,
            "max_body_bytes": settings.max_body_bytes,
            "history_limit": settings.history_limit,
            "subscriber_queue": settings.subscriber_queue,
            "send_timeout_s": settings.send_timeout_s,
            "job_ttl_s": settings.job_ttl_s,
            "max_retained_jobs": settings.max_retained_jobs,
            "retry_ms": settings.retry_ms,
            "max_connections": max_connections,
            "connection_cap": connection_cap,
            "header_timeout_s": settings.header_timeout_s,
        },
        "fd_limit": {
            "soft": fd_limit.soft,
            "hard": fd_limit.hard,
            "soft_before": fd_limit.soft_before,
        },
        "log_level": settings.log_level,
    }


def _drain_on_sigterm(grace_s: float) -> Callable[[web.Application], Awaitable[None]]:
    """An ``on_startup`` hook: SIGTERM drains the service, then stops it.

    aiohttp's own handler (the runner installs it before the app starts) would stop
    listening and cancel every job at once. Instead the
    service keeps answering (new jobs get ``503`` with ``Retry-After``, and with Redis its
    streams hand over to the other instances), gives running jobs ``grace_s`` to finish,
    ends the rest, then stops as on SIGINT.
    """
    import asyncio
    import signal

    from app.web.keys import MANAGER

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def drain() -> None:
            try:
                await app[MANAGER].drain(grace_s)
            except Exception:
                log.exception("draining failed")
            finally:
                loop.call_soon(_graceful_exit)

        def on_sigterm() -> None:
            if not tasks:  # a second SIGTERM changes nothing: the drain is under way
                tasks.add(loop.create_task(drain(), name="drain"))

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    return install


def _graceful_exit() -> None:
    """Stop ``server.run`` as aiohttp's signal handler does (``GracefulExit``: a SystemExit)."""
    from aiohttp import web

    raise web.GracefulExit()


def _serve(args: argparse.Namespace) -> int:
    from app.core.logs import configure_logging
    from app.core.settings import Settings, SettingsError, unknown_variables
    from app.web import server
    from app.web.factory import StartupError, init_app

    try:
        settings = Settings.from_environ()
    except SettingsError as exc:
        print(f"flushline: {exc}", file=sys.stderr)
        return 2
    flags = {"host": args.host, "port": args.port}
    settings = attrs.evolve(settings, **{k: v for k, v in flags.items() if v is not None})
    exposure = settings.exposure_error()
    if exposure is not None:
        # Before logging is configured: this line is the whole answer (exit 2).
        shown = "--host" if args.host is not None else "FLUSHLINE_HOST"
        print(f"flushline: {str(exposure).replace('FLUSHLINE_HOST', shown, 1)}", file=sys.stderr)
        return 2
    json_logs = configure_logging(settings.log_level, settings.log_format) == "json"

    def fail(message: str, **fields: Any) -> int:
        # One line either way: a JSON object for a log pipeline, plain text for a person.
        if json_logs:
            log.error(message, **fields)
        else:
            print(f"flushline: {message}", file=sys.stderr)
        return 2

    for unknown in unknown_variables():
        hint = {"hint": f"did you mean {unknown.suggestion}?"} if unknown.suggestion else {}
        log.warning("unknown variable ignored", variable=unknown.name, **hint)
    try:
        app = init_app(settings)
    except ValueError as exc:
        return fail(str(exc))
    app.on_startup.append(_drain_on_sigterm(settings.shutdown_grace_s))
    address = _address(settings.host, settings.port)
    fd_limit = raise_fd_limit()
    max_connections = settings.max_connections or server.derive_max_connections(fd_limit.soft)
    cap = server.derive_connection_cap(fd_limit.soft)
    if max_connections > cap:
        log.warning(
            "FLUSHLINE_MAX_CONNECTIONS is above what the descriptor limit allows",
            max_connections=max_connections,
            connection_cap=cap,
            fd_limit=fd_limit.soft,
        )
    try:
        server.run(
            app,
            host=settings.host,
            port=settings.port,
            tracker=server.ConnectionTracker(limit=max_connections),
            cap=cap,
            header_timeout_s=settings.header_timeout_s,
            # Called once the socket listens: the start-up line.
            on_listening=lambda: log.info(
                "serving", **_startup_fields(app, settings, fd_limit, max_connections, cap)
            ),
            shutdown_timeout_s=10.0,
        )
    except StartupError as exc:  # e.g. Redis unreachable (FLUSHLINE_BUS=redis)
        return fail(str(exc))
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            reason = str(exc.strerror).lower()
        elif exc.errno in _LISTEN_ERRNOS:
            reason = os.strerror(exc.errno or 0).lower()
        else:
            raise
        return fail(
            f"cannot listen on {address}: {reason}",
            host=settings.host,
            port=settings.port,
            reason=reason,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="flushline",
        description="Stream live job progress over SSE through buffering proxies. "
        "Without a command, runs `serve`.",
    )
    parser.add_argument(
        "--version", action="version", version=f"flushline {__version__}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the service (FLUSHLINE_* variables; --host/--port win over them)",
        description=_SERVE_DESCRIPTION,
    )
    serve.add_argument(
        "--host",
        help="address to listen on; wins over FLUSHLINE_HOST (default 127.0.0.1; any other "
        "address needs FLUSHLINE_API_TOKEN or FLUSHLINE_AUTH=off)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        help="port to listen on; wins over PORT and FLUSHLINE_PORT (default 8080)",
    )
    from app.pathtools import probe, watch
    from app.pathtools.proxy import command as proxy

    proxy.configure_parser(
        commands.add_parser(
            "proxy", help="run a buffering reverse proxy, to reproduce proxy buffering"
        )
    )
    probe.configure_parser(
        commands.add_parser("probe", help="measure how the path to a service buffers a stream")
    )
    watch.configure_parser(
        commands.add_parser("watch", help="print a job stream's events with their arrival lag")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flushline`` console script and of ``python -m app``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, *_TOP_LEVEL):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    if args.command in ("probe", "watch"):
        try:
            args.url = normalize_url(args.url)
        except ValueError as exc:
            print(f"flushline {args.command}: invalid URL: {exc}", file=sys.stderr)
            return 2
    if args.command in ("proxy", "probe", "watch"):
        from app.core.logs import configure_logging

        configure_logging("info", "auto")
    if args.command == "proxy":
        from app.pathtools.proxy import command as proxy

        return proxy.run_from_args(args)
    if args.command == "probe":
        from app.pathtools import probe

        return probe.run_from_args(args)
    if args.command == "watch":
        from app.pathtools import watch

        return watch.run_from_args(args)
    return _serve(args)
