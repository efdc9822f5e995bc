"""The fan-out load generator: thousands of SSE streams on loopback, counted cheaply.

Run by ``bench.fanout`` as its own process (``python -m bench.loadgen SPEC.json``), so
the server under test never shares an event loop with its clients. The spec names the
port, one request path per stream, the time limit and, for the idle scenario, how long
to hold the streams open. Every stream is opened at once. With ``"transport": "poll"``
each watcher long-polls instead (``/events?after=N&wait_s=25`` over one keep-alive
connection, the next poll sent as soon as an answer is read, with ``after`` its
``last_event_id``) until an answer says ``done``.

It is lean so that it is not the bottleneck: a raw ``asyncio.Protocol`` per stream, the
chunked body decoded in place, and each frame read with bytes searches for ``"seq":``
and ``"ts":`` (the payload's third and fourth keys), never a JSON parse. It writes one
JSON line when every stream has its headers (``{"event": "open", ...}``) and one with
the results at the end (``{"event": "result", ...}``).

Lag is arrival minus ``ts`` (the server's clock is this machine's), over the events
published after every stream had its headers (the live window); earlier events arrive
as history and say nothing about fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any

import attrs
import orjson

__all__ = ["StreamProtocol", "StreamStats", "percentile", "run", "summarise"]

_HEADER_END = b"\r\n\r\n"
_SEQ = b'"seq":'
_TS = b'"ts":'
_DONE = b"event: done\n"
_FRAME_END = b"\n\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_LAST_EVENT_ID = b'"last_event_id":'
_POLL_DONE = b'"done":true}'
#: Seconds a poll waits for events (the client's default is 20, the server's 25).
POLL_WAIT_S = 25


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile of ``values`` (nearest rank; 0 for none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


@attrs.define(eq=False)
class StreamStats:
    """What one stream saw: its headers' delay, and every event's seq, ts and arrival."""

    group: int
    started_at: float = 0.0
    headers_at: float | None = None
    status: int | None = None
    seqs: array[int] = attrs.Factory(lambda: array("q"))
    ts: array[float] = attrs.Factory(lambda: array("d"))
    arrivals: array[float] = attrs.Factory(lambda: array("d"))
    done: bool = False
    error: str | None = None
    ended: bool = False
    #: Requests sent (1 for a stream; one per poll when long-polling).
    requests: int = 0
    #: Set when the last stream has its headers (or has failed before them).
    all_open: asyncio.Event | None = attrs.field(default=None, repr=False)
    _left: list[int] = attrs.Factory(lambda: [0])  # shared among the streams of a run

    def opened(self) -> None:
        """This stream has its headers or has failed: one fewer to wait for."""
        self._left[0] -= 1
        if self._left[0] == 0 and self.all_open is not None:
            self.all_open.set()


class StreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 GET of an SSE stream: status, chunked body, frames as (seq, ts)."""

    def __init__(self, request: bytes, stats: StreamStats, finished: asyncio.Future[None]):
        self.request = request
        self.stats = stats
        self.finished = finished
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._in_body = False
        self._raw = bytearray()  # chunked body bytes not yet decoded
        self._chunk_left = 0  # data bytes left in the current chunk
        self._chunk_crlf = False  # the current chunk's trailing CRLF is still due
        self._body = bytearray()  # decoded body not yet split into frames

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self._in_body:
            self._head += data
            end = self._head.find(_HEADER_END)
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self._in_body = True
            self.stats.headers_at = now
            self.stats.opened()
            self.stats.status = int(head[9:12])
            if self.stats.status != 200:
                self._finish(f"status {self.stats.status}")
                return
        self._raw += data
        if self._dechunk():
            self._frames(now)
            self._finish(None)
        else:
            self._frames(now)

    def _dechunk(self) -> bool:
        """Move whole chunk data from ``_raw`` to ``_body``; True at the last chunk."""
        raw = self._raw
        pos = 0
        while True:
            if self._chunk_left:
                take = min(self._chunk_left, len(raw) - pos)
                self._body += raw[pos : pos + take]
                pos += take
                self._chunk_left -= take
                if self._chunk_left:
                    break
                self._chunk_crlf = True
            if self._chunk_crlf:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self._chunk_crlf = False
            line_end = raw.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(raw[pos:line_end].split(b";", 1)[0], 16)
            pos = line_end + 2
            if size == 0:
                del raw[:pos]
                return True
            self._chunk_left = size
        del raw[:pos]
        return False

    def _frames(self, now: float) -> None:
        body = self._body
        end = body.rfind(_FRAME_END)
        if end < 0:
            return
        _events(body, end, self.stats, now)
        if body.find(_DONE, 0, end) >= 0:
            self.stats.done = True
        del body[: end + 2]

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(None if self.stats.done else f"closed: {exc or 'eof'}")

    def _finish(self, error: str | None) -> None:
        if self.stats.ended:
            return
        if self.stats.headers_at is None:
            self.stats.opened()
        self.stats.ended = True
        self.stats.error = error
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)


