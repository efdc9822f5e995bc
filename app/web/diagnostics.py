"""``GET /api/diagnostics/stream``: a timed pattern of writes for ``flushline probe``.

The stream is a sequence of writes, one every ``interval_ms``:

1. the first write: the ``retry:`` line padded to ``first_writes * write_bytes`` bytes
   (the probe asks for at least 1 KB, so that compressors with a minimum length, such
   as nginx's ``gzip_min_length`` or Traefik's ``minResponseBodyBytes``, engage);
2. writes of exactly ``write_bytes`` until about ``total_bytes`` have been sent;
3. if ``large_write_bytes`` is set, about ``large_total_bytes`` (by default
   ``total_bytes``) more in writes of that size (a size-based buffer then releases the
   same number of bytes as before, at shorter intervals; a path that holds each write
   for a time releases at the same intervals, more bytes each: the probe compares);

then a pause of ``pause_ms`` (to reveal proxies that flush on a timer) and a final
``probe_end`` event. Every write but the first is one ``probe`` event padded with
comment bytes, whose data says where it ends in the body (``offset``), its index and
the server time it was sent. Because every write ends at a multiple of ``write_bytes``
(257 by default, a prime), where a buffering path releases bytes tells the probe the
path's buffer size and release model. Without the newer parameters (``first_writes``,
``large_write_bytes``, ``large_total_bytes``) the pattern is the original one: a first
write of ``write_bytes``, then the small writes.

The stream is open to anyone who can reach the service, so what one request can make the
server hold is bounded: no write over ``MAX_WRITE_BYTES`` (a reader that stops reading
leaves at most about that much, plus aiohttp's 64 KiB between drains, in the
process), at most ``MAX_PATTERN_BYTES`` in all (``flushline probe`` asks for about 82 KB
by default, 327 KB with the ``--max-buffer 65536`` its advice suggests), each stream
counted against ``FLUSHLINE_MAX_CONNECTIONS`` as a job stream is, and, with auth on,
the API token asked for (``flushline probe --token``).
"""

from __future__ import annotations

import asyncio
import time

import attrs
import orjson
from aiohttp import hdrs, web

from app.core.errors import InvalidField
from app.core.sse import encode_frame, padding_comment, retry_line
from app.web.auth import AUTH
from app.web.keys import SETTINGS
from app.web.params import parse_int
from app.web.server import check_room, tune_stream_socket
from app.web.stream import STREAM_HEADERS

__all__ = [
    "MAX_PATTERN_BYTES",
    "MAX_WRITE_BYTES",
    "PATTERN_LIMITS",
    "DiagnosticsPattern",
    "ScheduledWrite",
    "diagnostics_stream",
    "parse_pattern",
]

#: The largest single write of a pattern (the first one included).
MAX_WRITE_BYTES = 65_536
#: The most body bytes one pattern sends (the probe asks for 82 KB by default).
MAX_PATTERN_BYTES = 512 * 1024
#: Each pattern parameter's (lowest, highest, default).
PATTERN_LIMITS = {
    "write_bytes": (128, MAX_WRITE_BYTES, 257),
    "interval_ms": (5, 2_000, 25),
    "total_bytes": (1_024, MAX_PATTERN_BYTES, 41_000),
    "pause_ms": (0, 10_000, 1_500),
    "first_writes": (1, 256, 1),
    "large_write_bytes": (0, MAX_WRITE_BYTES, 0),
    "large_total_bytes": (0, MAX_PATTERN_BYTES, 0),
}
MAX_DURATION_S = 60.0


@attrs.frozen
class ScheduledWrite:
    """One write of the pattern: when it is sent (seconds after the first) and where it
    ends in the body (bytes); ``phase`` 1 for the first and the small writes, 2 for
    the large ones."""

    index: int
    sent_s: float
    end: int
    phase: int


