"""What a real nginx (Debian 1.22) does to a Server-Sent Events stream, per proxy mode.

Every test starts a tiny aiohttp upstream that streams ``text/event-stream`` with
``X-Accel-Buffering: no`` -- 100-byte frames every 100 ms -- puts a real nginx in
front of it (``tests/support/nginx.py``) and records, on the client side, when the
response headers arrived, when each SSE frame arrived and how nginx cut the body
into HTTP chunks (each chunk nginx sends is one "release").

Observed with nginx 1.22.1, default buffer sizes (x86-64: 4096-byte pages), an
aiohttp upstream whose HTTP/1.0 response head is H = 173 bytes:

* HTTP10 (proxy_http_version 1.0, buffering on, X-Accel-Buffering ignored):
  nginx reads the upstream into fixed buffers and only passes a buffer on when it
  is completely full (or the upstream closes).  The first buffer is the
  ``proxy_buffer_size`` header buffer, which also holds the upstream's response
  head, so the first release is ``proxy_buffer_size - H`` body bytes (4096 - 173 =
  3923); every later release is one full ``proxy_buffers`` buffer (4096).  The
  remainder stays in nginx until the upstream closes.  The client's response
  headers are held back until that first release as well.
* GZIP (gzip covers text/event-stream, buffering on, X-Accel-Buffering ignored):
  headers and body are held until the end.  Padding with repeated characters never
  helps (64 KiB of it compresses to a few hundred bytes); zlib emits its first
  block only after ~16 K input symbols, so it takes ~20-24 KB of base64-random
  padding in one go before anything leaves (16 KB: nothing until EOF; 20 KB: only
  at the next upstream write; 24 KB: at once), and it leaves in whole 4096-byte
  gzip buffers (12288 bytes for the first one).
* HTTP11 (proxy_http_version 1.1, buffering on): headers at once, each upstream
  chunk forwarded as soon as it is complete -- even with X-Accel-Buffering ignored.
* RECOMMENDED (config/nginx/flushline.conf): like HTTP11, never compressed, and
  ``Last-Event-ID`` plus the X-Forwarded-* headers reach the upstream.
* ``X-Accel-Buffering: no`` alone (not ignored) makes even HTTP/1.0 proxying and
  gzip stream live.
"""

from __future__ import annotations

import asyncio
import base64
import math
import pathlib
import random
import re
import time
import zlib
from collections.abc import AsyncIterator, Mapping

import aiohttp
import attrs
import pytest
from aiohttp import web

from tests.support import nginx as nginx_support
from tests.support.nginx import (
    RECOMMENDED_CONF,
    NginxMode,
    NginxStartError,
    render_nginx_conf,
    require_nginx,
    run_nginx,
)

FRAMES = 15
INTERVAL = 0.1
FRAME_SIZE = 100
STREAMED_BODY = FRAMES * FRAME_SIZE  # 1500 bytes, well under one 4 KiB buffer
PAGE = 4096  # nginx's default proxy_buffer_size / proxy_buffers size on x86-64

# Timing margins: "live" = within LIVE of being sent; anything held by nginx
# arrives at least HELD_GAP later than it was sent (the tests are built so that
# held data is released >= 1 s after being sent).
LIVE = 0.35
HELD_GAP = 0.9
EPS = 0.02  # the release cannot come before the write that causes it


# --------------------------------------------------------------------------- upstream


@attrs.define
class StreamLog:
    """What the upstream did for one request (monotonic times)."""

    request_headers: Mapping[str, str] = attrs.field(factory=dict)
    head_bytes: int = 0  # size of the response head the upstream wrote
    sent: dict[str, float] = attrs.field(factory=dict)  # SSE id -> time written
    pad_at: float | None = None
    eof_at: float | None = None
    body_bytes: int = 0


@attrs.define
class Upstream:
    port: int
    logs: list[StreamLog]

    @property
    def last(self) -> StreamLog:
        assert self.logs, "the upstream saw no stream request"
        return self.logs[-1]


LOGS = web.AppKey("logs", list[StreamLog])


def _frame(event_id: int) -> bytes:
    head = f"id: {event_id}\ndata: "
    return (head + "x" * (FRAME_SIZE - len(head) - 2) + "\n\n").encode()


def _padding(size: int, kind: str) -> bytes:
    """An SSE comment of exactly ``size`` bytes."""
    n = size - 4
    if kind == "random":  # base64 of seeded random bytes: barely compressible
        filler = base64.b64encode(random.Random(1).randbytes(n)).decode()[:n]
    else:
        filler = "p" * n
    return f": {filler}\n\n".encode()