def _events(body: bytes | bytearray, end: int, stats: StreamStats, now: float) -> int:
    """Record every event's (seq, ts) in ``body[:end]``; where the last one ended."""
    pos = body.find(_SEQ, 0, end)
    ts_end = 0
    while pos >= 0:
        comma = body.find(b",", pos)
        ts_at = body.find(_TS, comma)
        ts_end = ts_at + 5
        while body[ts_end] not in b",}":
            ts_end += 1
        stats.seqs.append(int(body[pos + 6 : comma]))
        stats.ts.append(float(body[ts_at + 5 : ts_end]))
        stats.arrivals.append(now)
        pos = body.find(_SEQ, ts_end, end)
    return ts_end


class PollProtocol(asyncio.Protocol):
    """One watcher long-polling ``/events`` over one keep-alive HTTP/1.1 connection."""

    def __init__(self, path: str, host: str, stats: StreamStats, finished: asyncio.Future[None]):
        self.path = path
        self.host = host
        self.stats = stats
        self.finished = finished
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._body_at = -1  # where the current answer's body starts, once its head is read
        self._length = 0

    def _ask(self, after: int) -> None:
        assert self.transport is not None
        self.stats.requests += 1
        self.transport.write(
            f"GET {self.path}?after={after}&wait_s={POLL_WAIT_S} HTTP/1.1\r\n"
            f"Host: {self.host}\r\nAccept: application/json\r\n\r\n".encode()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._ask(0)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self._buffer
        buffer += data
        while True:
            if self._body_at < 0:
                end = buffer.find(_HEADER_END)
                if end < 0:
                    return
                status = int(buffer[9:12])
                if self.stats.headers_at is None:
                    self.stats.headers_at = now
                    self.stats.status = status
                    self.stats.opened()
                if status != 200:
                    self._finish(f"status {status}")
                    return
                head = bytes(buffer[:end]).lower()
                at = head.find(_CONTENT_LENGTH) + len(_CONTENT_LENGTH)
                line_end = head.find(b"\r\n", at)
                self._length = int(head[at : line_end if line_end >= 0 else len(head)])
                self._body_at = end + 4
            if len(buffer) - self._body_at < self._length:
                return
            body_end = self._body_at + self._length
            _events(buffer, body_end, self.stats, now)
            tail = buffer.rfind(_LAST_EVENT_ID, self._body_at, body_end)
            comma = buffer.find(b",", tail)
            last_event_id = int(buffer[tail + len(_LAST_EVENT_ID) : comma])
            done = buffer.find(_POLL_DONE, comma, body_end) >= 0
            del buffer[:body_end]
            self._body_at = -1
            if done:
                self.stats.done = True
                self._finish(None)
                return
            self._ask(last_event_id)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(None if self.stats.done else f"closed: {exc or 'eof'}")

    def _finish(self, error: str | None) -> None:
        if self.stats.ended:
            return
        if self.stats.headers_at is None:
            self.stats.opened()
        self.stats.ended = True
        self.stats.error = error
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)


