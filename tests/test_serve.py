"""The process as a user runs it: ``python -m app`` / ``flushline serve`` on a real port."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sys
from collections.abc import Sequence

import aiohttp

from tests.conftest import QUICK_JOB
from tests.support.process import (
    START_TIMEOUT_S,
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)
from tests.support.sse_client import read_stream

EXIT_TIMEOUT_S = 5.0


async def run_user_flow(port: int) -> None:
    """POST a job, read its stream to done, GET its snapshot."""
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/jobs", json={"options": QUICK_JOB}) as response:
            assert response.status == 201, await response.text()
            job = await response.json()
            assert response.headers["Location"] == job["links"]["self"]
        record = await read_stream(session, base + job["links"]["stream"], timeout_s=30)
        assert record.status == 200
        assert record.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert record.raw.startswith(b"retry:")
        payloads = record.payloads()
        assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
        assert payloads[0]["type"] == "job_started"
        assert payloads[-1]["type"] == "done"
        assert payloads[-1]["status"] == "succeeded"
        async with session.get(base + job["links"]["self"]) as response:
            assert response.status == 200
            snapshot = await response.json()
        assert snapshot["status"] == "succeeded"
        assert snapshot["progress"] == 100
        assert snapshot["result"] == payloads[-1]["result"]
        assert snapshot["last_event_id"] == payloads[-1]["seq"]


async def serve_and_stop(
    argv: Sequence[str], env: dict[str, str], port: int, log: pathlib.Path
) -> None:
    """Run the whole flow against the process, then SIGTERM it: it exits 0 promptly."""
    async with server_process(argv, env, log) as process:
        await wait_accepting(process, port)
        await run_user_flow(port)
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), EXIT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"no exit within {EXIT_TIMEOUT_S} s of SIGTERM") from None
        assert code == 0, read_log(log)[-2000:]


class TestServe:
    """Start the server the way a user (or Cloud Run) does."""

    async def test_python_m_app_uses_port(self, tmp_path: pathlib.Path) -> None:
        """`python -m app` listens on $PORT, serves a job end to end, exits 0 on SIGTERM."""
        port = free_port()
        decoy = free_port()  # PORT wins over FLUSHLINE_PORT
        env = clean_env(PORT=str(port), FLUSHLINE_PORT=str(decoy))
        await serve_and_stop([sys.executable, "-m", "app"], env, port, tmp_path / "server.log")

    async def test_python_m_app_uses_flushline_port(self, tmp_path: pathlib.Path) -> None:
        """Without PORT, `python -m app` listens on $FLUSHLINE_PORT."""
        port = free_port()
        env = clean_env(FLUSHLINE_PORT=str(port))
        await serve_and_stop([sys.executable, "-m", "app"], env, port, tmp_path / "server.log")

    async def test_flushline_serve(self, tmp_path: pathlib.Path) -> None:
        """The `flushline serve` console script (beside python or on PATH) runs the same flow."""
        script = require_flushline_script()
        port = free_port()
        env = clean_env(PORT=str(port))
        await serve_and_stop([script, "serve"], env, port, tmp_path / "server.log")

    async def test_invalid_setting_stops_start_up(self, tmp_path: pathlib.Path) -> None:
        """A bad FLUSHLINE_ value stops start-up with one line naming variable and value."""
        port = free_port()
        env = clean_env(PORT=str(port), FLUSHLINE_STRATEGY="turbo")
        log = tmp_path / "server.log"
        async with server_process([sys.executable, "-m", "app"], env, log) as process:
            code = await asyncio.wait_for(process.wait(), START_TIMEOUT_S)
        assert code != 0
        lines = [line for line in read_log(log).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert "FLUSHLINE_STRATEGY" in lines[0]
        assert "turbo" in lines[0]
