"""``/api/diagnostics/stream`` is bounded, against a real ``flushline serve``: what one
request can make the server hold, how many streams it may hold (FLUSHLINE_MAX_CONNECTIONS),
and who may ask (the API token with auth on, sent by ``flushline probe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from app.pathtools.probe.command import probe_token
from app.web.diagnostics import MAX_PATTERN_BYTES, MAX_WRITE_BYTES, DiagnosticsPattern
from tests.support.process import clean_env, run_cli
from tests.support.server_load import RawAnswer, parse_answer, read_answer, serve

#: The issue's request: a 16 MiB first write, before the caps.
HUGE_FIRST_WRITE = "/api/diagnostics/stream?first_writes=256&write_bytes=65536"
#: The largest pattern the caps let through, sent as fast as the service allows.
LARGEST = DiagnosticsPattern(
    write_bytes=MAX_WRITE_BYTES, interval_ms=5, total_bytes=MAX_PATTERN_BYTES, pause_ms=0
)
LARGEST_PATH = "/api/diagnostics/stream?" + urlencode(LARGEST.as_query())
#: The issue's load.
NEVER_READING = 300
RSS_GROWTH_LIMIT_BYTES = 100 * 1024 * 1024
HEALTH_WITHIN_S = 1.0
TOKEN = "diagnostics-token-0123456789abcdef"
AUTH_ENV = {"FLUSHLINE_API_TOKEN": TOKEN, "FLUSHLINE_SECRET_KEY": "k" * 32}
#: A fast probe (10 ms writes, a 4 KB buffer to detect).
FAST_PROBE = ("--json", "--max-buffer", "4096", "--interval-ms", "10")


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux ``/proc``)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def get(port: int, path: str, headers: str = "") -> RawAnswer:
    """One GET on its own connection (``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n".encode()
        )
        return await read_answer(reader)
    finally:
        writer.close()


async def open_stream(port: int, path: str) -> tuple[RawAnswer, asyncio.StreamWriter]:
    """GET ``path``; the answer's head (and a refusal's body), the rest left unread."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    async with asyncio.timeout(10):
        head = parse_answer(await reader.readuntil(b"\r\n\r\n"))
        if head.status != 200:
            body = await reader.readexactly(int(head.headers["content-length"]))
            head = RawAnswer(head.status, head.headers, body)
    return head, writer


@contextlib.contextmanager
def never_reading(port: int, count: int, path: str) -> Iterator[list[socket.socket]]:
    """``count`` connections that each send the request and read its status line only."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            socks.append(sock)
        for sock in socks:
            assert sock.recv(12) == b"HTTP/1.1 200"
        yield socks
    finally:
        for sock in socks:
            sock.close()


class TestPatternBounds:
    """What one request may ask for is capped, and a bad parameter is still named."""

    async def test_the_issues_request_is_a_400_naming_first_writes(
        self, tmp_path: pathlib.Path
    ) -> None:
        """first_writes=256&write_bytes=65536 (a 16 MiB first write): 400 naming first_writes."""
        async with serve(tmp_path / "server.log") as (_, port):
            answer = await get(port, HUGE_FIRST_WRITE)
        assert answer.status == 400, answer
        error = answer.json()["error"]
        assert isinstance(error, dict)
        assert error["code"] == "invalid_field"
        assert error["field"] == "first_writes"
        assert str(MAX_WRITE_BYTES) in str(error["message"])

    async def test_300_never_reading_streams_hold_little_and_health_answers(
        self, tmp_path: pathlib.Path
    ) -> None:
        """300 largest patterns never read: RSS grows < 100 MB; /healthz answers within 1 s."""
        env = {"FLUSHLINE_SEND_TIMEOUT": "20", "FLUSHLINE_LOG_LEVEL": "warning"}
        async with serve(tmp_path / "server.log", **env) as (process, port):
            assert (await get(port, "/healthz")).status == 200
            idle = rss_bytes(process.pid)
            with never_reading(port, NEVER_READING, LARGEST_PATH) as socks:
                assert len(socks) == NEVER_READING
                peak = idle
                slowest_health_s = 0.0
                # The pattern lasts 35 ms; watch the held writes for 3 s after.
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    health = await get(port, "/healthz")
                    slowest_health_s = max(slowest_health_s, time.monotonic() - started)
                    assert health.status == 200, health
                    peak = max(peak, rss_bytes(process.pid))
                    await asyncio.sleep(0.1)
        growth = peak - idle
        assert growth < RSS_GROWTH_LIMIT_BYTES, f"RSS {idle} -> {peak} bytes"
        assert slowest_health_s < HEALTH_WITHIN_S, slowest_health_s


