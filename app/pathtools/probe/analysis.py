"""``flushline probe URL``: measure how the path to a Flushline service delivers a stream.

The probe reads ``/api/diagnostics/stream`` (see ``app.web.diagnostics``) through whatever
sits between the user and the service and works out from *when* and *how many* bytes
arrived what kind of path it is (:class:`PathKind`) and what fixes it (:class:`Fix`):

* whether the path holds writes at all (pattern writes arrive late, in groups),
* a **size-based buffer**'s size and release model: every write ends at a multiple of
  ``write_bytes`` (a prime, 257), so a path that releases whole blocks of ``B`` bytes
  ("blocks") releases at offsets that are multiples of ``B`` and not of 257, while a
  path that releases everything once it holds ``B`` ("all") releases at write
  boundaries every ``ceil(B / 257)`` writes,
* a **time hold** (a proxy that holds what it has for a while, whatever its size): the
  pattern ends with writes four times larger; a size-based buffer then releases the
  same number of bytes as before, more often, while a time hold releases as often as
  before, four times the bytes each time,
* a path that holds the **whole response** and sends it with a ``Content-Length``,
* compression (``Content-Encoding``; the first write is over 1 KB so that compressors
  with a minimum length engage), how long the headers were held, and whether the path
  also flushes on a timer (bytes released during the final pause),

and prints the settings to use, or the fix (long-polling, or the proxy's setting, with
its configuration lines) when no setting of ours can help.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import enum
import itertools
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence

import aiohttp
import attrs
import orjson

from app.web.diagnostics import DiagnosticsPattern

__all__ = [
    "COMPRESSION_SETTINGS",
    "DEFAULT_LATENCY_BUDGET_MS",
    "MIN_FIRST_WRITE_BYTES",
    "STREAMING_SETTINGS",
    "Fix",
    "PathKind",
    "ProbeError",
    "ProbeReport",
    "Read",
    "analyse",
    "configure_parser",
    "probe_pattern",
    "report_json",
    "run_from_args",
    "run_probe",
]

DIAGNOSTICS_PATH = "/api/diagnostics/stream"
LONG_POLL_PATH = "GET /api/jobs/{id}/events?after=N"
#: The probe's first write is at least this long, so that compressors that skip short
#: responses (Traefik's ``minResponseBodyBytes`` 1024, Caddy's ``minimum_length`` 512,
#: nginx's ``gzip_min_length``) compress the stream as they would a real one.
MIN_FIRST_WRITE_BYTES = 1024
#: The large writes at the end of the pattern are this many times ``write_bytes``.
LARGE_WRITE_FACTOR = 4
LARGE_WRITES_MIN_S = 1
#: How late an event may arrive before a time hold needs fixing (the page's target).
DEFAULT_LATENCY_BUDGET_MS = 500.0

#: What makes each known proxy forward a stream as it comes (no size or time hold).
STREAMING_SETTINGS: tuple[tuple[str, str], ...] = (
    (
        "nginx",
        "`proxy_buffering off;` in the stream location, and no X-Accel-Buffering in "
        "`proxy_ignore_headers` (Flushline sends `X-Accel-Buffering: no`); "
        "see config/nginx/flushline.conf",
    ),
    ("Apache", "`ProxyPass /api/ http://127.0.0.1:8080/api/ flushpackets=on`"),
    ("Caddy", "`reverse_proxy 127.0.0.1:8080 { flush_interval -1 }`"),
    ("Traefik", "the service's `loadBalancer.responseForwarding.flushInterval: 1ms`"),
    ("HAProxy", "forwards as it receives unless a filter holds the response: no `filter cache`"),
    ("a CDN or load balancer", "response buffering and caching off for the stream paths"),
)
#: What turns compression off for ``text/event-stream`` in each known proxy.
COMPRESSION_SETTINGS: tuple[tuple[str, str], ...] = (
    (
        "nginx",
        "`gzip off;` in the stream location, or keep text/event-stream out of `gzip_types`",
    ),
    ("Apache", "leave text/event-stream out of `AddOutputFilterByType DEFLATE`"),
    ("Caddy", "give `encode` a `match` that excludes text/event-stream"),
    ("Traefik", "`compress` middleware with `excludedContentTypes: [text/event-stream]`"),
    ("HAProxy", "leave text/event-stream out of `compression type`"),
    ("a CDN or load balancer", "compression (and caching) off for the stream paths"),
)


class PathKind(enum.StrEnum):
    """What the path does to a stream."""

    UNBUFFERED = "unbuffered"  # every write arrives as it is sent
    SIZE_BUFFER = "size_buffer"  # holds bytes until it has B of them; B found
    LARGE_BUFFER = "large_buffer"  # held more than the pattern sent; size unknown
    TIME_HOLD = "time_hold"  # holds what it has for a while, whatever its size
    WHOLE_RESPONSE = "whole_response"  # everything at the end, with a Content-Length
    COMPRESSED = "compressed"  # compresses, and holds the compressed output


class Fix(enum.StrEnum):
    """What gets events through a path on time."""

    BLOCK_SIZE = "block_size"  # FLUSHLINE_PROXY_BUFFER_BYTES / ?proxy_buffer=
    LONG_POLLING = "long_polling"  # GET /api/jobs/{id}/events: complete responses
    PROXY_SETTING = "proxy_setting"  # make the proxy stream (or stop compressing)


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
    release_model: str  # "none", "all", "blocks", "time", "end" or "unknown"
    buffer_bytes: int | None
    buffer_range: tuple[int, int] | None
    timer_flush_s: float | None
    release_sizes: tuple[int, ...]
    held_share: float
    max_lag_ms: float
    total_bytes: int
    kind: PathKind = PathKind.UNBUFFERED
    #: How long a time hold holds each write (time holds only).
    hold_ms: float | None = None
    #: Bytes per release with the large writes over bytes per release with the small
    #: ones: about 1 for a size buffer, about ``LARGE_WRITE_FACTOR`` for a time hold.
    release_growth: float | None = None
    content_length: int | None = None
    first_write_bytes: int = 0
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS

    @property
    def compressed(self) -> bool:
        """Whether the path compresses the stream."""
        return self.content_encoding not in (None, "", "identity")

    @property
    def within_budget(self) -> bool | None:
        """For a time hold: whether its hold fits the latency budget (else None)."""
        if self.kind is not PathKind.TIME_HOLD or self.hold_ms is None:
            return None
        return self.hold_ms <= self.latency_budget_ms

    @property
    def fixes(self) -> tuple[Fix, ...]:
        """What gets events through on time, best first; empty when nothing is needed."""
        match self.kind:
            case PathKind.UNBUFFERED:
                return ()
            case PathKind.SIZE_BUFFER:
                return (Fix.BLOCK_SIZE, Fix.PROXY_SETTING)
            case PathKind.TIME_HOLD:
                return () if self.within_budget else (Fix.LONG_POLLING, Fix.PROXY_SETTING)
            case PathKind.COMPRESSED:
                return (Fix.PROXY_SETTING, Fix.LONG_POLLING)
            case _:  # whole response, or a buffer larger than the pattern
                return (Fix.LONG_POLLING, Fix.PROXY_SETTING)

    def settings(self) -> dict[str, str]:
        """The environment to run Flushline with on this path (empty: none helps)."""
        if self.kind in (PathKind.UNBUFFERED, PathKind.TIME_HOLD):
            # Padding cannot shorten a time hold: pad nothing, stream small chunks often.
            return {"FLUSHLINE_STRATEGY": "aligned", "FLUSHLINE_PROXY_BUFFER_BYTES": "0"}
        if self.kind is PathKind.SIZE_BUFFER:
            return {
                "FLUSHLINE_STRATEGY": "aligned",
                "FLUSHLINE_PROXY_BUFFER_BYTES": str(self.buffer_bytes),
                "FLUSHLINE_MAX_DELAY_MS": "100",
            }
        return {}

    def render(self) -> str:
        """A human-readable report: the findings, then what to do."""
        lines = [f"probe of {self.url}: HTTP {self.status}, {self.total_bytes} body bytes"]
        lines.append(
            f"headers:     arrived after {self.headers_after_ms:.0f} ms"
            + (" (held back by the path until its first release)" if self.headers_held else "")
        )
        lines.append(f"compression: {self.content_encoding or 'none'}")
        lines.append(f"buffering:   {self._buffering_line()}")
        if self.buffered:
            lines.append(
                f"             {self.held_share:.0%} of writes held, up to {self.max_lag_ms:.0f} ms"
            )
        if self.timer_flush_s is not None:
            lines.append(f"timer flush: held bytes released after about {self.timer_flush_s:.1f} s")
        lines += ["", *self._advice()]
        return "\n".join(lines)

    def _buffering_line(self) -> str:
        match self.kind:
            case PathKind.UNBUFFERED:
                return f"none seen (max lag {self.max_lag_ms:.0f} ms)"
            case PathKind.TIME_HOLD:
                growth = f"{self.release_growth:.1f}" if self.release_growth else "?"
                return (
                    f"a time hold: each write held about {self.hold_ms:.0f} ms whatever its "
                    f"size (bytes per release grew {growth}x with {LARGE_WRITE_FACTOR}x "
                    "larger writes)"
                )
            case PathKind.WHOLE_RESPONSE:
                return (
                    "the whole response: nothing arrived until the stream ended, then all "
                    f"of it with a Content-Length of {self.content_length}"
                )
            case PathKind.COMPRESSED:
                return "the compressed stream was held (see below)"
        if not self.buffer_bytes:
            return f"yes, more than the {self.total_bytes} bytes sent (unknown size)"
        size = f"{self.buffer_bytes} bytes"
        if self.buffer_range and self.release_model == "all":
            size += f" (between {self.buffer_range[0]} and {self.buffer_range[1]})"
        return f"yes, {size}, release model '{self.release_model}'"

    def _advice(self) -> list[str]:
        settings = [f"  {name}={value}" for name, value in self.settings().items()]
        long_poll = (
            f"long-polling\n  ({LONG_POLL_PATH}&wait_s=25: complete responses, forwarded at once)"
        )
        match self.kind:
            case PathKind.UNBUFFERED:
                return ["The path does not buffer. Use:", "", *settings]
            case PathKind.SIZE_BUFFER:
                return [
                    f"The path buffers {self.buffer_bytes} bytes. Fix: that block size, which",
                    "`aligned` pads every flush to (or `?proxy_buffer="
                    f"{self.buffer_bytes}` on one stream's URL). Use:",
                    "",
                    *settings,
                    "",
                    "Or make the proxy stream (then FLUSHLINE_PROXY_BUFFER_BYTES=0):",
                    *_config_lines(STREAMING_SETTINGS),
                ]
            case PathKind.TIME_HOLD:
                head = [
                    f"The path holds every write about {self.hold_ms:.0f} ms, whatever its size:",
                    "padding cannot shorten a time hold, so pad nothing.",
                ]
                if self.within_budget:
                    return [
                        *head,
                        f"That is within the {self.latency_budget_ms:.0f} ms latency budget "
                        "(--latency-budget-ms). Use:",
                        "",
                        *settings,
                        "",
                        f"To remove the hold: {long_poll}, or the proxy setting:",
                        *_config_lines(STREAMING_SETTINGS),
                    ]
                return [
                    *head,
                    f"That exceeds the {self.latency_budget_ms:.0f} ms latency budget "
                    f"(--latency-budget-ms). Fix: {long_poll},",
                    "or the proxy setting:",
                    *_config_lines(STREAMING_SETTINGS),
                    "",
                    "Streaming meanwhile:",
                    *settings,
                ]
            case PathKind.WHOLE_RESPONSE:
                return [
                    "The path buffers the whole response: no padding or block size gets a",
                    f"stream through it. Fix: {long_poll},",
                    "or the proxy setting:",
                    *_config_lines(STREAMING_SETTINGS),
                ]
            case PathKind.COMPRESSED:
                return [
                    "The path compresses the stream: padding compresses to almost nothing, so no",
                    "strategy can force a flush. Fix: turn compression off for",
                    "text/event-stream, or make the proxy honour `Cache-Control: no-transform`:",
                    *_config_lines(COMPRESSION_SETTINGS),
                    f"or {long_poll}.",
                ]
        return [
            "The path buffers more than this pattern sent, so its size is unknown:",
            "run the probe again with a larger --max-buffer (e.g. 65536). Meanwhile",
            f"{long_poll} gets through, and so does the proxy setting:",
            *_config_lines(STREAMING_SETTINGS),
        ]


def _config_lines(table: Sequence[tuple[str, str]]) -> list[str]:
    return [f"  - {proxy}: {line}" for proxy, line in table]


def probe_pattern(
    max_buffer_bytes: int = 16_384,
    *,
    write_bytes: int = 257,
    interval_ms: int = 25,
    pause_ms: int = 1_500,
) -> DiagnosticsPattern:
    """The pattern the probe sends to detect buffers up to ``max_buffer_bytes``.

    About 2.5 times that many bytes in ``write_bytes`` writes, then as many in writes
    ``LARGE_WRITE_FACTOR`` times larger (for a second at least); a first write of at
    least 1 KB.
    """
    large = LARGE_WRITE_FACTOR * write_bytes
    total = max(int(max_buffer_bytes * 2.5), 4096)
    return DiagnosticsPattern(
        write_bytes=write_bytes,
        interval_ms=interval_ms,
        total_bytes=total,
        pause_ms=pause_ms,
        first_writes=math.ceil(MIN_FIRST_WRITE_BYTES / write_bytes),
        large_write_bytes=large,
        # At least a second of large writes, so that a hold of a few hundred ms
        # releases several times during them.
        large_total_bytes=max(total, large * max(LARGE_WRITES_MIN_S * 1000 // interval_ms, 8)),
    )


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


def _size_buffer(
    deltas: Sequence[int], write_bytes: int, last_write_bytes: int
) -> tuple[str, int | None, tuple[int, int] | None]:
    """Release model, buffer size and (for 'all') its range from the release sizes.

    Every write ends at a multiple of ``write_bytes``, so a release that does not is a
    whole block. An 'all' buffer of ``B`` releases once a write brings it to ``B`` or
    more, so ``B`` is within one such write (``last_write_bytes``) below the release.
    """
    common = Counter(deltas).most_common(1)
    delta = common[0][0] if common else 0
    if delta and delta % write_bytes:
        return "blocks", delta, None
    if delta:
        low, high = delta - last_write_bytes + 1, delta
        return "all", _power_of_two_in(low, high) or high, (low, high)
    return "unknown", None, None


def analyse(
    reads: Sequence[Read],
    pattern: DiagnosticsPattern,
    *,
    headers_at_s: float,
    url: str = "",
    status: int = 200,
    content_encoding: str | None = None,
    content_length: int | None = None,
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS,
) -> ProbeReport:
    """Infer the path's behaviour from the reads of one diagnostics stream.

    ``reads`` times are seconds after the request was sent; the pattern's writes were
    sent as ``pattern.schedule()`` says, relative to the first, and its ``probe_end``
    event ``pause_ms`` after the last.
    """
    size = pattern.write_bytes
    interval_s = pattern.interval_ms / 1000
    schedule = pattern.schedule()
    writes_end = schedule[-1].end
    total = reads[-1].total if reads else 0

    # When did each pattern write arrive, relative to when it was sent?
    arrivals: list[float] = []
    index = 0
    for write in schedule:
        while index < len(reads) and reads[index].total < write.end:
            index += 1
        if index == len(reads):
            break
        arrivals.append(reads[index].at_s)
    timeline = [(w.sent_s, at) for w, at in zip(schedule, arrivals, strict=False)]
    if total > writes_end:
        # probe_end arrived: with it, a path that held every write still shows when
        # the pattern started (probe_end itself is sent at the end and not held).
        timeline.append((schedule[-1].sent_s + pattern.pause_ms / 1000, reads[-1].at_s))
    origin = min((at - sent for sent, at in timeline), default=0.0)
    lags = [at - (origin + w.sent_s) for w, at in zip(schedule, arrivals, strict=False)]
    held_threshold_s = max(3 * interval_s, 0.05)
    held = [lag > held_threshold_s for lag in lags]
    held_share = sum(held) / len(held) if held else 0.0
    max_lag_ms = max(lags, default=0.0) * 1000

    first_release_s = reads[0].at_s if reads else headers_at_s
    # Held: the headers came with the first release, later than an unbuffered path would
    # have delivered the first write (``origin``).
    headers_held = (
        headers_at_s - origin > held_threshold_s and headers_at_s >= first_release_s - 0.05
    )

    points = _release_points(reads, gap_s=max(interval_s * 0.6, 0.004))
    last_write_s = origin + schedule[-1].sent_s
    # Releases driven by the writes: during them, not the end-of-stream flush.
    in_writes = [
        p for p in points if p.total < writes_end and p.at_s <= last_write_s + held_threshold_s
    ]
    ends = [w.end for w in schedule]

    def phase(point: Read) -> int:
        return schedule[max(bisect.bisect_right(ends, point.total) - 1, 0)].phase

    phase_deltas: dict[int, list[int]] = {1: [], 2: []}
    for before, point in itertools.pairwise(in_writes):
        phase_deltas[phase(point)].append(point.total - before.total)
    deltas = phase_deltas[1]
    sizes = tuple([in_writes[0].total, *deltas] if in_writes else ())

    # The hold of each release: how long its oldest write waited.
    release_totals = [p.total for p in in_writes]
    by_release: dict[int, float] = {}
    for write, lag in zip(schedule, lags, strict=False):
        at = bisect.bisect_left(release_totals, write.end)
        if at < len(in_writes):
            by_release[at] = max(by_release.get(at, 0.0), lag)
    release_holds = list(by_release.values())
    typical_hold_s = statistics.median(release_holds) if release_holds else 0.0
    buffered = held_share > 0.5 or typical_hold_s > held_threshold_s

    growth = None
    if phase_deltas[1] and phase_deltas[2]:
        growth = statistics.median(phase_deltas[2]) / statistics.median(phase_deltas[1])
    large = pattern.large_write_bytes
    factor = large / size if large else 0.0
    # Midway between a size buffer's growth (about 1) and a time hold's (``factor``).
    time_hold = growth is not None and growth >= (1 + factor) / 2

    model, buffer_bytes, buffer_range = "none", None, None
    if buffered:
        model = "unknown"
        # The small writes' releases say most; else the large ones'; else the first.
        if phase_deltas[1]:
            model, buffer_bytes, buffer_range = _size_buffer(phase_deltas[1], size, size)
        elif phase_deltas[2]:
            model, buffer_bytes, buffer_range = _size_buffer(phase_deltas[2], size, large)
        elif in_writes:
            ended_by = schedule[bisect.bisect_left(ends, in_writes[0].total)]
            write_size = large if ended_by.phase == 2 else size
            model, buffer_bytes, buffer_range = _size_buffer([in_writes[0].total], size, write_size)
    whole = (
        buffered
        and content_length is not None
        and first_release_s > last_write_s + held_threshold_s
    )
    hold_ms = None
    if not buffered:
        kind = PathKind.UNBUFFERED
    elif content_encoding not in (None, "", "identity"):
        kind = PathKind.COMPRESSED
    elif whole:
        kind, model, buffer_bytes, buffer_range = PathKind.WHOLE_RESPONSE, "end", None, None
    elif time_hold:
        kind, model, buffer_bytes, buffer_range = PathKind.TIME_HOLD, "time", None, None
        hold_ms = round(typical_hold_s * 1000, 1)
    elif buffer_bytes:
        kind = PathKind.SIZE_BUFFER
    else:
        kind = PathKind.LARGE_BUFFER

    # A release during the final pause, before the stream's end, means a timer flush,
    # unless it released a whole buffer: that is the size rule, late only because the
    # last writes were (a loaded machine delays them past their schedule).
    timer_flush_s = None
    end_s = reads[-1].at_s if reads else 0.0
    released_before = 0
    for point in points:
        released = point.total - released_before
        released_before = point.total
        if buffer_bytes and released >= buffer_bytes:
            continue
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
        kind=kind,
        hold_ms=hold_ms,
        release_growth=None if growth is None else round(growth, 2),
        content_length=content_length,
        first_write_bytes=pattern.first_bytes,
        latency_budget_ms=latency_budget_ms,
    )


async def run_probe(
    base_url: str,
    pattern: DiagnosticsPattern | None = None,
    *,
    timeout_s: float = 90.0,
    headers: dict[str, str] | None = None,
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS,
) -> ProbeReport:
    """Read the diagnostics stream of the service at ``base_url`` and analyse it."""
    pattern = pattern or probe_pattern()
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
            length = response.content_length
    return analyse(
        reads,
        pattern,
        headers_at_s=headers_at_s,
        url=base_url,
        status=response.status,
        content_encoding=encoding,
        content_length=length,
        latency_budget_ms=latency_budget_ms,
    )


class ProbeError(Exception):
    """The diagnostics stream could not be read."""


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
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def report_json(report: ProbeReport) -> dict[str, object]:
    """The report as JSON-ready data, with the derived settings, fixes and budget verdict."""
    data = attrs.asdict(report)
    data["settings"] = report.settings()
    data["fixes"] = list(report.fixes)
    data["within_budget"] = report.within_budget
    data["compressed"] = report.compressed
    return data


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``flushline probe``; 0 on success, 1 if the stream could not be read."""
    pattern = probe_pattern(
        args.max_buffer, write_bytes=args.write_bytes, interval_ms=args.interval_ms
    )
    try:
        report = asyncio.run(run_probe(args.url, pattern, latency_budget_ms=args.latency_budget_ms))
    except (ProbeError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"flushline probe: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(report_json(report), option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.render())
    return 0