@attrs.frozen
class DiagnosticsPattern:
    """The validated parameters of one diagnostics stream."""

    write_bytes: int = 257
    interval_ms: int = 25
    total_bytes: int = 41_000
    pause_ms: int = 1_500
    first_writes: int = 1
    large_write_bytes: int = 0
    large_total_bytes: int = 0

    @property
    def first_bytes(self) -> int:
        """Size of the first (``retry:``) write."""
        return self.first_writes * self.write_bytes

    @property
    def writes(self) -> int:
        """How many ``write_bytes`` writes follow the first (retry) write."""
        return max(self.total_bytes // self.write_bytes - self.first_writes, 1)

    @property
    def large_writes(self) -> int:
        """How many ``large_write_bytes`` writes follow the small ones (0: none)."""
        if not self.large_write_bytes:
            return 0
        return max((self.large_total_bytes or self.total_bytes) // self.large_write_bytes, 2)

    @property
    def body_bytes(self) -> int:
        """Where the last write ends: the body's size, the ``probe_end`` event aside."""
        return (
            self.first_bytes
            + self.writes * self.write_bytes
            + self.large_writes * self.large_write_bytes
        )

    @property
    def duration_s(self) -> float:
        """From the first write to the ``probe_end`` event."""
        return (self.writes + self.large_writes) * self.interval_ms / 1000 + self.pause_ms / 1000

    def schedule(self) -> tuple[ScheduledWrite, ...]:
        """Every write of the pattern (the ``probe_end`` event aside), in order."""
        interval_s = self.interval_ms / 1000
        out = [ScheduledWrite(0, 0.0, self.first_bytes, 1)]
        end = self.first_bytes
        sizes = [self.write_bytes] * self.writes + [self.large_write_bytes] * self.large_writes
        for index, size in enumerate(sizes, start=1):
            end += size
            phase = 1 if index <= self.writes else 2
            out.append(ScheduledWrite(index, index * interval_s, end, phase))
        return tuple(out)

    def as_query(self) -> dict[str, str]:
        """The pattern as query parameters."""
        return {name: str(getattr(self, name)) for name in PATTERN_LIMITS}


def parse_pattern(query: dict[str, str] | web.Request) -> DiagnosticsPattern:
    """Validate the query parameters (``InvalidField`` naming the bad one)."""
    source = query.query if isinstance(query, web.Request) else query
    values: dict[str, int] = {}
    for name, (low, high, default) in PATTERN_LIMITS.items():
        raw = source.get(name)
        if raw is None:
            values[name] = default
            continue
        values[name] = parse_int(raw, name, low, high)
    pattern = DiagnosticsPattern(**values)
    large = pattern.large_write_bytes
    if large and large < 2 * pattern.write_bytes:
        raise InvalidField(
            "large_write_bytes",
            f"must be 0 or at least twice write_bytes ({2 * pattern.write_bytes}), got {large}",
        )
    if pattern.first_bytes > MAX_WRITE_BYTES:
        raise InvalidField(
            "first_writes",
            f"the first write (first_writes * write_bytes) would be {pattern.first_bytes} "
            f"bytes; at most {MAX_WRITE_BYTES}",
        )
    if pattern.body_bytes > MAX_PATTERN_BYTES:
        large_part = pattern.large_writes * pattern.large_write_bytes
        raise InvalidField(
            "large_total_bytes" if large_part > pattern.body_bytes // 2 else "total_bytes",
            f"the pattern would send {pattern.body_bytes} bytes; at most {MAX_PATTERN_BYTES} "
            "(the first write, total_bytes and large_total_bytes together)",
        )
    if pattern.duration_s > MAX_DURATION_S:
        raise InvalidField(
            "interval_ms",
            f"the pattern would last {pattern.duration_s:.0f} s; at most {MAX_DURATION_S:.0f}",
        )
    return pattern


def _write(size: int, head: bytes, field: str = "write_bytes") -> bytes:
    gap = size - len(head)
    if gap == 1 or gap < 0:
        raise InvalidField(field, f"must leave room for the event ({len(head) + 2} bytes)")
    return head + padding_comment(gap)


async def diagnostics_stream(request: web.Request) -> web.StreamResponse:
    """Send the timed pattern (see the module docstring)."""
    auth = request.app[AUTH]
    if auth.enabled:
        auth.check_bearer(request.headers.get(hdrs.AUTHORIZATION))
    pattern = parse_pattern(request)
    schedule = pattern.schedule()
    first = _write(pattern.first_bytes, retry_line(1000))
    check_room(request)
    send_timeout_s = request.app[SETTINGS].send_timeout_s
    response = web.StreamResponse(headers=STREAM_HEADERS)
    await response.prepare(request)
    tune_stream_socket(request.transport, send_timeout_s)

    async def send(data: bytes) -> None:
        # A reader that stalls is dropped, not waited on for the whole pattern.
        async with asyncio.timeout(send_timeout_s):
            await response.write(data)

    loop = asyncio.get_running_loop()
    start = loop.time()
    await send(first)
    previous_end = pattern.first_bytes
    for write in schedule[1:]:
        await asyncio.sleep(max(start + write.sent_s - loop.time(), 0))
        data = orjson.dumps({"i": write.index, "offset": write.end, "sent": time.time()})
        frame = encode_frame(data, event="probe", id=write.index)
        field = "write_bytes" if write.phase == 1 else "large_write_bytes"
        await send(_write(write.end - previous_end, frame, field))
        previous_end = write.end
    await asyncio.sleep(pattern.pause_ms / 1000)
    end = orjson.dumps(
        {
            "writes": pattern.writes,
            "large_writes": pattern.large_writes,
            "offset": previous_end,
            "sent": time.time(),
            **pattern.as_query(),
        }
    )
    await send(encode_frame(end, event="probe_end"))
    async with asyncio.timeout(send_timeout_s):
        await response.write_eof()
    return response
