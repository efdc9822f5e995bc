"""Connections on the open internet, against a real ``flushline serve``: the limit past
which streams are refused, the header timeout, the descriptor limit, accept errors, and
the issue's load (400 streams and 300 dripping clients at 256 descriptors).
"""

from __future__ import annotations

import asyncio
import pathlib
import socket
import sys
import time

import orjson
import pytest

from app.core.tasks import cancel_and_wait
from app.web.server import tune_stream_socket, user_timeout_s
from tests.support.process import json_lines, read_log, run_cli
from tests.support.server_load import (
    RawAnswer,
    drip,
    open_raw_stream,
    parse_answer,
    read_answer,
    require_netns,
    require_prlimit,
    serve,
)

#: A job that runs for as long as any test here (1,000 tokens at one a second).
LONG_JOB = {"steps": 1, "tokens_per_step": 1000, "tokens_per_second": 1}
#: Lines of the server log that are one per request by design (the canonical line).
PER_REQUEST_LINES = frozenset({"request", "stream closed"})
#: The derived FLUSHLINE_MAX_CONNECTIONS at 256 descriptors.
MAX_AT_256 = 192
#: How long the dead-peer test waits for the server to drop the stream.
DEAD_PEER_WAIT_S = 20
#: Connections accepted at once at 64 descriptors (the cap keeps 32 in reserve).
CAP_AT_64 = 32


