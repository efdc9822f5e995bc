"""Running the service and the CLI as separate processes, as a user does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence

__all__ = [
    "ROOT",
    "clean_env",
    "free_port",
    "read_log",
    "run_cli",
    "server_process",
    "wait_accepting",
]

ROOT = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without PORT or FLUSHLINE_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PORT" and not k.startswith("FLUSHLINE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def read_log(log: pathlib.Path) -> str:
    """The server's output so far."""
    return log.read_text(errors="replace")


async def wait_accepting(process: asyncio.subprocess.Process, port: int) -> None:
    """Wait until ``port`` accepts connections; fail if the process dies first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert process.returncode is None, f"the server exited with {process.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing accepted connections on port {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


@contextlib.asynccontextmanager
async def server_process(
    argv: Sequence[str], env: dict[str, str], log: pathlib.Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start ``argv`` in the project directory; kill it on the way out if it still runs."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def run_cli(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run ``python -m app ARGS`` in the project; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
