"""``GET /api/diagnostics/stream``: a timed pattern of writes for ``flushline probe``.

The stream is a sequence of writes of exactly ``write_bytes`` bytes each, every
``interval_ms``, until ``total_bytes`` have been sent; then a pause of ``pause_ms`` (to
reveal proxies that flush on a timer) and a final ``probe_end`` event. The first write
is the ``retry:`` line padded to ``write_bytes``; every other write is one ``probe``
event padded with comment bytes, whose data says where it ends in the body
(``offset``), its index and the server time it was sent. Because every write ends at a
multiple of ``write_bytes`` (257 by default, a prime), where a buffering path releases
bytes tells the probe the path's buffer size and release model.
"""

from __future__ import annotations

import asyncio
import time

import attrs
import orjson
from aiohttp import web

from app.core.errors import InvalidField
from app.core.sse import encode_frame, padding_comment, retry_line
from app.web.keys import SETTINGS
from app.web.params import parse_int
from app.web.stream import STREAM_HEADERS

__all__ = ["DiagnosticsPattern", "diagnostics_stream", "parse_pattern"]

_LIMITS = {
    "write_bytes": (128, 65_536, 257),
    "interval_ms": (5, 2_000, 25),
    "total_bytes": (1_024, 4 * 1024 * 1024, 41_000),
    "pause_ms": (0, 10_000, 1_500),
}
MAX_DURATION_S = 60.0


@attrs.frozen
class DiagnosticsPattern:
    """The validated parameters of one diagnostics stream."""

    write_bytes: int = 257
    interval_ms: int = 25
    total_bytes: int = 41_000
    pause_ms: int = 1_500

    @property
    def writes(self) -> int:
        """How many pattern writes follow the first (retry) write."""
        return max(self.total_bytes // self.write_bytes - 1, 1)

    def as_query(self) -> dict[str, str]:
        """The pattern as query parameters."""
        return {name: str(getattr(self, name)) for name in _LIMITS}


def parse_pattern(query: dict[str, str] | web.Request) -> DiagnosticsPattern:
    """Validate the query parameters (``InvalidField`` naming the bad one)."""
    source = query.query if isinstance(query, web.Request) else query
    values: dict[str, int] = {}
    for name, (low, high, default) in _LIMITS.items():
        raw = source.get(name)
        if raw is None:
            values[name] = default
            continue
        values[name] = parse_int(raw, name, low, high)
    pattern = DiagnosticsPattern(**values)
    duration_s = pattern.writes * pattern.interval_ms / 1000 + pattern.pause_ms / 1000
    if duration_s > MAX_DURATION_S:
        raise InvalidField(
            "interval_ms",
            f"the pattern would last {duration_s:.0f} s; at most {MAX_DURATION_S:.0f}",
        )
    return pattern


def _write(size: int, head: bytes) -> bytes:
    gap = size - len(head)
    if gap == 1 or gap < 0:
        raise InvalidField("write_bytes", f"must leave room for the event ({len(head) + 2} bytes)")
    return head + padding_comment(gap)


async def diagnostics_stream(request: web.Request) -> web.StreamResponse:
    """Send the timed pattern (see the module docstring)."""
    pattern = parse_pattern(request)
    size = pattern.write_bytes
    first = _write(size, retry_line(1000))
    response = web.StreamResponse(headers=STREAM_HEADERS)
    await response.prepare(request)
    send_timeout_s = request.app[SETTINGS].send_timeout_s

    async def send(data: bytes) -> None:
        # A reader that stalls is dropped, not waited on for the whole pattern.
        async with asyncio.timeout(send_timeout_s):
            await response.write(data)

    loop = asyncio.get_running_loop()
    start = loop.time()
    await send(first)
    for index in range(1, pattern.writes + 1):
        await asyncio.sleep(max(start + index * pattern.interval_ms / 1000 - loop.time(), 0))
        data = orjson.dumps({"i": index, "offset": (index + 1) * size, "sent": time.time()})
        await send(_write(size, encode_frame(data, event="probe", id=index)))
    await asyncio.sleep(pattern.pause_ms / 1000)
    end = orjson.dumps(
        {
            "writes": pattern.writes,
            "offset": (pattern.writes + 1) * size,
            "sent": time.time(),
            **pattern.as_query(),
        }
    )
    await send(encode_frame(end, event="probe_end"))
    async with asyncio.timeout(send_timeout_s):
        await response.write_eof()
    return response
