"""Operational promises of the README: health, kept history, stalled writers, cancel races.

Each runs the real app (factory, real port). Jobs that must never start are created and
cancelled through the app's own manager within one turn of the event loop, as no HTTP
round trip is that quick; everything else goes over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog.contextvars
import structlog.testing

from app.core.errors import JobAlreadyFinished
from app.core.sse import SSEParser
from app.jobs.manager import JobRequest
from app.web.keys import MANAGER
from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import (
    SLOW_JOB,
    Client,
    ScriptedPipeline,
    create_job,
    expect_json_error,
    get_job,
    open_stalled_stream,
    stream_job,
    wait_finished,
    wait_for_job,
    wait_until,
)


async def _health(client: Client) -> dict[str, Any]:
    response = await client.get("/healthz")
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body, dict)
    return body


class TestReady:
    """GET /readyz: ready unless draining (or, with Redis, Redis is unreachable)."""

    async def test_memory_instance_is_ready_until_it_drains(self, client: Client) -> None:
        """200 {"status": "ready"} at rest; 503 draining (and no new job) once draining."""
        response = await client.get("/readyz")
        assert response.status == 200
        assert await response.json() == {"status": "ready"}
        await client.app[MANAGER].drain(0.1)
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "draining"
        refused = await client.post("/api/jobs", json={})
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"


class TestHealth:
    """GET /healthz: ``{"status": "ok", "active_jobs": N}``."""

    async def test_shape_and_active_jobs_follow_a_job(self, client: Client) -> None:
        """active_jobs is 0 at rest, 1 while a job runs, 0 again once it is cancelled."""
        assert await _health(client) == {"status": "ok", "active_jobs": 0}
        job = await create_job(client, SLOW_JOB)
        await wait_for_job(client, job["id"], lambda s: s["status"] == "running")
        assert await _health(client) == {"status": "ok", "active_jobs": 1}
        assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202
        assert await _health(client) == {"status": "ok", "active_jobs": 0}

    async def test_a_finished_job_is_not_active(self, client: Client) -> None:
        """A job that has succeeded no longer counts."""
        job = await create_job(client, QUICK_JOB)
        await wait_finished(client, job["id"])
        await wait_until(
            lambda: client.app[MANAGER].active_jobs == 0, 5, "the job's end to be recorded"
        )
        assert await _health(client) == {"status": "ok", "active_jobs": 0}


class TestKeptHistory:
    """FLUSHLINE_HISTORY_LIMIT: a resume older than the kept history is a 410."""

    async def test_resume_before_the_kept_history_is_410(self, make_client: MakeClient) -> None:
        """With 5 events kept: a plain watcher gets what is kept, older resume points a 410."""
        client = await make_client({"FLUSHLINE_HISTORY_LIMIT": "5"})
        job = await create_job(client, QUICK_JOB)
        last = (await wait_finished(client, job["id"]))["last_event_id"]
        assert last > 10, last

        kept = await stream_job(client, job["id"])
        assert kept.status == 200
        seqs = kept.seqs()
        first = seqs[0]
        assert first > 1, seqs
        assert len(seqs) <= 5, seqs
        assert seqs == list(range(first, last + 1))
        assert kept.payloads()[-1]["type"] == "done"

        # Resuming right before the oldest kept event loses nothing: exactly the rest.
        resumed = await stream_job(client, job["id"], headers={"Last-Event-ID": str(first - 1)})
        assert resumed.status == 200
        assert resumed.seqs() == seqs

        # One further back, an event the client missed is gone: 410, header or query.
        url = f"/api/jobs/{job['id']}/stream"
        gone = await client.get(url, headers={"Last-Event-ID": str(first - 2)})
        error = await expect_json_error(gone, 410)
        assert error["code"] == "history_truncated"
        assert str(first) in error["message"], error
        gone = await client.get(f"{url}?last_event_id=1")
        assert (await expect_json_error(gone, 410))["code"] == "history_truncated"


def _chunked_body(raw: bytes) -> bytes:
    """The body of a (possibly cut off) HTTP/1.1 chunked response: every complete chunk."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while b"\r\n" in rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size:
            body += rest[:size]  # what arrived of the chunk the connection cut
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return body


