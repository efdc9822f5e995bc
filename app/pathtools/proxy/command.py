"""``flushline proxy``: run the buffering proxy emulator from the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import structlog

from app.pathtools.proxy.config import ProxyConfig
from app.pathtools.proxy.release import ReleaseModel
from app.pathtools.proxy.server import BufferingProxy

__all__ = ["configure_parser", "run_from_args"]

_log = structlog.get_logger(__name__)


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