def _raise_nofile(streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = streams + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


async def _open(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    path: str,
    stats: StreamStats,
    poll: bool = False,
) -> asyncio.Future[None]:
    finished: asyncio.Future[None] = loop.create_future()
    factory: Any
    if poll:
        events_path = path.split("?", 1)[0].removesuffix("/stream") + "/events"
        factory = lambda: PollProtocol(events_path, f"{host}:{port}", stats, finished)  # noqa: E731
    else:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        stats.requests = 1
        factory = lambda: StreamProtocol(request, stats, finished)  # noqa: E731
    stats.started_at = time.time()
    try:
        await loop.create_connection(factory, host, port)
    except OSError as exc:
        stats.ended = True
        stats.error = f"connect: {exc}"
        stats.opened()
        finished.set_result(None)
    return finished


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
    sys.stdout.flush()


async def run(spec: dict[str, Any]) -> list[StreamStats]:
    """Open every stream of ``spec`` at once and read them to their end (or the limit)."""
    host = "127.0.0.1"  # loopback only
    port = int(spec["port"])
    paths: list[str] = spec["paths"]
    groups: list[int] = spec.get("groups") or list(range(len(paths)))
    limit_s = float(spec["limit_s"])
    hold_s = spec.get("hold_s")
    poll = spec.get("transport") == "poll"
    _raise_nofile(len(paths))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    all_open = asyncio.Event()
    left = [len(paths)]
    stats = [StreamStats(group, all_open=all_open, left=left) for group in groups]
    if not paths:
        all_open.set()
    opening = [
        asyncio.ensure_future(_open(loop, host, port, path, s, poll))
        for path, s in zip(paths, stats, strict=True)
    ]
    finished = await asyncio.gather(*opening)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await all_open.wait()
    opened = [s.headers_at for s in stats if s.headers_at is not None]
    _emit({"event": "open", "opened": len(opened), "at": max(opened, default=time.time())})
    if hold_s is not None:
        await asyncio.sleep(min(float(hold_s), max(deadline - loop.time(), 0.0)))
    else:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*finished)
    for s in stats:
        if not s.ended:
            s.error = "held open" if hold_s is not None else "time limit"
    return stats


def summarise(stats: Sequence[StreamStats], from_seq_1: bool) -> dict[str, Any]:
    """The aggregate of every stream (see the module's docstring for the window)."""
    opened = [s.headers_at for s in stats if s.headers_at is not None]
    window_start = max(opened, default=0.0)
    header_ms = [(s.headers_at - s.started_at) * 1000 for s in stats if s.headers_at is not None]
    lags_ms = array("d")
    live_seqs: dict[int, set[int]] = {}
    deliveries = 0
    last_arrival = window_start
    window_end = window_start
    failed = gappy = 0
    for s in stats:
        if s.status != 200 or (s.error is not None and s.error != "held open"):
            failed += 1
        seqs = s.seqs
        if seqs and (
            any(b - a != 1 for a, b in itertools.pairwise(seqs)) or (from_seq_1 and seqs[0] != 1)
        ):
            gappy += 1
        group = live_seqs.setdefault(s.group, set())
        for seq, ts, at in zip(seqs, s.ts, s.arrivals, strict=True):
            if ts >= window_start:
                lags_ms.append((at - ts) * 1000)
                group.add(seq)
                deliveries += 1
                last_arrival = max(last_arrival, at)
                window_end = max(window_end, ts)
    ideal_events = sum(len(live_seqs[s.group]) for s in stats)
    window_s = window_end - window_start
    return {
        "streams": len(stats),
        "opened": len(opened),
        "failed": failed,
        "gappy": gappy,
        "done": sum(s.done for s in stats),
        "events": sum(len(s.seqs) for s in stats),
        "requests": sum(s.requests for s in stats),
        "window_s": window_s,
        "ideal_per_s": ideal_events / window_s if window_s > 0 else 0.0,
        "delivered_per_s": deliveries / max(last_arrival - window_start, window_s)
        if deliveries
        else 0.0,
        "deliveries": deliveries,
        "lag_ms": [percentile(lags_ms, p) for p in (50, 99)] + [max(lags_ms, default=0.0)],
        "headers_p99_ms": percentile(header_ms, 99),
        "errors": sorted({s.error for s in stats if s.error and s.error != "held open"})[:5],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.loadgen SPEC.json``: run the spec, print the JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="a JSON file: port, paths, groups, limit_s, hold_s")
    args = parser.parse_args(argv)
    with open(args.spec, "rb") as f:
        spec = orjson.loads(f.read())
    stats = asyncio.run(run(spec))
    summary = summarise(stats, bool(spec.get("from_seq_1")))
    _emit({"event": "result", **summary, "loadgen_cpu_s": time.process_time()})


if __name__ == "__main__":
    main()
