"""``flushline probe URL``: measure how the path to a Flushline service delivers a stream.

The probe reads ``/api/diagnostics/stream`` (see ``app.web.diagnostics``) through whatever
sits between the user and the service and works out from *when* and *how many* bytes
arrived:

* whether the path buffers (pattern writes arrive late, in groups),
* its buffer size and release model: every write ends at a multiple of ``write_bytes``
  (a prime, 257), so a path that releases whole blocks of ``B`` bytes ("blocks")
  releases at offsets that are multiples of ``B`` and not of 257, while a path that
  releases everything once it holds ``B`` ("all") releases at write boundaries every
  ``ceil(B / 257)`` writes,
* whether it compresses (``Content-Encoding``), how long it held the headers, and
  whether it also flushes on a timer (bytes released during the final pause),

and prints the settings to use.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from collections.abc import Sequence

import aiohttp
import attrs
import orjson

from app.web.diagnostics import DiagnosticsPattern

__all__ = ["ProbeReport", "Read", "analyse", "configure_parser", "run_from_args", "run_probe"]

DIAGNOSTICS_PATH = "/api/diagnostics/stream"


@attrs.frozen
class Read:
    """One read from the socket: when (seconds after the request) and how many body bytes
    had arrived in total by then."""

    at_s: float
    total: int


@attrs.frozen
class ProbeReport:
    """What the probe found out about the path."""

    url: str
    status: int
    content_encoding: str | None
    headers_after_ms: float
    headers_held: bool
    buffered: bool
    release_model: str  # "none", "all", "blocks" or "unknown"
    buffer_bytes: int | None
    buffer_range: tuple[int, int] | None
    timer_flush_s: float | None
    release_sizes: tuple[int, ...]
    held_share: float
    max_lag_ms: float
    total_bytes: int

    @property
    def compressed(self) -> bool:
        """Whether the path compresses the stream."""
        return self.content_encoding not in (None, "", "identity")

    def settings(self) -> dict[str, str]:
        """The environment to run Flushline with on this path."""
        if self.compressed or (self.buffered and self.buffer_bytes is None):
            return {}
        if not self.buffered:
            return {"FLUSHLINE_STRATEGY": "aligned", "FLUSHLINE_PROXY_BUFFER_BYTES": "0"}
        return {
            "FLUSHLINE_STRATEGY": "aligned",
            "FLUSHLINE_PROXY_BUFFER_BYTES": str(self.buffer_bytes),
            "FLUSHLINE_MAX_DELAY_MS": "100",
        }

    def render(self) -> str:
        """A human-readable report with the settings to use."""
        lines = [f"probe of {self.url}: HTTP {self.status}, {self.total_bytes} body bytes"]
        lines.append(
            f"headers:     arrived after {self.headers_after_ms:.0f} ms"
            + (" (held back by the path until its first release)" if self.headers_held else "")
        )
        lines.append(f"compression: {self.content_encoding or 'none'}")
        if self.buffered:
            size = f"{self.buffer_bytes} bytes" if self.buffer_bytes else "unknown size"
            if self.buffer_range and self.release_model == "all":
                size += f" (between {self.buffer_range[0]} and {self.buffer_range[1]})"
            lines.append(f"buffering:   yes, {size}, release model '{self.release_model}'")
            lines.append(
                f"             {self.held_share:.0%} of writes held, up to {self.max_lag_ms:.0f} ms"
            )
        else:
            lines.append(f"buffering:   none seen (max lag {self.max_lag_ms:.0f} ms)")
        if self.timer_flush_s is not None:
            lines.append(f"timer flush: held bytes released after about {self.timer_flush_s:.1f} s")
        lines.append("")
        if self.compressed:
            lines += [
                "The path compresses the stream: padding compresses to almost nothing, so no",
                "strategy can force a flush. Turn compression off for text/event-stream",
                "(nginx: drop text/event-stream from gzip_types, or `gzip off;` in the stream",
                "location), or make the proxy honour `Cache-Control: no-transform`.",
            ]
        elif not self.buffered:
            lines += ["The path does not buffer. Use:", ""]
        elif self.buffer_bytes is None:
            lines += [
                "The path buffers more than this pattern sent, so its size is unknown:",
                "run the probe again with a larger --max-buffer (e.g. 65536).",
            ]
        else:
            lines += ["The path buffers. Use:", ""]
        lines += [f"  {name}={value}" for name, value in self.settings().items()]
        return "\n".join(lines)


def _power_of_two_in(low: int, high: int) -> int | None:
    value = 1
    while value <= high:
        if value >= low:
            return value
        value *= 2
    return None


def _release_points(reads: Sequence[Read], gap_s: float) -> list[Read]:
    """The last read of each burst (reads closer than ``gap_s`` form one burst)."""
    points: list[Read] = []
    for i, read in enumerate(reads):
        if i + 1 == len(reads) or reads[i + 1].at_s - read.at_s > gap_s:
            points.append(read)
    return points


def analyse(
    reads: Sequence[Read],
    pattern: DiagnosticsPattern,
    *,
    headers_at_s: float,
    url: str = "",
    status: int = 200,
    content_encoding: str | None = None,
) -> ProbeReport:
    """Infer the path's behaviour from the reads of one diagnostics stream.

    ``reads`` times are seconds after the request was sent; the pattern's write ``k``
    (0-based, ``k = 0`` being the padded ``retry:`` write) was sent about
    ``k * interval`` after the first one.
    """
    size = pattern.write_bytes
    interval_s = pattern.interval_ms / 1000
    writes_end = (pattern.writes + 1) * size
    total = reads[-1].total if reads else 0

    # When did each pattern write arrive, relative to when it was sent?
    arrivals: list[float] = []
    index = 0
    for k in range(pattern.writes + 1):
        end = (k + 1) * size
        while index < len(reads) and reads[index].total < end:
            index += 1
        if index == len(reads):
            break
        arrivals.append(reads[index].at_s)
    origin = min((at - k * interval_s for k, at in enumerate(arrivals)), default=0.0)
    lags = [at - (origin + k * interval_s) for k, at in enumerate(arrivals)]
    held_threshold_s = max(3 * interval_s, 0.05)
    held = [lag > held_threshold_s for lag in lags]
    held_share = sum(held) / len(held) if held else 0.0
    buffered = held_share > 0.5
    max_lag_ms = max(lags, default=0.0) * 1000

    first_release_s = reads[0].at_s if reads else headers_at_s
    # Held: the headers came with the first release, later than an unbuffered path would
    # have delivered the first write (``origin``).
    headers_held = (
        headers_at_s - origin > held_threshold_s and headers_at_s >= first_release_s - 0.05
    )

    points = _release_points(reads, gap_s=max(interval_s * 0.6, 0.004))
    last_write_s = origin + pattern.writes * interval_s
    # Releases driven by the byte count: during the writes, not the end-of-stream flush.
    in_writes = [
        p for p in points if p.total < writes_end and p.at_s <= last_write_s + held_threshold_s
    ]
    deltas = [b.total - a.total for a, b in itertools.pairwise(in_writes)]
    sizes = tuple([in_writes[0].total, *deltas] if in_writes else ())

    model, buffer_bytes, buffer_range = "none", None, None
    if buffered:
        model = "unknown"
        common = Counter(deltas).most_common(1)
        delta = common[0][0] if common else (in_writes[0].total if in_writes else 0)
        if delta and delta % size:
            model, buffer_bytes = "blocks", delta
        elif delta:
            low, high = delta - size + 1, delta
            model, buffer_range = "all", (low, high)
            buffer_bytes = _power_of_two_in(low, high) or high

    # A release during the final pause, before the stream's end, means a timer flush.
    timer_flush_s = None
    end_s = reads[-1].at_s if reads else 0.0
    for point in points:
        if (
            last_write_s + held_threshold_s < point.at_s < end_s - 0.05
            and point.total <= writes_end
        ):
            timer_flush_s = round(point.at_s - last_write_s, 2)
            break

    return ProbeReport(
        url=url,
        status=status,
        content_encoding=content_encoding,
        headers_after_ms=round(headers_at_s * 1000, 1),
        headers_held=headers_held,
        buffered=buffered,
        release_model=model,
        buffer_bytes=buffer_bytes,
        buffer_range=buffer_range,
        timer_flush_s=timer_flush_s,
        release_sizes=sizes,
        held_share=round(held_share, 3),
        max_lag_ms=round(max_lag_ms, 1),
        total_bytes=total,
    )


async def run_probe(
    base_url: str,
    pattern: DiagnosticsPattern | None = None,
    *,
    timeout_s: float = 90.0,
    headers: dict[str, str] | None = None,
) -> ProbeReport:
    """Read the diagnostics stream of the service at ``base_url`` and analyse it."""
    pattern = pattern or DiagnosticsPattern()
    url = base_url.rstrip("/") + DIAGNOSTICS_PATH
    reads: list[Read] = []
    # Like a browser: accept compression, but count the bytes as the server wrote them.
    request_headers = {"Accept": "text/event-stream", "Accept-Encoding": "gzip, deflate"}
    request_headers.update(headers or {})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        started = time.monotonic()
        async with session.get(url, params=pattern.as_query(), headers=request_headers) as response:
            headers_at_s = time.monotonic() - started
            if response.status != 200:
                body = await response.text()
                raise ProbeError(f"{url} answered HTTP {response.status}: {body[:200]}")
            total = 0
            async for chunk in response.content.iter_any():
                total += len(chunk)
                reads.append(Read(time.monotonic() - started, total))
            encoding = response.headers.get("Content-Encoding")
    return analyse(
        reads,
        pattern,
        headers_at_s=headers_at_s,
        url=base_url,
        status=response.status,
        content_encoding=encoding,
    )


class ProbeError(Exception):
    """The diagnostics stream could not be read."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flushline probe``."""
    parser.add_argument("url", help="base URL of the Flushline service, as your users reach it")
    parser.add_argument("--write-bytes", type=int, default=DiagnosticsPattern().write_bytes)
    parser.add_argument("--interval-ms", type=int, default=DiagnosticsPattern().interval_ms)
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=16384,
        help="largest buffer size to detect (the pattern sends about 2.5 times this)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``flushline probe``; 0 on success, 1 if the stream could not be read."""
    pattern = DiagnosticsPattern(
        write_bytes=args.write_bytes,
        interval_ms=args.interval_ms,
        total_bytes=max(int(args.max_buffer * 2.5), 4096),
    )
    try:
        report = asyncio.run(run_probe(args.url, pattern))
    except (ProbeError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"flushline probe: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if args.json:
        data = attrs.asdict(report)
        data["settings"] = report.settings()
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.render())
    return 0
