"""The command line of ``flushline probe URL``: its arguments, and the run that prints
the report (human or ``--json``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping

import aiohttp
import orjson

from app.pathtools.probe.pattern import probe_pattern
from app.pathtools.probe.reader import ProbeError, run_probe
from app.pathtools.probe.report import DEFAULT_LATENCY_BUDGET_MS, report_json
from app.web.diagnostics import DiagnosticsPattern

__all__ = ["TOKEN_ENV", "configure_parser", "probe_token", "run_from_args"]

#: Where the probe finds the API token when ``--token`` is not given (the service's own
#: variable: a comma list, of which the probe sends the first).
TOKEN_ENV = "FLUSHLINE_API_TOKEN"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flushline probe``."""
    parser.add_argument("url", help="base URL of the Flushline service, as your users reach it")
    parser.add_argument(
        "--write-bytes",
        type=int,
        default=DiagnosticsPattern().write_bytes,
        help="size of the pattern's small writes (default 257, a prime; the large ones are 4x)",
    )
    parser.add_argument(
        "--interval-ms",
        type=int,
        default=DiagnosticsPattern().interval_ms,
        help="time between the pattern's writes (default 25)",
    )
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=16384,
        help="largest buffer size to detect (the pattern sends about 5 times this)",
    )
    parser.add_argument(
        "--latency-budget-ms",
        type=float,
        default=DEFAULT_LATENCY_BUDGET_MS,
        help="how late an event may arrive: a time hold within it needs no fix (default 500)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"API token of a service with auth on (default: the first of ${TOKEN_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def probe_token(given: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token to send: ``--token``, else the first of ``FLUSHLINE_API_TOKEN``."""
    if given:
        return given
    raw = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
    first = raw.split(",", 1)[0].strip()
    return first or None


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``flushline probe``; 0 on success, 1 if the stream could not be read."""
    pattern = probe_pattern(
        args.max_buffer, write_bytes=args.write_bytes, interval_ms=args.interval_ms
    )
    token = probe_token(args.token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        report = asyncio.run(
            run_probe(args.url, pattern, headers=headers, latency_budget_ms=args.latency_budget_ms)
        )
    except (ProbeError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"flushline probe: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(report_json(report), option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.render())
    return 0
