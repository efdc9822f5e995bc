"""Run a throw-away ``redis-server`` on a free port, for the Redis bus and store tests.

Never the machine's own Redis (6379): each server gets a free port, its own directory in
the test's tmp dir, no persistence (``--save "" --appendonly no``), and is stopped on the
way out. ``stop()`` and ``start()`` keep the port, so a test can take Redis away from a
running service and bring it back at the same address; with ``persistent=True`` it comes
back with its data (an append-only file, as a restarted or failed-over Redis would).

Usage::

    with run_redis(tmp_path) as redis:
        url = redis.url  # redis://127.0.0.1:<port>/0
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import attrs
import pytest

__all__ = [
    "RedisServer",
    "RedisStartError",
    "find_redis_server",
    "require_redis_server",
    "run_redis",
]

SKIP_REASON = "redis-server not installed: apt-get install redis-server"
REQUIRE_ENV = "FLUSHLINE_REQUIRE_INTEGRATION"

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 5.0
_BIND_ATTEMPTS = 3


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries its log."""


def find_redis_server() -> str | None:
    """Path of the ``redis-server`` binary (``PATH`` first, then the usual places)."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_redis_server() -> str:
    """The binary's path, or skip the test (fail it if FLUSHLINE_REQUIRE_INTEGRATION=1)."""
    path = find_redis_server()
    if path is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{SKIP_REASON} (required because {REQUIRE_ENV}=1)")
        pytest.skip(SKIP_REASON)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ping(port: int, timeout_s: float = 1.0) -> bool:
    """Whether something on ``127.0.0.1:port`` answers a RESP ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@attrs.define(eq=False)
class RedisServer:
    """One ``redis-server`` process bound to ``127.0.0.1:port``, data in ``directory``."""

    binary: str
    directory: pathlib.Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    #: Keep the data across ``stop()`` and ``start()`` (append-only file, fsync always).
    persistent: bool = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> pathlib.Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"

    def start(self) -> None:
        """Start the server (on a free port the first time, the same port after that)."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(_BIND_ATTEMPTS):
            fresh_port = self.port == 0
            if fresh_port:
                self.port = _free_port()
            try:
                self._start_once()
                return
            except RedisStartError as exc:
                # Someone took the port between our probe bind and redis's bind: retry.
                in_use = "Address already in use" in str(exc)
                if not (in_use and fresh_port) or attempt == _BIND_ATTEMPTS - 1:
                    raise
                self.port = 0

    def _start_once(self) -> None:
        self.log_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                *(
                    ("--appendonly", "yes", "--appendfsync", "always")
                    if self.persistent
                    else ("--appendonly", "no")
                ),
                "--dir", str(self.directory),
                "--logfile", str(self.log_path),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not ping(self.port):
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise RedisStartError(
                    f"redis-server exited with status {code} during start-up; "
                    f"{self.log_path}:\n{self.read_log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RedisStartError(
                    f"redis-server did not answer PING on 127.0.0.1:{self.port} within "
                    f"{_START_TIMEOUT_S:.0f} s; {self.log_path}:\n{self.read_log()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the port is kept for ``start()``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def run_redis(
    tmp_dir: pathlib.Path, *, binary: str | None = None, persistent: bool = False
) -> Iterator[RedisServer]:
    """Start a ``redis-server`` with its data in ``tmp_dir``; stop it on exit."""
    path = binary or find_redis_server()
    if path is None:
        raise FileNotFoundError(SKIP_REASON)
    server = RedisServer(path, tmp_dir.resolve(), persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()
