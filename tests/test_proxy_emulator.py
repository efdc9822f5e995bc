"""Tests for the buffering reverse proxy emulator (app/pathtools/proxy/).

Proxy tests use real sockets: an in-process aiohttp upstream that writes a timed
script, the proxy in front of it, and an aiohttp client that timestamps every chunk.
All timestamps come from the same event loop clock, so arrival times can be compared
with the upstream's write times directly. Margins are deliberately generous.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import attrs
import pytest
import structlog.testing
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from app.pathtools.proxy import (
    BufferingProxy,
    ProxyConfig,
    ReleaseBuffer,
    ReleaseModel,
    ReleaseReason,
)
from app.pathtools.proxy.command import configure_parser, run_from_args


def _now() -> float:
    return asyncio.get_running_loop().time()


# --- test upstream -----------------------------------------------------------------


@attrs.define
class Upstream:
    """In-process upstream: sends headers at once, then ``script`` of (delay_s, bytes)."""

    url: str = ""
    script: list[tuple[float, bytes]] = attrs.field(factory=list)
    abort_at_end: bool = False
    response_headers: dict[str, str] = attrs.field(
        factory=lambda: {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    seen_method: str = ""
    seen_path: str = ""
    seen_headers: Mapping[str, str] = attrs.field(factory=dict)
    seen_body: bytes = b""
    prepared_at: float = 0.0
    write_times: list[float] = attrs.field(factory=list)
    outcome: str = ""
    done: asyncio.Event = attrs.field(factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen_method = request.method
        self.seen_path = request.raw_path
        self.seen_headers = request.headers.copy()
        self.seen_body = await request.read()
        response = web.StreamResponse(headers=self.response_headers)
        try:
            await response.prepare(request)
            self.prepared_at = _now()
            for delay_s, data in self.script:
                await asyncio.sleep(delay_s)
                self.write_times.append(_now())
                await response.write(data)
            if self.abort_at_end:
                assert request.transport is not None
                request.transport.close()
                self.outcome = "aborted"
            else:
                await response.write_eof()
                self.outcome = "complete"
        except ConnectionError:
            self.outcome = "write_failed"
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        finally:
            self.done.set()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


@asynccontextmanager
async def proxied(upstream: Upstream, **config: Any) -> AsyncIterator[BufferingProxy]:
    async with BufferingProxy(ProxyConfig(upstream=upstream.url, **config)) as proxy:
        yield proxy


# --- recording client --------------------------------------------------------------


@attrs.define
class Received:
    """What the client saw: when headers arrived and each chunk with its arrival time."""

    started_at: float
    status: int = 0
    headers: Mapping[str, str] = attrs.field(factory=dict)
    headers_at: float = 0.0
    chunks: list[tuple[float, bytes]] = attrs.field(factory=list)
    error: BaseException | None = None

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    def bursts(self, gap_s: float = 0.1) -> list[tuple[float, int]]:
        """Chunks merged when they arrive within gap_s of each other: (first arrival, bytes)."""
        merged: list[tuple[float, int]] = []
        last_at = -1e9
        for at, data in self.chunks:
            if merged and at - last_at < gap_s:
                merged[-1] = (merged[-1][0], merged[-1][1] + len(data))
            else:
                merged.append((at, len(data)))
            last_at = at
        return merged


async def fetch(
    url: str, *, method: str = "GET", received: Received | None = None, **kwargs: Any
) -> Received:
    """Requests url through a fresh session, recording headers and chunk arrival times."""
    got = received if received is not None else Received(started_at=_now())
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, **kwargs) as resp,
    ):
        got.headers_at = _now()
        got.status = resp.status
        got.headers = resp.headers.copy()
        try:
            async for data in resp.content.iter_any():
                got.chunks.append((_now(), data))
        except aiohttp.ClientPayloadError as exc:
            got.error = exc
    return got


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- ReleaseBuffer unit tests ------------------------------------------------------


def test_buffer_all_releases_everything_once_threshold_reached() -> None:
    """Model 'all' holds below the threshold, then releases every held byte at once."""
    buffer = ReleaseBuffer(100, ReleaseModel.ALL)
    assert buffer.feed(b"a" * 60, 1.0) is None
    release = buffer.feed(b"b" * 70, 1.5)
    assert release is not None
    assert release.data == b"a" * 60 + b"b" * 70
    assert release.reason is ReleaseReason.THRESHOLD
    assert release.held_ms == pytest.approx(500.0)
    assert buffer.held_bytes == 0
    assert buffer.flush(2.0) is None


def test_buffer_blocks_keeps_remainder() -> None:
    """Model 'blocks' releases only whole threshold blocks and keeps the remainder held."""
    buffer = ReleaseBuffer(100, ReleaseModel.BLOCKS)
    assert buffer.feed(b"x" * 90, 0.0) is None
    release = buffer.feed(b"y" * 250, 1.0)
    assert release is not None
    assert release.data == b"x" * 90 + b"y" * 210
    assert buffer.held_bytes == 40
    assert buffer.feed(b"z" * 10, 2.0) is None
    final = buffer.flush(3.0)
    assert final is not None
    assert final.data == b"y" * 40 + b"z" * 10
    assert final.reason is ReleaseReason.EOF
    assert final.held_ms == pytest.approx(2000.0)  # remainder's oldest byte arrived at t=1


def test_buffer_threshold_zero_passes_each_feed_through() -> None:
    """Threshold 0 releases every non-empty feed immediately, in both models."""
    for model in ReleaseModel:
        buffer = ReleaseBuffer(0, model)
        assert buffer.feed(b"", 0.0) is None
        release = buffer.feed(b"abc", 0.0)
        assert release is not None
        assert release.data == b"abc"
        assert release.held_ms == 0.0


def test_buffer_max_hold_releases_when_due() -> None:
    """With max_hold_s, held bytes become due once the oldest waited that long."""
    buffer = ReleaseBuffer(4096, max_hold_s=0.5)
    assert buffer.deadline is None
    assert buffer.feed(b"abc", 10.0) is None
    assert buffer.deadline == pytest.approx(10.5)
    assert buffer.due(10.4) is None
    release = buffer.due(10.6)
    assert release is not None
    assert release.data == b"abc"
    assert release.reason is ReleaseReason.MAX_HOLD
    assert release.held_ms == pytest.approx(600.0)
    assert buffer.deadline is None


def test_buffer_gzip_counts_compressed_bytes_and_round_trips() -> None:
    """In gzip mode padding compresses away, a max_hold release is decodable, EOF finishes."""
    buffer = ReleaseBuffer(1024, max_hold_s=1.0, gzip=True)
    first = b"data: one\n\n" + b":" + b" " * 8000 + b"\n\n"
    assert buffer.feed(first, 0.0) is None  # 8 KB raw, but far below 1 KB compressed
    timed = buffer.due(1.0)
    assert timed is not None
    decoder = zlib.decompressobj(wbits=31)
    assert decoder.decompress(timed.data) == first
    assert buffer.feed(b"data: two\n\n", 2.0) is None
    final = buffer.flush(2.5)
    assert final is not None
    assert decoder.decompress(final.data) == b"data: two\n\n"
    assert decoder.eof


@given(
    chunks=st.lists(st.binary(max_size=300), max_size=30),
    threshold=st.integers(min_value=0, max_value=1000),
    model=st.sampled_from(list(ReleaseModel)),
)
def test_buffer_releases_preserve_bytes_and_respect_threshold(
    chunks: list[bytes], threshold: int, model: ReleaseModel
) -> None:
    """Any feed sequence: output equals input, held stays below threshold, blocks are whole."""
    buffer = ReleaseBuffer(threshold, model)
    out = []
    for i, chunk in enumerate(chunks):
        release = buffer.feed(chunk, float(i))
        if release is not None:
            out.append(release)
            if model is ReleaseModel.BLOCKS and threshold:
                assert len(release.data) % threshold == 0
        assert buffer.held_bytes < max(threshold, 1)
    final = buffer.flush(float(len(chunks)))
    released = b"".join(r.data for r in out) + (final.data if final else b"")
    assert released == b"".join(chunks)
    assert buffer.held_bytes == 0


# --- config and CLI ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--upstream", "ftp://example.com"], "--upstream"),
        (["--upstream", "http://"], "--upstream"),
        (["--upstream", "http://x", "--threshold", "-1"], "--threshold"),
        (["--upstream", "http://x", "--max-hold-s", "0"], "--max-hold-s"),
        (["--upstream", "http://x", "--port", "70000"], "--port"),
    ],
)
def test_run_from_args_rejects_bad_values(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad option values give exit code 2 and one stderr line naming the option."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run_from_args(parser.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert option in err
    assert len(err.strip().splitlines()) == 1


def test_parser_defaults() -> None:
    """The parser's defaults match the documented ones."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--upstream", "http://127.0.0.1:8080"])
    assert (args.threshold, args.release, args.gzip, args.max_hold_s) == (4096, "all", False, None)
    assert (args.host, args.port) == ("127.0.0.1", 8081)
    config = ProxyConfig(upstream=args.upstream, release="blocks")
    assert config.release is ReleaseModel.BLOCKS