async def request(port: int, method: str, path: str, body: bytes = b"") -> RawAnswer:
    """One request on its own connection (``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return await read_answer(reader)
    finally:
        writer.close()


async def create_job(port: int, options: dict[str, object]) -> str:
    """POST a job; its id."""
    answer = await request(port, "POST", "/api/jobs", orjson.dumps({"options": options}))
    assert answer.status == 201, answer
    job_id = answer.json()["id"]
    assert isinstance(job_id, str)
    return job_id


async def timed(port: int, method: str, path: str, body: bytes = b"") -> tuple[RawAnswer, float]:
    """A request and how long it took, connection included."""
    started = time.monotonic()
    answer = await request(port, method, path, body)
    return answer, time.monotonic() - started


def assert_too_many(answer: RawAnswer) -> None:
    """``answer`` is the 503 of a full server, with its Retry-After."""
    assert answer.status == 503, answer
    assert int(answer.headers["retry-after"]) > 0
    error = answer.json()["error"]
    assert isinstance(error, dict)
    assert error["code"] == "too_many_connections"


class TestMaxConnections:
    """Past FLUSHLINE_MAX_CONNECTIONS, streams are refused and everything else answers."""

    async def test_stream_past_limit_is_503_while_health_and_api_answer(
        self, tmp_path: pathlib.Path
    ) -> None:
        """16 streams fill a limit of 16: the next stream and long-poll get 503, the rest 2xx."""
        async with serve(tmp_path / "server.log", FLUSHLINE_MAX_CONNECTIONS="16") as (_, port):
            job_id = await create_job(port, LONG_JOB)
            stream = f"/api/jobs/{job_id}/stream?proxy_buffer=0"
            held = []
            try:
                for _ in range(16):
                    head, _, writer = await open_raw_stream(port, stream)
                    assert head.status == 200, head
                    held.append(writer)
                refused, _, writer = await open_raw_stream(port, stream)
                writer.close()
                assert_too_many(refused)
                poll, _, writer = await open_raw_stream(port, f"/api/jobs/{job_id}/events?after=0")
                writer.close()
                assert_too_many(poll)
                health = await request(port, "GET", "/healthz")
                assert health.status == 200, health
                created = await request(port, "POST", "/api/jobs", b"{}")
                assert created.status == 201, created
                snapshot = await request(port, "GET", f"/api/jobs/{job_id}")
                assert snapshot.status == 200, snapshot

                for writer in held[:2]:  # two streams leave: two new ones fit
                    writer.close()
                held = held[2:]
                await asyncio.sleep(0.5)
                head, _, writer = await open_raw_stream(port, stream)
                held.append(writer)
                assert head.status == 200, head
            finally:
                for writer in held:
                    writer.close()


class TestHeaderTimeout:
    """A connection gets FLUSHLINE_HEADER_TIMEOUT_S to send each request head."""

    async def test_dripping_client_gets_408_and_is_closed(self, tmp_path: pathlib.Path) -> None:
        """A head dripped a byte every 0.2 s is cut after the 1 s timeout with a JSON 408."""
        async with serve(tmp_path / "server.log", FLUSHLINE_HEADER_TIMEOUT_S="1") as (_, port):
            started = time.monotonic()
            [raw] = await drip(port, 0.2, asyncio.Event(), reconnect=False)
            elapsed = time.monotonic() - started
        assert 0.8 < elapsed < 5.0, elapsed
        parsed = parse_answer(raw)
        assert parsed.status == 408, parsed
        error = parsed.json()["error"]
        assert isinstance(error, dict)
        assert error["code"] == "request_timeout"

    async def test_dripping_body_gets_408_and_is_closed(self, tmp_path: pathlib.Path) -> None:
        """A whole head, then a Content-Length body dripped a byte every 0.2 s: a JSON 408."""
        async with serve(tmp_path / "server.log", FLUSHLINE_HEADER_TIMEOUT_S="1") as (_, port):
            body = orjson.dumps({"options": {"steps": 1}})
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /api/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            started = time.monotonic()

            async def drip_body() -> None:
                for byte in body:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.2)

            dripping = asyncio.create_task(drip_body())
            async with asyncio.timeout(5):
                raw = await reader.read()
            elapsed = time.monotonic() - started
            await cancel_and_wait(dripping)
            writer.close()
        assert 0.8 < elapsed < 5.0, elapsed
        answer = parse_answer(raw)
        assert answer.status == 408, answer
        error = answer.json()["error"]
        assert isinstance(error, dict)
        assert error["code"] == "request_timeout"

    async def test_silent_connection_is_closed(self, tmp_path: pathlib.Path) -> None:
        """A connection that sends nothing is closed after the timeout, with no answer."""
        async with serve(tmp_path / "server.log", FLUSHLINE_HEADER_TIMEOUT_S="1") as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            async with asyncio.timeout(5):
                data = await reader.read()
            elapsed = time.monotonic() - started
            writer.close()
        assert data == b""
        assert 0.8 < elapsed < 5.0, elapsed

    async def test_keep_alive_connection_gets_a_new_timeout_per_request(
        self, tmp_path: pathlib.Path
    ) -> None:
        """After an answer, the next head again has the timeout: a late one gets 408."""
        async with serve(tmp_path / "server.log", FLUSHLINE_HEADER_TIMEOUT_S="1") as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.7)  # most of the first head's time
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            first = await read_answer(reader)
            answered = time.monotonic()
            await asyncio.sleep(0.7)  # not long enough to be cut: the timeout restarted
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            second = await read_answer(reader)
            writer.write(b"GET /heal")
            async with asyncio.timeout(5):
                rest = await reader.read()
            elapsed = time.monotonic() - answered
            writer.close()
        assert first.status == 200
        assert second.status == 200
        assert parse_answer(rest).status == 408
        assert 1.5 < elapsed < 6.0, elapsed

    async def test_stream_outlives_the_header_timeout(self, tmp_path: pathlib.Path) -> None:
        """The timeout bounds the head only: a stream stays open well past it."""
        async with serve(tmp_path / "server.log", FLUSHLINE_HEADER_TIMEOUT_S="1") as (_, port):
            job_id = await create_job(port, LONG_JOB)
            head, reader, writer = await open_raw_stream(port, f"/api/jobs/{job_id}/stream")
            assert head.status == 200
            deadline = time.monotonic() + 2.5
            while (left := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(left):
                        data = await reader.read(65536)
                except TimeoutError:
                    break
                assert data, "the server closed the stream"
            writer.close()


class TestDescriptorLimit:
    """Start-up raises the soft descriptor limit; running out of them is no log flood."""

    async def test_soft_limit_raised_and_logged(self, tmp_path: pathlib.Path) -> None:
        """Under soft 256 / hard 2048 the serving line shows 2048 and a derived limit under it."""
        prlimit = require_prlimit()
        log = tmp_path / "server.log"
        async with serve(log, prefix=[prlimit, "--nofile=256:2048"]):
            pass
        [serving] = [line for line in json_lines(read_log(log)) if line["message"] == "serving"]
        assert serving["fd_limit"] == {"soft": 2048, "hard": 2048, "soft_before": 256}
        limits = serving["limits"]
        assert isinstance(limits, dict)
        assert limits["max_connections"] == 2048 - 256
        assert limits["connection_cap"] == 2048 - 128
        assert limits["header_timeout_s"] == 10.0

    async def test_saturation_logged_at_most_once_a_second(self, tmp_path: pathlib.Path) -> None:
        """Every descriptor busy for 3 s: a handful of lines with a suppressed count, no flood."""
        prlimit = require_prlimit()
        log = tmp_path / "server.log"
        env = {"FLUSHLINE_MAX_CONNECTIONS": "1000"}  # no stream refused: they fill the cap
        async with serve(log, prefix=[prlimit, "--nofile=64"], **env) as (_, port):
            job_id = await create_job(port, LONG_JOB)
            stream = f"/api/jobs/{job_id}/stream?proxy_buffer=0"
            started = time.monotonic()
            opened = await asyncio.gather(
                *(open_raw_stream(port, stream, timeout_s=3) for _ in range(40)),
                return_exceptions=True,
            )
            held = [o for o in opened if not isinstance(o, BaseException)]
            assert len(held) == CAP_AT_64, len(held)  # the rest wait in the backlog
            await asyncio.sleep(3.0)
            for _, _, writer in held:
                writer.close()
            saturated_s = time.monotonic() - started
            health, elapsed = await timed(port, "GET", "/healthz")
            assert health.status == 200
        lines = json_lines(read_log(log))
        saturated = [line for line in lines if line["message"] == "connection cap reached"]
        assert 1 <= len(saturated) <= saturated_s + 1, (saturated_s, saturated)
        assert sum(int(str(line["suppressed"])) for line in saturated) > 0
        other = [line for line in lines if line["message"] not in PER_REQUEST_LINES]
        assert len(other) < 15, [line["message"] for line in other]
        assert elapsed < 5.0


class TestLoad:
    """The issue's load: 256 descriptors, 400 streams, 300 clients dripping headers."""

    async def test_health_and_api_answer_within_a_second(self, tmp_path: pathlib.Path) -> None:
        """/healthz and POST /api/jobs answer within 1 s; the log stays under 100 lines."""
        prlimit = require_prlimit()
        log = tmp_path / "server.log"
        env = {"FLUSHLINE_HEADER_TIMEOUT_S": "2"}
        async with serve(log, prefix=[prlimit, "--nofile=256"], **env) as (_, port):
            job_id = await create_job(port, LONG_JOB)
            stream = f"/api/jobs/{job_id}/stream?proxy_buffer=0"
            opened = await asyncio.gather(
                *(open_raw_stream(port, stream, timeout_s=20) for _ in range(400)),
                return_exceptions=True,
            )
            writers = [o[2] for o in opened if not isinstance(o, BaseException)]
            statuses = [o[0].status for o in opened if not isinstance(o, BaseException)]
            stop = asyncio.Event()
            drippers = [asyncio.create_task(drip(port, 1.0, stop)) for _ in range(300)]
            try:
                await asyncio.sleep(1.0)  # every dripper connected (or queued)
                health_s, post_s = [], []
                for _ in range(8):
                    health, elapsed = await timed(port, "GET", "/healthz")
                    assert health.status == 200, health
                    health_s.append(elapsed)
                    created, elapsed = await timed(port, "POST", "/api/jobs", b"{}")
                    assert created.status == 201, created
                    post_s.append(elapsed)
                    await asyncio.sleep(0.4)
            finally:
                stop.set()
                dripped = await asyncio.gather(*drippers)
                for writer in writers:
                    writer.close()
        print(  # the figures, for the report (pytest -s)
            f"streams: {statuses.count(200)} x 200, {statuses.count(503)} x 503, "
            f"{400 - len(statuses)} failed; healthz max {max(health_s):.3f} s, "
            f"POST max {max(post_s):.3f} s; dripper connections {sum(map(len, dripped))}",
            file=sys.stderr,
        )
        assert max(health_s) < 1.0, health_s
        assert max(post_s) < 1.0, post_s
        # Every stream is answered: held (never more than the derived limit) or refused.
        assert statuses.count(200) + statuses.count(503) == 400, statuses
        assert 0 < statuses.count(200) <= MAX_AT_256, statuses
        assert sum(map(len, dripped)) > 300  # they were cut and came back
        lines = json_lines(read_log(log))
        other = [line for line in lines if line["message"] not in PER_REQUEST_LINES]
        assert len(other) < 100, [line["message"] for line in other]


