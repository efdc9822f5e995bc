"""Raw-socket clients for the server's own limits: bad heads, dripping heads, many streams.

Everything here talks bytes to a real ``flushline serve`` (see ``process.py``), because
what it tests happens below the app: in aiohttp's parser and in the connection itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import attrs
import orjson
import pytest

from tests.support.process import (
    REQUIRE_ENV,
    ROOT,
    START_TIMEOUT_S,
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)

__all__ = [
    "RawAnswer",
    "dead_peer",
    "drip",
    "exchange",
    "open_raw_stream",
    "parse_answer",
    "read_answer",
    "require_netns",
    "require_prlimit",
    "serve",
    "serve_blocking",
]


@attrs.frozen
class RawAnswer:
    """One HTTP answer as it came off the socket."""

    status: int
    #: Header names lower-cased.
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        """The body as a JSON object (fails naming the body when it is not)."""
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not JSON: {self.body[:300]!r}") from None
        assert isinstance(value, dict), self.body
        return value


def parse_answer(raw: bytes) -> RawAnswer:
    """Split ``raw`` (status line, headers, body) into a :class:`RawAnswer`."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete answer head in {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(status, headers, body)


def exchange(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[RawAnswer, bool]:
    """Send ``data``, read until the server closes; the answer, and whether it closed.

    The server closing the connection within ``timeout_s`` is part of each check: an
    answer followed by a hang would hold a descriptor.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        closed = False
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return parse_answer(received), closed


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> RawAnswer:
    """Read one answer's head and, with a ``Content-Length``, its body."""
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        answer = parse_answer(head)
        length = int(answer.headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
    return attrs.evolve(answer, body=body)


async def open_raw_stream(
    port: int, path: str, timeout_s: float = 10.0
) -> tuple[RawAnswer, asyncio.StreamReader, asyncio.StreamWriter]:
    """GET ``path`` and read the answer's head (and a refusal's body); the rest is unread."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    try:
        async with asyncio.timeout(timeout_s):
            head = parse_answer(await reader.readuntil(b"\r\n\r\n"))
            if head.status != 200 and "content-length" in head.headers:
                body = await reader.readexactly(int(head.headers["content-length"]))
                head = attrs.evolve(head, body=body)
    except BaseException:
        writer.close()
        raise
    return head, reader, writer


async def drip(
    port: int, interval_s: float, stop: asyncio.Event, *, reconnect: bool = True
) -> list[bytes]:
    """Send a request head one byte every ``interval_s``, never finishing it.

    Until ``stop`` is set; each time the server closes the connection, what it answered
    is recorded and (``reconnect``) the client comes back, as an attacker would.
    """
    answers: list[bytes] = []
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        received = b""
        try:
            for byte in head:
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        chunk = await reader.read(4096)
                        received += chunk
                        if not chunk:
                            break
                if stop.is_set():
                    break
        except OSError:
            pass
        finally:
            writer.close()
        answers.append(received)
        if not reconnect:
            break
    return answers


def require_prlimit() -> str:
    """util-linux ``prlimit``, or skip (fail under FLUSHLINE_REQUIRE_INTEGRATION=1)."""
    path = shutil.which("prlimit")
    if path is None:
        reason = "prlimit (util-linux) is not installed"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} (required because {REQUIRE_ENV}=1)")
        pytest.skip(reason)
    return path


@contextlib.asynccontextmanager
async def serve(
    log: pathlib.Path, *, prefix: Sequence[str] = (), **env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``flushline serve`` on a free port with ``FLUSHLINE_*`` ``env``; JSON logs."""
    script = require_flushline_script()
    port = free_port()
    environ = clean_env(FLUSHLINE_LOG_FORMAT="json", **env)
    argv = [*prefix, script, "serve", "--host", "127.0.0.1", "--port", str(port)]
    async with server_process(argv, environ, log) as process:
        await wait_accepting(process, port)
        yield process, port


@contextlib.contextmanager
def serve_blocking(log: pathlib.Path, **env: str) -> Iterator[int]:
    """:func:`serve` for synchronous tests (a module-wide server): yields the port."""
    script = require_flushline_script()
    port = free_port()
    environ = clean_env(FLUSHLINE_LOG_FORMAT="json", **env)
    argv = [script, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"nothing accepted on port {port}"
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()


def require_netns() -> str:
    """``unshare`` able to make a network namespace with ``ip``, or skip (fail if required)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    reason = None
    if unshare is None or ip is None:
        reason = "unshare and ip (util-linux, iproute2) are needed for a private network"
    elif subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        reason = "cannot make a network namespace here (needs root or user namespaces)"
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} (required because {REQUIRE_ENV}=1)")
        pytest.skip(reason)
    assert unshare is not None
    return unshare


async def _ip(*args: str) -> None:
    process = await asyncio.create_subprocess_exec("ip", *args)
    assert await process.wait() == 0, args


async def dead_peer(
    log: pathlib.Path, heartbeat_s: str, send_timeout_s: str, wait_s: float
) -> dict[str, object]:
    """Inside a private network namespace: a stream whose peer vanishes; when it is dropped.

    Starts ``flushline serve``, opens a stream of a job that stays quiet, then takes the
    namespace's loopback down: the client neither answers nor closes, as a phone that
    lost its network. Returns the server's ``stream closed`` line and the seconds from
    the loss to it (``None`` if it did not come within ``wait_s``).
    """
    await _ip("link", "set", "lo", "up")
    port = free_port()
    env = clean_env(
        FLUSHLINE_LOG_FORMAT="json",
        FLUSHLINE_SEND_TIMEOUT=send_timeout_s,
        FLUSHLINE_HEARTBEAT_INTERVAL=heartbeat_s,
    )
    argv = [require_flushline_script(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    async with server_process(argv, env, log) as process:
        await wait_accepting(process, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = orjson.dumps(
            {"options": {"steps": 1, "tokens_per_step": 1000, "tokens_per_second": 0.1}}
        )
        writer.write(
            b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        job_id = orjson.loads((await reader.read()).partition(b"\r\n\r\n")[2])["id"]
        writer.close()
        head, _, writer = await open_raw_stream(port, f"/api/jobs/{job_id}/stream?proxy_buffer=0")
        assert head.status == 200, head
        lost_at = time.monotonic()
        await _ip("link", "set", "lo", "down")
        while time.monotonic() - lost_at < wait_s:
            closed = [line for line in read_log(log).splitlines() if '"stream closed"' in line]
            if closed:
                return {"after_s": time.monotonic() - lost_at, "line": orjson.loads(closed[0])}
            await asyncio.sleep(0.1)
        writer.transport.abort()
    return {"after_s": None, "line": None}


def main(argv: Sequence[str]) -> int:
    """``python -m tests.support.server_load dead-peer LOG HEARTBEAT_S SEND_TIMEOUT_S WAIT_S``.

    Run under ``unshare -n``; prints :func:`dead_peer`'s result as JSON.
    """
    command, log, heartbeat_s, send_timeout_s, wait_s = argv
    assert command == "dead-peer", command
    result = asyncio.run(dead_peer(pathlib.Path(log), heartbeat_s, send_timeout_s, float(wait_s)))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