# --- through the proxy ---------------------------------------------------------------


async def test_small_writes_arrive_in_one_burst_at_the_end(upstream: Upstream) -> None:
    """Below the threshold, 100 ms-spaced small writes reach the client only at EOF."""
    upstream.script = [(0.1, b"data: %d\n\n" % i) for i in range(8)]
    async with proxied(upstream, threshold_bytes=4096) as proxy:
        got = await fetch(proxy.url + "/events")
    assert got.status == 200
    assert got.body == b"".join(data for _, data in upstream.script)
    assert len(got.bursts()) == 1
    assert got.chunks[0][0] >= upstream.write_times[-1]
    assert got.chunks[0][0] - got.started_at >= 0.5
    assert got.headers_at >= upstream.write_times[-1]


async def test_crossing_threshold_releases_everything_held(upstream: Upstream) -> None:
    """Model 'all': the write that brings held to >= 4096 releases all held bytes promptly."""
    upstream.script = [(0.1, b"a" * 3000)] + [(0.3, b"a" * 3000)] * 4 + [(0.3, b"")]
    with structlog.testing.capture_logs() as logs:
        async with proxied(upstream, threshold_bytes=4096, release="all") as proxy:
            got = await fetch(proxy.url + "/")
    bursts = got.bursts()
    assert [size for _, size in bursts] == [6000, 6000, 3000]
    writes = upstream.write_times
    assert writes[1] <= bursts[0][0] < writes[2]
    assert writes[3] <= bursts[1][0] < writes[4]
    releases = [e for e in logs if e["event"] == "proxy_release"]
    assert [(e["bytes"], e["reason"]) for e in releases] == [
        (6000, "threshold"),
        (6000, "threshold"),
        (3000, "eof"),
    ]
    assert releases[0]["held_ms"] >= 200  # the first 3000 bytes waited ~300 ms
    (summary,) = [e for e in logs if e["event"] == "proxy_request"]
    assert summary["body_bytes"] == 15000
    assert summary["releases"] == 3
    assert summary["status"] == 200
    assert summary["outcome"] == "complete"


