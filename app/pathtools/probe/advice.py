"""What the probe tells the user to do: the fixes, and each proxy's configuration lines.

One function per kind of path (see ``report.PathKind``) returns the advice lines that end
the human report; ``ProbeReport`` picks the one for its path.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

__all__ = [
    "COMPRESSION_SETTINGS",
    "LONG_POLL_PATH",
    "STREAMING_SETTINGS",
    "Fix",
    "compressed_advice",
    "size_buffer_advice",
    "time_hold_advice",
    "unbuffered_advice",
    "unknown_size_advice",
    "whole_response_advice",
]

LONG_POLL_PATH = "GET /api/jobs/{id}/events?after=N"
_LONG_POLL = f"long-polling\n  ({LONG_POLL_PATH}&wait_s=25: complete responses, forwarded at once)"

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


class Fix(enum.StrEnum):
    """What gets events through a path on time."""

    BLOCK_SIZE = "block_size"  # FLUSHLINE_PROXY_BUFFER_BYTES / ?proxy_buffer=
    LONG_POLLING = "long_polling"  # GET /api/jobs/{id}/events: complete responses
    PROXY_SETTING = "proxy_setting"  # make the proxy stream (or stop compressing)


def _config_lines(table: Sequence[tuple[str, str]]) -> list[str]:
    return [f"  - {proxy}: {line}" for proxy, line in table]


def _settings_lines(settings: Mapping[str, str]) -> list[str]:
    return [f"  {name}={value}" for name, value in settings.items()]


def unbuffered_advice(settings: Mapping[str, str]) -> list[str]:
    """A path that does not buffer: the settings to run with."""
    return ["The path does not buffer. Use:", "", *_settings_lines(settings)]


def size_buffer_advice(buffer_bytes: int | None, settings: Mapping[str, str]) -> list[str]:
    """A size-based buffer of ``buffer_bytes``: that block size, or the proxy setting."""
    return [
        f"The path buffers {buffer_bytes} bytes. Fix: that block size, which",
        "`aligned` pads every flush to (or `?proxy_buffer="
        f"{buffer_bytes}` on one stream's URL). Use:",
        "",
        *_settings_lines(settings),
        "",
        "Or make the proxy stream (then FLUSHLINE_PROXY_BUFFER_BYTES=0):",
        *_config_lines(STREAMING_SETTINGS),
    ]


def time_hold_advice(
    hold_ms: float | None,
    latency_budget_ms: float,
    *,
    within_budget: bool | None,
    settings: Mapping[str, str],
) -> list[str]:
    """A time hold: no padding; long-polling or the proxy setting if it exceeds the budget."""
    head = [
        f"The path holds every write about {hold_ms:.0f} ms, whatever its size:",
        "padding cannot shorten a time hold, so pad nothing.",
    ]
    if within_budget:
        return [
            *head,
            f"That is within the {latency_budget_ms:.0f} ms latency budget "
            "(--latency-budget-ms). Use:",
            "",
            *_settings_lines(settings),
            "",
            f"To remove the hold: {_LONG_POLL}, or the proxy setting:",
            *_config_lines(STREAMING_SETTINGS),
        ]
    return [
        *head,
        f"That exceeds the {latency_budget_ms:.0f} ms latency budget "
        f"(--latency-budget-ms). Fix: {_LONG_POLL},",
        "or the proxy setting:",
        *_config_lines(STREAMING_SETTINGS),
        "",
        "Streaming meanwhile:",
        *_settings_lines(settings),
    ]


def whole_response_advice() -> list[str]:
    """A path that buffers the whole response: long-polling or the proxy setting."""
    return [
        "The path buffers the whole response: no padding or block size gets a",
        f"stream through it. Fix: {_LONG_POLL},",
        "or the proxy setting:",
        *_config_lines(STREAMING_SETTINGS),
    ]


def compressed_advice() -> list[str]:
    """A compressing path: compression off for the stream, or long-polling."""
    return [
        "The path compresses the stream: padding compresses to almost nothing, so no",
        "strategy can force a flush. Fix: turn compression off for",
        "text/event-stream, or make the proxy honour `Cache-Control: no-transform`:",
        *_config_lines(COMPRESSION_SETTINGS),
        f"or {_LONG_POLL}.",
    ]


def unknown_size_advice() -> list[str]:
    """A buffer larger than the pattern: probe again bigger; meanwhile long-polling."""
    return [
        "The path buffers more than this pattern sent, so its size is unknown:",
        "run the probe again with a larger --max-buffer (e.g. 65536). Meanwhile",
        f"{_LONG_POLL} gets through, and so does the proxy setting:",
        *_config_lines(STREAMING_SETTINGS),
    ]
