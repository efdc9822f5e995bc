"""Running the service and the CLI as separate processes, as a user does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import orjson
import pytest

__all__ = [
    "ROOT",
    "clean_env",
    "find_flushline_script",
    "free_port",
    "json_lines",
    "read_log",
    "require_flushline_script",
    "run_cli",
    "server_process",
    "wait_accepting",
]

ROOT = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
REQUIRE_ENV = "FLUSHLINE_REQUIRE_INTEGRATION"
SCRIPT_MISSING = "the flushline console script is not installed (pip install -e . adds it)"


def find_flushline_script() -> str | None:
    """The ``flushline`` console script: next to this interpreter first, then on ``PATH``.

    ``pip install`` puts it beside ``sys.executable``, which is not always on ``PATH``
    (a venv used without activating it).
    """
    beside = pathlib.Path(sys.executable).with_name("flushline")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("flushline")


def require_flushline_script() -> str:
    """The script's path, or skip the test (fail it if FLUSHLINE_REQUIRE_INTEGRATION=1)."""
    script = find_flushline_script()
    if script is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{SCRIPT_MISSING} (required because {REQUIRE_ENV}=1)")
        pytest.skip(SCRIPT_MISSING)
    return script


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


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of ``text`` parsed as one JSON object; fails naming the first that is not."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}\n{text}") from None
        assert isinstance(record, dict), f"line {number} is not a JSON object: {line!r}"
        records.append(record)
    return records


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


async def run_cli(
    *args: str,
    timeout_s: float = 60.0,
    env: Mapping[str, str] | None = None,
    argv0: Sequence[str] = (sys.executable, "-m", "app"),
) -> tuple[int, str, str]:
    """Run ``python -m app ARGS`` (or ``argv0 ARGS``) in the project; return (code, out, err).

    ``env`` replaces the environment (default: the test's own).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv0,
        *args,
        cwd=ROOT,
        env=None if env is None else dict(env),
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