def _response_head(request: web.Request, resp: web.StreamResponse) -> int:
    """Byte size of the status line + headers aiohttp wrote (it has no public counter)."""
    v = request.version
    head = f"HTTP/{v.major}.{v.minor} {resp.status} {resp.reason}\r\n"
    head += "".join(f"{k}: {val}\r\n" for k, val in resp.headers.items()) + "\r\n"
    return len(head.encode("latin-1"))


async def _sse(request: web.Request) -> web.StreamResponse:
    """Query: frames, pad (bytes), pad_kind (repeat|random), tail (s before EOF)."""
    q = request.query
    frames = int(q.get("frames", FRAMES))
    pad = int(q.get("pad", 0))
    tail = float(q.get("tail", 1.0))
    log = StreamLog(request_headers=dict(request.headers))
    request.app[LOGS].append(log)

    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    log.head_bytes = _response_head(request, resp)
    for i in range(frames):
        log.sent[str(i)] = time.monotonic()
        data = _frame(i)
        await resp.write(data)
        log.body_bytes += len(data)
        await asyncio.sleep(INTERVAL)
    if pad:
        log.pad_at = time.monotonic()
        data = _padding(pad, q.get("pad_kind", "repeat"))
        await resp.write(data)
        log.body_bytes += len(data)
    await asyncio.sleep(tail)
    log.eof_at = time.monotonic()
    await resp.write_eof()
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = web.Application()
    app[LOGS] = []
    app.router.add_get("/api/jobs/{job_id}/stream", _sse)
    app.router.add_get("/api/diagnostics/stream", _sse)
    app.router.add_get("/api/other/stream", _sse)  # not a stream location in the config
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Upstream(port=port, logs=app[LOGS])
    finally:
        await runner.cleanup()


@pytest.fixture
def nginx_ready() -> str:
    return require_nginx()


# --------------------------------------------------------------------------- client


@attrs.define
class Received:
    """What the client saw (monotonic times)."""

    status: int
    headers: Mapping[str, str]
    headers_at: float
    releases: list[tuple[float, int]]  # (arrival, size) of each HTTP chunk, raw bytes
    frames: dict[str, float]  # SSE id -> arrival of its terminating blank line
    body: bytes  # decoded (gunzipped when Content-Encoding: gzip)

    def released_before(self, t: float) -> int:
        return sum(size for at, size in self.releases if at < t)


_ID_RE = re.compile(rb"^id: (\S+)$", re.M)