async def test_blocks_model_forwards_whole_blocks(upstream: Upstream) -> None:
    """Model 'blocks': only multiples of 4096 arrive until EOF flushes the remainder."""
    upstream.script = [(0.1, b"b" * 3000)] + [(0.25, b"b" * 3000)] * 4 + [(0.25, b"")]
    async with proxied(upstream, threshold_bytes=4096, release="blocks") as proxy:
        got = await fetch(proxy.url + "/")
    assert got.body == b"b" * 15000
    assert [size for _, size in got.bursts()] == [4096, 4096, 4096, 15000 - 3 * 4096]
    # Until the EOF flush, every prefix the client had received ended on a block boundary.
    sizes = [len(data) for _, data in got.chunks]
    prefix_ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    assert all(end % 4096 == 0 for end in prefix_ends if end <= 3 * 4096)


async def test_headers_held_until_first_release(upstream: Upstream) -> None:
    """Response headers reach the client only with the first body release, not before."""
    upstream.script = [(0.6, b"x" * 5000), (0.3, b"tail")]
    async with proxied(upstream, threshold_bytes=4096) as proxy:
        got = await fetch(proxy.url + "/")
    assert upstream.write_times[0] - upstream.prepared_at >= 0.5  # upstream sent them early
    assert got.headers_at >= upstream.write_times[0]
    assert got.headers_at - got.started_at >= 0.5
    assert got.headers["Content-Type"] == "text/event-stream"


