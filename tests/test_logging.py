"""Logs as production reads them: JSON lines with Cloud Logging fields and bound ids."""

from __future__ import annotations

import pathlib
import signal

import aiohttp
import orjson

from tests.conftest import QUICK_JOB
from tests.support.process import clean_env, free_port, server_process, wait_accepting
from tests.support.sse_client import read_stream


async def test_json_logs_carry_request_and_job_ids(tmp_path: pathlib.Path) -> None:
    """Off a TTY every line is JSON with severity/message; request and job lines carry their ids."""
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="auto")
    async with server_process(["python", "-m", "app"], env, log) as process:
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
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0

    lines = [orjson.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, log.read_text()
    assert all("severity" in line and "message" in line and "time" in line for line in lines)
    created = [e for e in lines if e["message"] == "request" and e.get("method") == "POST"]
    assert created[0]["request_id"] == "req-abc-123"
    assert created[0]["status"] == 201
    assert created[0]["bytes"] > 0
    finished = [e for e in lines if e["message"] == "job finished"]
    assert len(finished) == 1
    assert finished[0]["job_id"] == job["id"]
    assert finished[0]["status"] == "succeeded"
    assert "request_id" not in finished[0]  # the job outlives the request that created it
    assert finished[0]["events"] == len(record.payloads())
    assert finished[0]["bytes"] > 0
    assert finished[0]["duration_s"] > 0
    stream_requests = [e for e in lines if e["message"] == "request" and "stream" in e["path"]]
    assert stream_requests[0]["bytes"] == len(record.raw)
    streams = [e for e in lines if e["message"] == "stream closed"]
    assert streams[0]["job_id"] == job["id"]
    assert streams[0]["outcome"] == "ended"
    assert streams[0]["bytes"] == len(record.raw)