async def fetch(url: str, headers: Mapping[str, str] | None = None) -> Received:
    """GET an SSE url and time every HTTP chunk and every SSE frame as it arrives."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session,
        session.get(url, headers=dict(headers or {})) as resp,
    ):
        headers_at = time.monotonic()
        gzipped = resp.headers.get("Content-Encoding") == "gzip"
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
        releases: list[tuple[float, int]] = []
        frames: dict[str, float] = {}
        body = b""
        pending = 0
        async for data, end_of_chunk in resp.content.iter_chunks():
            now = time.monotonic()
            pending += len(data)
            if end_of_chunk and pending:
                releases.append((now, pending))
                pending = 0
            plain = inflater.decompress(data) if inflater else data
            before = body.count(b"\n\n")
            body += plain
            # every newly completed frame arrived now
            for block in body.split(b"\n\n")[before : body.count(b"\n\n")]:
                if m := _ID_RE.search(block):
                    frames[m[1].decode()] = now
        if pending:
            releases.append((time.monotonic(), pending))
        if inflater:
            body += inflater.flush()
        return Received(
            status=resp.status,
            headers=dict(resp.headers),
            headers_at=headers_at,
            releases=releases,
            frames=frames,
            body=body,
        )


def report(label: str, log: StreamLog, got: Received) -> None:
    """Print the timeline (visible with ``pytest -s``; kept for the bench/probe design)."""
    t0 = log.sent["0"]
    print(f"\n[{label}] upstream head={log.head_bytes}B body={log.body_bytes}B", end="")
    if log.pad_at is not None:
        print(f" pad@{log.pad_at - t0:.3f}s", end="")
    print(f" eof@{(log.eof_at or t0) - t0:.3f}s; client headers@{got.headers_at - t0:.3f}s")
    cum = 0
    for at, size in got.releases:
        cum += size
        print(f"    release @{at - t0:.3f}s {size:6d}B (cum {cum})")


def _frames_from(log: StreamLog) -> bytes:
    return b"".join(_frame(int(i)) for i in log.sent)


def assert_live(log: StreamLog, got: Received) -> None:
    assert set(got.frames) == set(log.sent)
    lags = {i: got.frames[i] - log.sent[i] for i in log.sent}
    assert max(lags.values()) < LIVE, f"frames not live, lag per id: {lags}"
    # and spread over time, like they were sent
    assert got.frames[str(FRAMES - 1)] - got.frames["0"] > (FRAMES - 1) * INTERVAL * 0.8
    assert got.headers_at - log.sent["0"] < LIVE


def assert_burst_at(t: float, log: StreamLog, got: Received) -> None:
    """Every frame (and the headers) arrived together when ``t`` happened, not when sent."""
    assert set(got.frames) == set(log.sent)
    for i in log.sent:
        assert got.frames[i] >= t - EPS, f"frame {i} arrived before {t=}"
        assert got.frames[i] < t + LIVE, f"frame {i} arrived late after {t=}"
    assert got.frames["0"] - log.sent["0"] > HELD_GAP
    assert t - EPS <= got.headers_at < t + LIVE


def url(nginx_url: str, path: str = "/api/jobs/7/stream", **query: object) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{nginx_url}{path}?{qs}" if qs else f"{nginx_url}{path}"


# --------------------------------------------------------------------------- HTTP10


@pytest.mark.integration
async def test_http10_holds_headers_and_small_frames_until_upstream_closes(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """HTTP/1.0 buffering holds headers and 1500 B of frames until EOF, then one burst."""
    async with run_nginx(upstream.port, NginxMode.HTTP10, tmp_dir=tmp_path) as nginx:
        got = await fetch(url(nginx.url, tail=1.0))
    log = upstream.last
    report("http10 no pad", log, got)
    assert log.eof_at is not None
    assert got.status == 200
    assert got.headers["Content-Type"] == "text/event-stream"
    assert "X-Accel-Buffering" not in got.headers  # nginx hides X-Accel-* from clients
    assert_burst_at(log.eof_at, log, got)
    assert [size for _, size in got.releases] == [STREAMED_BODY]
    assert got.body == _frames_from(log)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("pad", "extra", "header_buffer", "buffer"),
    [
        pytest.param(3000, "", PAGE, PAGE, id="just-past-4k"),
        pytest.param(10000, "", PAGE, PAGE, id="past-8k"),
        pytest.param(10000, "proxy_buffers 8 8k;", PAGE, 2 * PAGE, id="8k-proxy-buffers"),
    ],
)
async def test_http10_padding_releases_only_whole_buffers(
    nginx_ready: str,
    upstream: Upstream,
    tmp_path: pathlib.Path,
    pad: int,
    extra: str,
    header_buffer: int,
    buffer: int,
) -> None:
    """A padded write releases headers+frames at once, but only up to the last full buffer."""
    async with run_nginx(
        upstream.port, NginxMode.HTTP10, tmp_dir=tmp_path, extra_directives=extra
    ) as nginx:
        got = await fetch(url(nginx.url, pad=pad, tail=1.0))
    log = upstream.last
    report(f"http10 pad={pad} {extra}", log, got)
    assert log.pad_at is not None
    assert log.eof_at is not None
    total = log.body_bytes
    assert total == STREAMED_BODY + pad
    # The first buffer is proxy_buffer_size and also carries the upstream's
    # response head; later buffers are proxy_buffers-sized.  Only full ones leave.
    first = header_buffer - log.head_bytes
    assert 0 < first < STREAMED_BODY + pad
    expected_early = first + (total - first) // buffer * buffer

    # headers and all frames: released by the padded write, long before EOF
    assert_burst_at(log.pad_at, log, got)
    assert got.frames[str(FRAMES - 1)] < log.eof_at - 0.5
    # exactly the full buffers left at pad time ...
    assert got.released_before(log.eof_at - EPS) == expected_early
    assert got.releases[0][1] in {first + k * buffer for k in range(4)}
    cum = 0
    for at, size in got.releases:
        cum += size
        if at < log.eof_at - EPS:  # every early release ends on a buffer boundary
            assert (cum - first) % buffer == 0, got.releases
    # ... and the remainder only at EOF
    assert got.releases[-1][0] >= log.eof_at - EPS
    assert sum(size for _, size in got.releases) == total
    assert got.body == _frames_from(log) + _padding(pad, "repeat")


@pytest.mark.integration
async def test_http10_first_release_is_proxy_buffer_size_minus_upstream_head(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """With proxy_buffer_size 1k the headers and first 1024-H body bytes leave mid-stream."""
    async with run_nginx(
        upstream.port, NginxMode.HTTP10, tmp_dir=tmp_path, extra_directives="proxy_buffer_size 1k;"
    ) as nginx:
        got = await fetch(url(nginx.url, tail=1.0))
    log = upstream.last
    report("http10 proxy_buffer_size 1k", log, got)
    assert log.eof_at is not None
    first = 1024 - log.head_bytes
    filler = math.ceil(first / FRAME_SIZE) - 1  # the frame that fills the header buffer
    assert got.releases[0][1] == first
    assert log.sent[str(filler)] - EPS <= got.headers_at < log.sent[str(filler)] + LIVE
    assert log.sent[str(filler)] - EPS <= got.releases[0][0] < log.sent[str(filler)] + LIVE
    # the rest (< one 4 KiB proxy_buffer) waits for EOF
    assert got.releases[1][0] >= log.eof_at - EPS
    assert sum(size for _, size in got.releases) == STREAMED_BODY


@pytest.mark.integration
async def test_x_accel_buffering_no_alone_makes_http10_proxying_live(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """proxy_http_version 1.0 + buffering on still streams live if X-Accel-Buffering is honoured."""
    conf = RECOMMENDED_CONF.read_text()
    conf = conf.replace("proxy_http_version 1.1;", "proxy_http_version 1.0;")
    conf = conf.replace("proxy_buffering off;", "proxy_buffering on;")
    variant = tmp_path / "http10-honour.conf"
    variant.write_text(conf)
    async with run_nginx(
        upstream.port,
        NginxMode.RECOMMENDED,
        tmp_dir=tmp_path / "nginx",
        recommended_conf=variant,
    ) as nginx:
        text = nginx.config_path.read_text()
        assert "proxy_http_version 1.0;" in text
        assert "proxy_buffering off;" not in text
        got = await fetch(url(nginx.url, tail=0.2))
    log = upstream.last
    report("http10 honouring X-Accel-Buffering", log, got)
    assert_live(log, got)


# --------------------------------------------------------------------------- GZIP


@pytest.mark.integration
async def test_gzip_holds_everything_until_end_despite_repeated_padding(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """gzip on text/event-stream: gzip-encoded, headers and frames all held until EOF."""
    async with run_nginx(upstream.port, NginxMode.GZIP, tmp_dir=tmp_path) as nginx:
        got = await fetch(url(nginx.url, pad=64 * 1024, tail=1.0), {"Accept-Encoding": "gzip"})
    log = upstream.last
    report("gzip repeat pad 64k", log, got)
    assert log.eof_at is not None
    assert got.headers["Content-Encoding"] == "gzip"
    assert_burst_at(log.eof_at, log, got)
    assert all(at >= log.eof_at - EPS for at, _ in got.releases)
    assert sum(size for _, size in got.releases) < 2048  # 65 KB of 'p' squeezes to ~100 B
    assert got.body == _frames_from(log) + _padding(64 * 1024, "repeat")


@pytest.mark.integration
async def test_gzip_releases_only_after_lots_of_incompressible_padding(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """gzip lets frames out before EOF only after > 16 KiB of incompressible padding."""
    pad = 64 * 1024
    async with run_nginx(upstream.port, NginxMode.GZIP, tmp_dir=tmp_path) as nginx:
        got = await fetch(
            url(nginx.url, pad=pad, pad_kind="random", tail=1.0), {"Accept-Encoding": "gzip"}
        )
    log = upstream.last
    report("gzip random pad 64k", log, got)
    assert log.pad_at is not None
    assert log.eof_at is not None
    assert got.headers["Content-Encoding"] == "gzip"
    assert_burst_at(log.pad_at, log, got)
    early = [size for at, size in got.releases if at < log.eof_at - EPS]
    assert early, got.releases
    assert all(size % PAGE == 0 for size in early)  # whole 4 KiB gzip_buffers
    assert got.body == _frames_from(log) + _padding(pad, "random")


@pytest.mark.integration
async def test_gzip_with_x_accel_buffering_honoured_streams_compressed_frames_live(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """gzip itself does not hold SSE when X-Accel-Buffering: no is honoured (each write flushed)."""
    conf = RECOMMENDED_CONF.read_text()
    conf = conf.replace("gzip off;", "gzip on; gzip_types text/event-stream; gzip_min_length 0;")
    conf = conf.replace("proxy_buffering off;", "")
    variant = tmp_path / "gzip-honour.conf"
    variant.write_text(conf)
    async with run_nginx(
        upstream.port,
        NginxMode.RECOMMENDED,
        tmp_dir=tmp_path / "nginx",
        recommended_conf=variant,
    ) as nginx:
        got = await fetch(url(nginx.url, tail=0.2), {"Accept-Encoding": "gzip"})
    log = upstream.last
    report("gzip honouring X-Accel-Buffering", log, got)
    assert got.headers["Content-Encoding"] == "gzip"
    assert_live(log, got)


# --------------------------------------------------------------------------- HTTP11


@pytest.mark.integration
async def test_http11_passes_each_frame_through_at_once(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """proxy_http_version 1.1 with buffering on: headers at once, every frame arrives live."""
    async with run_nginx(upstream.port, NginxMode.HTTP11, tmp_dir=tmp_path) as nginx:
        got = await fetch(url(nginx.url, tail=0.2))
    log = upstream.last
    report("http11", log, got)
    assert "Content-Encoding" not in got.headers
    assert_live(log, got)
    assert got.body == _frames_from(log)


@pytest.mark.integration
async def test_http11_ignoring_x_accel_buffering_still_live(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    """HTTP/1.1 streams live even with proxy_ignore_headers X-Accel-Buffering (chunked wins)."""
    async with run_nginx(
        upstream.port,
        NginxMode.HTTP11,
        tmp_dir=tmp_path,
        extra_directives="proxy_ignore_headers X-Accel-Buffering;",
    ) as nginx:
        got = await fetch(url(nginx.url, tail=0.2))
    log = upstream.last
    report("http11 ignoring X-Accel-Buffering", log, got)
    assert_live(log, got)


# --------------------------------------------------------------------------- RECOMMENDED


@pytest.mark.integration
@pytest.mark.parametrize(
    "path", ["/api/jobs/42/stream", "/api/diagnostics/stream", "/api/other/stream"]
)
async def test_recommended_config_streams_live_uncompressed_with_forwarded_headers(
    nginx_ready: str, upstream: Upstream, tmp_path: pathlib.Path, path: str
) -> None:
    """config/nginx/flushline.conf: live frames, no gzip, Last-Event-ID and X-Forwarded-* pass."""
    async with run_nginx(upstream.port, NginxMode.RECOMMENDED, tmp_dir=tmp_path) as nginx:
        got = await fetch(
            url(nginx.url, path, tail=0.2),
            {"Accept-Encoding": "gzip", "Last-Event-ID": "41"},
        )
    log = upstream.last
    report(f"recommended {path}", log, got)
    assert got.status == 200
    assert "Content-Encoding" not in got.headers
    assert_live(log, got)
    assert got.body == _frames_from(log)
    seen = log.request_headers
    assert seen["Last-Event-ID"] == "41"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Real-IP"] == "127.0.0.1"
    assert "close" not in seen.get("Connection", "").lower()  # keepalive-capable


def test_recommended_config_is_rendered_from_the_shipped_file(tmp_path: pathlib.Path) -> None:
    """RECOMMENDED renders flushline.conf verbatim except the listen/upstream addresses."""
    text = render_nginx_conf(
        NginxMode.RECOMMENDED, upstream_port=1234, listen_port=5678, tmp_dir=tmp_path
    )
    shipped = RECOMMENDED_CONF.read_text()
    expected = shipped.replace("server 127.0.0.1:8080;", "server 127.0.0.1:1234;").replace(
        "listen 80;", "listen 127.0.0.1:5678;"
    )
    assert expected != shipped
    assert expected in text


def test_require_nginx_skips_without_nginx_unless_integration_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without nginx require_nginx() skips, or fails when FLUSHLINE_REQUIRE_INTEGRATION=1."""
    monkeypatch.setattr(nginx_support, "find_nginx", lambda: None)
    monkeypatch.delenv("FLUSHLINE_REQUIRE_INTEGRATION", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nginx-light"):
        require_nginx()
    monkeypatch.setenv("FLUSHLINE_REQUIRE_INTEGRATION", "1")
    with pytest.raises(pytest.fail.Exception, match="nginx not installed"):
        require_nginx()


@pytest.mark.integration
async def test_run_nginx_reports_the_error_log_when_nginx_cannot_start(
    nginx_ready: str, tmp_path: pathlib.Path
) -> None:
    """A config nginx rejects raises NginxStartError quoting nginx's own error log."""
    with pytest.raises(NginxStartError, match='unknown directive "no_such_directive"'):
        async with run_nginx(
            1, NginxMode.HTTP10, tmp_dir=tmp_path, extra_directives="no_such_directive on;"
        ):
            pytest.fail("nginx should not have started")