async def test_threshold_zero_passes_each_write_through(upstream: Upstream) -> None:
    """Threshold 0 forwards headers at once and every write within 0.2 s of being written."""
    upstream.script = [(0.3, b"data: %d\n\n" % i) for i in range(5)]
    async with proxied(upstream, threshold_bytes=0) as proxy:
        got = await fetch(proxy.url + "/")
    assert got.headers_at < upstream.write_times[0]
    bursts = got.bursts()
    assert len(bursts) == 5
    for (arrived_at, _), written_at in zip(bursts, upstream.write_times, strict=True):
        assert 0 <= arrived_at - written_at < 0.2


def _padded_events(count: int) -> list[tuple[float, bytes]]:
    return [(0.15, b"data: event %d\n\n:" % i + b" " * 5000 + b"\n\n") for i in range(count)]


async def test_gzip_padding_does_not_force_release(upstream: Upstream) -> None:
    """With gzip, 5 KB comment padding per event compresses away: one burst at EOF, exact body."""
    upstream.script = _padded_events(6)
    async with proxied(upstream, threshold_bytes=4096, gzip=True) as proxy:
        got = await fetch(proxy.url + "/")
    assert got.headers["Content-Encoding"] == "gzip"
    assert zlib.decompress(got.body, wbits=31) == b"".join(d for _, d in upstream.script)
    assert len(got.bursts()) == 1
    assert got.chunks[0][0] >= upstream.write_times[-1]


async def test_without_gzip_the_same_padding_releases_every_event(upstream: Upstream) -> None:
    """Contrast: uncompressed, each padded event exceeds 4096 bytes and is released at once."""
    upstream.script = _padded_events(6)
    async with proxied(upstream, threshold_bytes=4096) as proxy:
        got = await fetch(proxy.url + "/")
    assert "Content-Encoding" not in got.headers
    assert len(got.bursts()) == 6


async def test_max_hold_releases_without_further_upstream_bytes(upstream: Upstream) -> None:
    """max_hold_s=0.3 releases a lone small write long before the next upstream write."""
    upstream.script = [(0.1, b"data: early\n\n"), (1.5, b"data: late\n\n")]
    async with proxied(upstream, threshold_bytes=4096, max_hold_s=0.3) as proxy:
        got = await fetch(proxy.url + "/")
    first_at, first = got.chunks[0]
    assert first == b"data: early\n\n"
    assert 0.2 <= first_at - upstream.write_times[0] < 1.0
    assert first_at < upstream.write_times[1]
    assert got.body == b"data: early\n\ndata: late\n\n"