class TestStalledWriter:
    """FLUSHLINE_SEND_TIMEOUT: a watcher whose writes stall is disconnected, then resumes."""

    async def test_stalled_writer_is_cut_by_the_send_timeout_and_resumes(
        self, make_client: MakeClient
    ) -> None:
        """A socket that stops reading is closed (send_timeout, not the queue); resume fills in."""
        # 100 events of 100 KB over about 5 s: far more than the socket buffers hold (about
        # 3 MB here), yet far fewer than the subscriber queue allows, so only the send
        # timeout can act. The timeout leaves the resume's one write of the missed history
        # (a few MB) time to get through.
        big = ScriptedPipeline(tuple((0.05, "x" * 100_000) for _ in range(100)))
        client = await make_client(
            {
                "FLUSHLINE_STRATEGY": "none",
                "FLUSHLINE_SUBSCRIBER_QUEUE": str(1 << 24),
                # The whole 10 MB history is kept: no trimming may overtake the cursor.
                "FLUSHLINE_MAX_HISTORY_BYTES": str(64 << 20),
                "FLUSHLINE_MAX_RETAINED_BYTES": str(256 << 20),
                "FLUSHLINE_SEND_TIMEOUT": "2.0",
            },
            pipelines=(big,),
        )
        job = await create_job(client, pipeline="scripted")
        loop = asyncio.get_running_loop()
        with (
            structlog.testing.capture_logs() as logs,
            contextlib.closing(await open_stalled_stream(client, job["id"])) as stalled,
        ):

            def stream_ends() -> list[MutableMapping[str, Any]]:
                return [e for e in logs if e.get("event") == "stream closed"]

            await wait_until(lambda: bool(stream_ends()), 10, "the stalled stream to be closed")
            assert [e["outcome"] for e in stream_ends()] == ["send_timeout"], stream_ends()
            # Cut while the job goes on: it was the stall, not the end of the job.
            assert (await get_job(client, job["id"]))["status"] == "running"

            # What the stalled client holds: everything up to where the server gave up.
            raw = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(loop.sock_recv(stalled, 1 << 16), 10):
                    raw += chunk
        messages = SSEParser().feed(_chunked_body(raw))
        seen = [int(orjson.loads(m.data)["seq"]) for m in messages if m.data is not None]
        assert seen == list(range(1, len(seen) + 1)), seen
        last_seen = seen[-1] if seen else 0

        resumed = await stream_job(client, job["id"], headers={"Last-Event-ID": str(last_seen)})
        assert resumed.status == 200
        final = (await get_job(client, job["id"]))["last_event_id"]
        assert resumed.seqs() == list(range(last_seen + 1, final + 1))
        assert resumed.payloads()[-1]["type"] == "done"
        assert resumed.payloads()[-1]["status"] == "succeeded"
        assert final - last_seen > 10, (last_seen, final)  # the stall did lose events to resume


class TestCancelBeforeStart:
    """A job cancelled before its task first runs (still queued) ends like any cancelled job."""

    async def test_cancel_while_queued_publishes_done(self, client: Client) -> None:
        """The answer is cancelled, the stream ends with done cancelled, the job's end is logged."""
        manager = client.app[MANAGER]
        request = JobRequest(pipeline="demo", strategy="aligned", options=SLOW_JOB)
        merge = structlog.contextvars.merge_contextvars
        with structlog.testing.capture_logs(processors=[merge]) as logs:
            job = await manager.create(request)
            assert job.status.value == "queued"
            cancelled = await manager.cancel(job.id)  # same turn: the task has not run yet
            assert cancelled.status.value == "cancelled"
            assert cancelled.started_at is None

            record = await stream_job(client, job.id, timeout_s=5)
            assert record.status == 200
            assert [(p["type"], p["status"]) for p in record.payloads()] == [("done", "cancelled")]
            snapshot = await get_job(client, job.id)
            assert snapshot["status"] == "cancelled"
            assert snapshot["finished_at"] is not None
            assert [s["status"] for s in snapshot["steps"]] == ["cancelled"]
            assert await _health(client) == {"status": "ok", "active_jobs": 0}
        ends = [e for e in logs if e.get("event") == "job finished"]
        assert [(e["job_id"], e["status"]) for e in ends] == [(job.id, "cancelled")], ends
        await expect_json_error(await client.post(f"/api/jobs/{job.id}/cancel"), 409)

    async def test_shutdown_ends_a_job_that_never_started(self, client: Client) -> None:
        """Shutting down right after a create still ends the job with done cancelled."""
        manager = client.app[MANAGER]
        job = await manager.create(JobRequest(pipeline="demo", strategy="none"))
        async with asyncio.timeout(5):
            await manager.shutdown()  # awaited directly: the job's task is still to run
        assert (await manager.get(job.id)).status.value == "cancelled"
        record = await stream_job(client, job.id, timeout_s=5)
        assert [p["type"] for p in record.payloads()] == ["done"]
        assert manager.active_jobs == 0


class TestConcurrentCancels:
    """Of two cancels racing for one job, exactly one is accepted."""

    async def test_second_cancel_in_flight_is_refused(self, client: Client) -> None:
        """Two cancels in the same loop turn: one cancelled snapshot, one JobAlreadyFinished."""
        job = await create_job(client, SLOW_JOB)
        await wait_for_job(client, job["id"], lambda s: s["status"] == "running")
        manager = client.app[MANAGER]
        first, second = await asyncio.gather(
            manager.cancel(job["id"]), manager.cancel(job["id"]), return_exceptions=True
        )
        assert not isinstance(first, BaseException), first
        assert first.status.value == "cancelled"
        assert isinstance(second, JobAlreadyFinished), second
        assert second.job_status == "cancelled"

    async def test_concurrent_http_cancels_are_202_and_409(self, client: Client) -> None:
        """Two POST .../cancel at once: one 202, one 409; the stream has a single done."""
        job = await create_job(client, SLOW_JOB)
        await wait_for_job(client, job["id"], lambda s: s["status"] == "running")
        url = f"/api/jobs/{job['id']}/cancel"
        answers = await asyncio.gather(client.post(url), client.post(url))
        assert sorted(r.status for r in answers) == [202, 409]
        for response in answers:
            if response.status == 409:
                await expect_json_error(response, 409)
        record = await stream_job(client, job["id"], timeout_s=5)
        assert [p["type"] for p in record.payloads()].count("done") == 1
        assert record.payloads()[-1]["status"] == "cancelled"
