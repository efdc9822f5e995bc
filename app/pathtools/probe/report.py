"""What the probe found (``ProbeReport``, ``PathKind``) and how it is shown: the human
report (``ProbeReport.render``) and the JSON one (``report_json``)."""

from __future__ import annotations

import enum

import attrs

from app.pathtools.probe.advice import (
    Fix,
    compressed_advice,
    size_buffer_advice,
    time_hold_advice,
    unbuffered_advice,
    unknown_size_advice,
    whole_response_advice,
)
from app.pathtools.probe.pattern import LARGE_WRITE_FACTOR

__all__ = ["DEFAULT_LATENCY_BUDGET_MS", "PathKind", "ProbeReport", "report_json"]

#: How late an event may arrive before a time hold needs fixing (the page's target).
DEFAULT_LATENCY_BUDGET_MS = 500.0


class PathKind(enum.StrEnum):
    """What the path does to a stream."""

    UNBUFFERED = "unbuffered"  # every write arrives as it is sent
    SIZE_BUFFER = "size_buffer"  # holds bytes until it has B of them; B found
    LARGE_BUFFER = "large_buffer"  # held more than the pattern sent; size unknown
    TIME_HOLD = "time_hold"  # holds what it has for a while, whatever its size
    WHOLE_RESPONSE = "whole_response"  # everything at the end, with a Content-Length
    COMPRESSED = "compressed"  # compresses, and holds the compressed output


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
        match self.kind:
            case PathKind.UNBUFFERED:
                return unbuffered_advice(self.settings())
            case PathKind.SIZE_BUFFER:
                return size_buffer_advice(self.buffer_bytes, self.settings())
            case PathKind.TIME_HOLD:
                return time_hold_advice(
                    self.hold_ms,
                    self.latency_budget_ms,
                    within_budget=self.within_budget,
                    settings=self.settings(),
                )
            case PathKind.WHOLE_RESPONSE:
                return whole_response_advice()
            case PathKind.COMPRESSED:
                return compressed_advice()
        return unknown_size_advice()


def report_json(report: ProbeReport) -> dict[str, object]:
    """The report as JSON-ready data, with the derived settings, fixes and budget verdict."""
    data = attrs.asdict(report)
    data["settings"] = report.settings()
    data["fixes"] = list(report.fixes)
    data["within_budget"] = report.within_budget
    data["compressed"] = report.compressed
    return data