async def test_request_details_reach_upstream(upstream: Upstream) -> None:
    """Method, raw path+query, body, Last-Event-ID and Accept pass through; no added headers."""
    upstream.script = [(0.0, b"ok")]
    upstream.response_headers = {"Content-Type": "text/plain", "X-Upstream": "yes"}
    async with proxied(upstream, threshold_bytes=4096) as proxy:
        got = await fetch(
            proxy.url + "/events?stream=a%20b&after=7",
            method="POST",
            data=b"hello",
            headers={"Last-Event-ID": "42", "Accept": "text/event-stream", "X-Trace": "t1"},
            skip_auto_headers=["Accept-Encoding", "User-Agent"],
        )
    assert upstream.seen_method == "POST"
    assert upstream.seen_path == "/events?stream=a%20b&after=7"
    assert upstream.seen_body == b"hello"
    assert upstream.seen_headers["Last-Event-ID"] == "42"
    assert upstream.seen_headers["Accept"] == "text/event-stream"
    assert upstream.seen_headers["X-Trace"] == "t1"
    assert "Accept-Encoding" not in upstream.seen_headers
    assert "User-Agent" not in upstream.seen_headers
    assert got.headers["X-Upstream"] == "yes"
    assert got.body == b"ok"


@pytest.mark.parametrize("threshold", [0, 4096])
async def test_client_disconnect_closes_upstream(upstream: Upstream, threshold: int) -> None:
    """A client that goes away (while bytes flow or are held) closes the upstream promptly."""
    upstream.script = [(0.1, b"data: tick\n\n")] * 100
    with structlog.testing.capture_logs() as logs:
        async with proxied(upstream, threshold_bytes=threshold) as proxy:
            client = asyncio.ensure_future(fetch(proxy.url + "/events"))
            await asyncio.sleep(0.5)
            client.cancel()
            await asyncio.wait({client})
            await asyncio.wait_for(upstream.done.wait(), timeout=2.0)
    assert upstream.outcome in ("write_failed", "cancelled")
    assert len(upstream.write_times) < 50
    (summary,) = [e for e in logs if e["event"] == "proxy_request"]
    assert summary["outcome"] == "client_disconnected"


async def test_upstream_abort_cuts_client_after_flushing(upstream: Upstream) -> None:
    """An upstream that dies mid-body makes the client see the held bytes, then an error."""
    upstream.script = [(0.1, b"data: partial\n\n"), (0.2, b"")]
    upstream.abort_at_end = True
    async with proxied(upstream, threshold_bytes=4096) as proxy:
        got = await asyncio.wait_for(fetch(proxy.url + "/"), timeout=3.0)
    assert got.status == 200
    assert got.body == b"data: partial\n\n"
    assert isinstance(got.error, aiohttp.ClientPayloadError)


async def test_unreachable_upstream_gives_502_json() -> None:
    """A refused upstream connection becomes 502 with a bad_gateway JSON error body."""
    config = ProxyConfig(upstream=f"http://127.0.0.1:{free_port()}")
    async with (
        BufferingProxy(config) as proxy,
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/events") as resp,
    ):
        assert resp.status == 502
        assert resp.content_type == "application/json"
        payload = await resp.json()
    assert payload["error"]["code"] == "bad_gateway"
    assert payload["error"]["message"]


async def test_close_cuts_open_streams_quickly(upstream: Upstream) -> None:
    """close() ends an open stream and its upstream within a couple of seconds."""
    upstream.script = [(0.1, b"data: tick\n\n")] * 100
    received = Received(started_at=_now())
    proxy = BufferingProxy(ProxyConfig(upstream=upstream.url, threshold_bytes=0))
    await proxy.start()
    client = asyncio.ensure_future(fetch(proxy.url + "/", received=received))
    await asyncio.sleep(0.5)
    assert received.chunks
    started_close = _now()
    await asyncio.wait_for(proxy.close(), timeout=3.0)
    assert _now() - started_close < 2.0
    await asyncio.wait_for(asyncio.wait({client}), timeout=2.0)
    await asyncio.wait_for(upstream.done.wait(), timeout=2.0)
    assert upstream.outcome in ("write_failed", "cancelled")
    client.exception()  # retrieved: a truncated stream may surface as any client error