class TestConnectionLimit:
    """Diagnostics streams count against FLUSHLINE_MAX_CONNECTIONS as job streams do."""

    async def test_diagnostics_stream_past_the_limit_is_503(self, tmp_path: pathlib.Path) -> None:
        """16 diagnostics streams fill a limit of 16: the next one is 503, /healthz answers."""
        slow = "/api/diagnostics/stream?interval_ms=2000&total_bytes=4096&pause_ms=0"
        async with serve(tmp_path / "server.log", FLUSHLINE_MAX_CONNECTIONS="16") as (_, port):
            held = []
            try:
                for _ in range(16):
                    head, writer = await open_stream(port, slow)
                    assert head.status == 200, head
                    held.append(writer)
                refused, writer = await open_stream(port, slow)
                writer.close()
                assert refused.status == 503, refused
                assert int(refused.headers["retry-after"]) > 0
                error = refused.json()["error"]
                assert isinstance(error, dict)
                assert error["code"] == "too_many_connections"
                assert (await get(port, "/healthz")).status == 200
            finally:
                for writer in held:
                    writer.close()


class TestAuth:
    """With auth on, the diagnostics stream asks for the API token, and the probe sends it."""

    async def test_stream_needs_the_api_token(self, tmp_path: pathlib.Path) -> None:
        """No credential: 401; a wrong token: 403; the API token: the pattern."""
        path = "/api/diagnostics/stream?interval_ms=5&total_bytes=1024&pause_ms=0"
        async with serve(tmp_path / "server.log", **AUTH_ENV) as (_, port):
            missing = await get(port, path)
            wrong = await get(port, path, "Authorization: Bearer not-the-token-at-all-000\r\n")
            right = await get(port, path, f"Authorization: Bearer {TOKEN}\r\n")
        assert missing.status == 401, missing
        assert wrong.status == 403, wrong
        assert right.status == 200, right

    async def test_probe_sends_the_token_from_option_or_environment(
        self, tmp_path: pathlib.Path
    ) -> None:
        """`flushline probe`: refused without a token; reads with --token or the env variable."""
        async with serve(tmp_path / "server.log", **AUTH_ENV) as (_, port):
            url = f"http://127.0.0.1:{port}"
            bare = clean_env()
            without = await run_cli("probe", url, *FAST_PROBE, env=bare)
            option = await run_cli("probe", url, *FAST_PROBE, "--token", TOKEN, env=bare)
            environ = await run_cli(
                "probe", url, *FAST_PROBE, env={**bare, "FLUSHLINE_API_TOKEN": f"{TOKEN},other"}
            )
        code, out, err = without
        assert code == 1, (out, err)
        assert "HTTP 401" in err, err
        for code, out, err in (option, environ):
            assert code == 0, err
            assert '"status": 200' in out, out

    @pytest.mark.parametrize(
        ("given", "environ", "expected"),
        [
            ("abc", {"FLUSHLINE_API_TOKEN": "xyz"}, "abc"),
            (None, {"FLUSHLINE_API_TOKEN": " first , second"}, "first"),
            (None, {}, None),
            (None, {"FLUSHLINE_API_TOKEN": ""}, None),
        ],
    )
    def test_token_choice(
        self, given: str | None, environ: dict[str, str], expected: str | None
    ) -> None:
        """--token wins; else the first token of FLUSHLINE_API_TOKEN; else none."""
        assert probe_token(given, environ) == expected