class TestDeadPeers:
    """Stream sockets let the kernel drop a peer that vanished, within the send timeout."""

    @pytest.mark.parametrize("heartbeat_s", ["1", "600"], ids=["heartbeats", "quiet"])
    async def test_vanished_peer_is_dropped(self, tmp_path: pathlib.Path, heartbeat_s: str) -> None:
        """A peer whose network went away is dropped in seconds, a stream without writes too."""
        unshare = require_netns()
        code, out, err = await run_cli(
            "dead-peer",
            str(tmp_path / "server.log"),
            heartbeat_s,
            "2",  # FLUSHLINE_SEND_TIMEOUT
            str(DEAD_PEER_WAIT_S),
            argv0=(unshare, "-n", sys.executable, "-m", "tests.support.server_load"),
        )
        assert code == 0, err
        result = orjson.loads(out)
        # Without the socket options the kernel retransmits for ~15 minutes and the
        # stream stays open (no write blocks: the heartbeats fit in the send buffer).
        assert result["after_s"] is not None, f"still open {DEAD_PEER_WAIT_S} s after the loss"
        assert result["after_s"] < user_timeout_s(2.0) + 4.0, result
        assert result["line"]["outcome"] == "client_gone", result

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux socket options")
    async def test_stream_socket_options(self) -> None:
        """TCP_USER_TIMEOUT is the send timeout and a margin; keep-alive probes fit inside."""
        accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

        async def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, client = await asyncio.open_connection("127.0.0.1", port)
        writer = await accepted
        tune_stream_socket(writer.transport, 30.0)
        sock = writer.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        # 30 s and a margin: the send timeout itself cuts a live reader that stalls.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 45_000
        idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
        count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
        assert idle + interval * count <= 30
        client.close()
        writer.close()
        server.close()
        await server.wait_closed()
