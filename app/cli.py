"""The ``flushline`` command: ``serve`` (the default), ``proxy``, ``probe`` and ``watch``.

Each command is a thin wrapper: parsing arguments here, the work in its own module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

COMMANDS = ("serve", "proxy", "probe", "watch")


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from app.core.logs import configure_logging
    from app.core.settings import Settings, SettingsError
    from app.web.factory import init_app

    try:
        settings = Settings.from_environ()
    except SettingsError as exc:
        print(f"flushline: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = init_app(settings)
    except ValueError as exc:
        print(f"flushline: {exc}", file=sys.stderr)
        return 2
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        access_log=None,
        print=lambda msg: print(msg, file=sys.stderr),
        shutdown_timeout=10.0,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="flushline",
        description="Stream live job progress over SSE through buffering proxies.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the service (configured by FLUSHLINE_* variables)")
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
    """Entry point of the ``flushline`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
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
