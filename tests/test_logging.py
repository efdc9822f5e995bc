"""Logs as production reads them: JSON lines with Cloud Logging fields and bound ids.

Every line the process writes is parsed, none skipped: a log pipeline takes each line
as one record, so a stray banner or a traceback's continuation lines would be records
of their own.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import signal
import sys
import textwrap

import aiohttp
import pytest
import structlog
from aiohttp import web

from app.core.settings import Settings
from app.web.factory import init_app
from tests.conftest import QUICK_JOB
from tests.support.process import (
    ROOT,
    clean_env,
    free_port,
    json_lines,
    read_log,
    server_process,
    wait_accepting,
)
from tests.support.sse_client import read_stream

EXIT_TIMEOUT_S = 10.0
#: A request aiohttp's parser rejects, logging the error with its traceback.
MALFORMED_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n"
#: A POST whose body never arrives in full: the client leaves before any answer.
PARTIAL_POST = (
    b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"opt'
)


async def send_raw(port: int, data: bytes, *, read_answer: bool) -> bytes:
    """Send ``data`` on a fresh connection; read the answer, or close before one comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = b""
    if read_answer:
        answer = await asyncio.wait_for(reader.read(), 10)
    else:
        await asyncio.sleep(0.2)  # the server is now waiting for the rest of the body
    writer.close()
    await writer.wait_closed()
    return answer


async def stop(process: asyncio.subprocess.Process, log: pathlib.Path) -> None:
    """SIGTERM the server; it exits 0."""
    process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(process.wait(), EXIT_TIMEOUT_S)
    assert code == 0, read_log(log)[-2000:]


async def test_json_logs_carry_request_and_job_ids(tmp_path: pathlib.Path) -> None:
    """Off a TTY every line is JSON with severity/message; request and job lines carry their ids."""
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="auto")
    async with server_process([sys.executable, "-m", "app"], env, log) as process:
        await wait_accepting(process, port)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/api/jobs",
                json={"options": QUICK_JOB},
                headers={"X-Request-ID": "req-abc-123"},
            ) as response:
                assert response.status == 201
                assert response.headers["X-Request-ID"] == "req-abc-123"
                job = await response.json()
            record = await read_stream(
                session, base + job["links"]["stream"], headers={"X-Request-ID": "req-stream-1"}
            )
            assert record.payloads()[-1]["type"] == "done"
            assert record.headers["X-Request-ID"] == "req-stream-1"
        await stop(process, log)

    lines = json_lines(read_log(log))
    assert all("severity" in line and "message" in line and "time" in line for line in lines)
    created = [e for e in lines if e["message"] == "request" and e.get("method") == "POST"]
    assert created[0]["request_id"] == "req-abc-123"
    assert created[0]["status"] == 201
    assert created[0]["outcome"] == "completed"
    assert created[0]["bytes"] > 0  # type: ignore[operator]
    finished = [e for e in lines if e["message"] == "job finished"]
    assert len(finished) == 1
    assert finished[0]["job_id"] == job["id"]
    assert finished[0]["status"] == "succeeded"
    assert "request_id" not in finished[0]  # the job outlives the request that created it
    assert finished[0]["events"] == len(record.payloads())
    assert finished[0]["bytes"] > 0  # type: ignore[operator]
    assert finished[0]["duration_s"] > 0  # type: ignore[operator]
    stream_requests = [
        e for e in lines if e["message"] == "request" and "stream" in str(e.get("path"))
    ]
    assert stream_requests[0]["bytes"] == len(record.raw)
    streams = [e for e in lines if e["message"] == "stream closed"]
    assert streams[0]["job_id"] == job["id"]
    assert streams[0]["outcome"] == "ended"
    assert streams[0]["bytes"] == len(record.raw)


async def test_error_paths_are_json_lines_too(tmp_path: pathlib.Path) -> None:
    """A parser error's line, warnings and the start-up line are JSON lines."""
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="json", FLUSHLINE_STARTEGY="none")
    async with server_process([sys.executable, "-m", "app"], env, log) as process:
        await wait_accepting(process, port)
        answer = await send_raw(port, MALFORMED_REQUEST, read_answer=True)
        assert answer.split(b" ", 2)[1] == b"400", answer
        await send_raw(port, PARTIAL_POST, read_answer=False)
        await stop(process, log)

    text = read_log(log)
    lines = json_lines(text)
    assert all({"severity", "message", "time"} <= line.keys() for line in lines), text
    assert "Running on" not in text
    assert [line["message"] for line in lines].count("serving") == 1
    # Bad input from a client is no server error: one info line naming it, no traceback.
    [parse_error] = [line for line in lines if line["message"] == "bad request"]
    assert parse_error["severity"] == "INFO"
    assert (parse_error["status"], parse_error["code"]) == (400, "bad_request")
    assert not [line for line in lines if line.get("logger") == "aiohttp.server"]
    [warning] = [line for line in lines if line["severity"] == "WARNING"]
    assert warning["variable"] == "FLUSHLINE_STARTEGY"
    [gone] = [line for line in lines if line["message"] == "request"]
    assert (gone["method"], gone["status"], gone["outcome"]) == ("POST", 499, "client_gone")


STDLIB_SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, warnings
    from app.core.logs import configure_logging

    configure_logging("info", "json")
    warnings.warn("a warning from Python")

    async def fail():
        raise ValueError("task failed")

    async def main():
        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.05)
        del task
        gc.collect()

    asyncio.run(main())
    raise RuntimeError("uncaught at the top")
    """
)


async def test_stdlib_loggers_and_uncaught_exceptions_are_json_lines() -> None:
    """Python warnings, asyncio's logger and an uncaught exception: one JSON line each."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STDLIB_SCRIPT,
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert out == b""
    lines = json_lines(err.decode())
    by_logger = {line.get("logger"): line for line in lines}
    assert len(lines) == 3, lines
    assert by_logger["py.warnings"]["severity"] == "WARNING"
    assert "a warning from Python" in str(by_logger["py.warnings"]["message"])
    assert by_logger["asyncio"]["severity"] == "ERROR"
    assert "ValueError: task failed" in str(by_logger["asyncio"]["exception"])
    assert by_logger["app.core.logs"]["severity"] == "CRITICAL"
    assert "RuntimeError: uncaught at the top" in str(by_logger["app.core.logs"]["exception"])


async def test_client_gone_mid_body_without_handler_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With aiohttp's default runner (handlers not cancelled) a client leaving is no 500."""
    runner = web.AppRunner(init_app(Settings()), handler_cancellation=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        with caplog.at_level(logging.DEBUG), structlog.testing.capture_logs() as logs:
            await send_raw(port, PARTIAL_POST, read_answer=False)
            for _ in range(100):
                if logs:
                    break
                await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    assert [(e["event"], e["log_level"]) for e in logs] == [("request", "info")], logs
    assert (logs[0]["status"], logs[0]["outcome"]) == (499, "client_gone")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
