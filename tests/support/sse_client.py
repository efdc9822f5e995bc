"""A recording SSE client for tests and benchmarks: what arrived, when, and the raw bytes."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import attrs
import orjson

from app.core.sse import SSEMessage, SSEParser

__all__ = ["Arrival", "StreamRecord", "read_stream"]


@attrs.frozen
class Arrival:
    """One parsed SSE block and the wall-clock time (``time.time()``) it was complete."""

    at: float
    message: SSEMessage

    @property
    def data(self) -> dict[str, Any]:
        """The decoded JSON data (only for blocks with data)."""
        assert self.message.data is not None
        value = orjson.loads(self.message.data)
        assert isinstance(value, dict)
        return value


@attrs.define
class StreamRecord:
    """Everything one stream delivered."""

    status: int = 0
    headers: dict[str, str] = attrs.Factory(dict)
    headers_at: float = 0.0
    requested_at: float = 0.0
    raw: bytes = b""
    reads: list[tuple[float, int]] = attrs.Factory(list)
    arrivals: list[Arrival] = attrs.Factory(list)
    ended_at: float = 0.0

    @property
    def events(self) -> list[Arrival]:
        """Arrivals carrying data, heartbeats excluded."""
        return [
            a
            for a in self.arrivals
            if a.message.data is not None and a.message.event != "heartbeat"
        ]

    @property
    def heartbeats(self) -> list[Arrival]:
        """Heartbeat arrivals."""
        return [a for a in self.arrivals if a.message.event == "heartbeat"]

    def payloads(self) -> list[dict[str, Any]]:
        """Decoded data of every event (heartbeats excluded), in order."""
        return [a.data for a in self.events]

    def seqs(self) -> list[int]:
        """The ``seq`` of every event, in order."""
        return [int(p["seq"]) for p in self.payloads()]


async def read_stream(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
    timeout_s: float = 60.0,
) -> StreamRecord:
    """GET ``url`` and record the stream until it ends (or ``stop_after`` events)."""
    record = StreamRecord(requested_at=time.time())
    parser = SSEParser()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    raw = bytearray()  # appending to bytes would copy the whole stream on every read
    async with session.get(url, headers=headers, timeout=timeout) as response:
        record.status = response.status
        record.headers = dict(response.headers)
        record.headers_at = time.time()
        if response.status != 200:
            record.raw = await response.read()
            return record
        async for chunk in response.content.iter_any():
            now = time.time()
            raw += chunk
            record.reads.append((now, len(chunk)))
            for message in parser.feed(chunk):
                record.arrivals.append(Arrival(now, message))
            if stop_after is not None and len(record.events) >= stop_after:
                break
    record.raw = bytes(raw)
    record.ended_at = time.time()
    return record
