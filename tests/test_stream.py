"""The SSE stream over the real server: headers, event grammar, resume, fan-out, slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import tracemalloc
from typing import Any

import orjson
import pytest
import structlog.testing

from app.core.events import ChunkEvent
from app.core.tasks import cancel_and_wait
from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import (
    FAST_JOB,
    SLOW_JOB,
    Client,
    bus_of,
    create_job,
    expect_json_error,
    get_job,
    open_stalled_stream,
    stream_job,
    wait_finished,
    wait_for_job,
    wait_until,
)
from tests.support.sse_client import StreamRecord

STRATEGY_NAMES = ["none", "padding", "frequency", "combined", "aligned"]
EVENT_TYPES = {
    "job_started", "step_started", "chunk", "insight", "step_progress", "step_completed",
    "error", "done",
}  # fmt: skip
#: Fields beyond type/job_id/seq/ts that each event type must carry.
EXTRA_FIELDS = {
    "job_started": {"steps", "strategy"},
    "step_started": {"step", "index", "total_steps"},
    "chunk": {"step", "text", "tokens"},
    "insight": {"text"},
    "step_progress": {"step", "pct", "overall_pct", "tokens", "eta_s"},
    "step_completed": {"step", "index", "pct", "overall_pct", "tokens", "duration_s"},
    "error": {"message", "step"},
    "done": {"status", "overall_pct"},
}


def check_grammar(payloads: list[dict[str, Any]], steps: list[str], strategy: str) -> None:
    """job_started; per step: step_started, insight, chunks/insights/progress, step_completed;
    then done succeeded."""
    types = [p["type"] for p in payloads]
    assert types[0] == "job_started", types
    assert payloads[0]["steps"] == steps
    assert payloads[0]["strategy"] == strategy
    i = 1
    for index, name in enumerate(steps):
        started = payloads[i]
        assert started["type"] == "step_started", (strategy, types)
        assert (started["step"], started["index"], started["total_steps"]) == (
            name, index, len(steps),
        )  # fmt: skip
        assert payloads[i + 1]["type"] == "insight", (strategy, types)
        i += 2
        body: list[dict[str, Any]] = []
        while payloads[i]["type"] != "step_completed":
            body.append(payloads[i])
            i += 1
        body_types = {p["type"] for p in body}
        assert body_types <= {"chunk", "insight", "step_progress"}, (strategy, types)
        assert "chunk" in body_types, (strategy, name, types)
        assert "step_progress" in body_types, (strategy, name, types)
        for p in body:
            if p["type"] != "insight":
                assert p["step"] == name, (strategy, p)
        completed = payloads[i]
        assert (completed["step"], completed["index"], completed["pct"]) == (name, index, 100)
        i += 1
    assert types[i:] == ["done"], (strategy, types)
    assert payloads[i]["status"] == "succeeded"
    assert payloads[i]["overall_pct"] == 100
    assert isinstance(payloads[i]["result"], dict)


def check_envelope(record: StreamRecord, job_id: str, not_before: float) -> None:
    """seq 1..N without gaps; every data has type, job_id, seq and a ts close to its arrival."""
    assert record.seqs() == list(range(1, len(record.events) + 1))
    last_ts = 0.0
    for arrival in record.events:
        data = arrival.data
        assert data["type"] in EVENT_TYPES, data
        assert arrival.message.event == data["type"]
        assert arrival.message.id == str(data["seq"])
        assert data["job_id"] == job_id
        assert isinstance(data["seq"], int)
        assert not isinstance(data["seq"], bool)
        assert isinstance(data["ts"], float), data
        assert not_before - 0.5 <= data["ts"] <= arrival.at + 0.5, (data, arrival.at)
        assert data["ts"] >= last_ts
        last_ts = data["ts"]
        assert EXTRA_FIELDS[data["type"]] <= set(data), data


def check_progress(payloads: list[dict[str, Any]], *, succeeded: bool = True) -> None:
    """pct and overall_pct never decrease and stay below 100 until a step/the job completes."""
    overall = 0.0
    step_pct: dict[str, float] = {}
    completed = [p for p in payloads if p["type"] == "step_completed"]
    for p in payloads:
        if p["type"] == "step_progress":
            assert p["pct"] >= step_pct.get(p["step"], 0.0), p
            assert 0 <= p["pct"] < 100, p
            assert p["overall_pct"] >= overall, p
            assert 0 <= p["overall_pct"] < 100, p
            step_pct[p["step"]] = p["pct"]
            overall = p["overall_pct"]
        elif p["type"] == "step_completed":
            assert p["pct"] == 100, p
            assert p["overall_pct"] >= overall, p
            if p is completed[-1] and succeeded:
                assert p["overall_pct"] == 100, p
            else:
                assert p["overall_pct"] < 100, p
            step_pct[p["step"]] = 100.0
            overall = p["overall_pct"]
        elif p["type"] == "done":
            assert p["overall_pct"] >= overall, p
            if p["status"] == "succeeded":
                assert p["overall_pct"] == 100, p
            else:
                assert p["overall_pct"] < 100, p


class TestResponse:
    """The stream's HTTP response."""

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    async def test_headers_and_retry_line(self, make_client: MakeClient, strategy: str) -> None:
        """200 with exactly the contract's headers, no Content-Encoding, first line retry:."""
        client = await make_client({"FLUSHLINE_STRATEGY": strategy})
        job = await create_job(client, FAST_JOB)
        record = await stream_job(
            client, job["id"], headers={"Accept-Encoding": "gzip, deflate, br"}
        )
        assert record.status == 200
        headers = {k.lower(): v for k, v in record.headers.items()}
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache, no-transform"
        assert headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in headers
        assert "content-length" not in headers
        first_line, _, _ = record.raw.partition(b"\n")
        name, _, value = first_line.partition(b": ")
        assert name == b"retry", record.raw[:100]
        assert value.isdigit(), first_line
        assert record.payloads()[-1]["type"] == "done"

    async def test_retry_follows_flushline_retry_ms(self, make_client: MakeClient) -> None:
        """The retry: value is FLUSHLINE_RETRY_MS."""
        client = await make_client({"FLUSHLINE_RETRY_MS": "1234"})
        job = await create_job(client, FAST_JOB)
        record = await stream_job(client, job["id"])
        assert record.raw.startswith(b"retry: 1234\n")
        assert record.arrivals[0].message.retry_ms == 1234


class TestEvents:
    """The events of a demo job as one subscriber sees them."""

    async def test_event_sequence_for_every_strategy(self, make_client: MakeClient) -> None:
        """Each strategy's stream follows the grammar job_started .. step_completed .. done."""
        client = await make_client()
        jobs = [await create_job(client, QUICK_JOB, strategy=s) for s in STRATEGY_NAMES]
        records = await asyncio.gather(*(stream_job(client, job["id"]) for job in jobs))
        for strategy, job, record in zip(STRATEGY_NAMES, jobs, records, strict=True):
            assert record.status == 200
            check_grammar(record.payloads(), ["analyze", "match"], strategy)
            snapshot = await get_job(client, job["id"])
            assert record.payloads()[-1]["result"] == snapshot["result"]

    async def test_seq_and_envelope(self, client: Client) -> None:
        """seq starts at 1 with no gaps; every event has type, job_id, seq, float ts near now."""
        posted = time.time()
        job = await create_job(client, QUICK_JOB)
        record = await stream_job(client, job["id"])
        assert len(record.events) >= 10
        check_envelope(record, job["id"], posted)
        assert record.events[-1].data["type"] == "done"
        # The job takes about a second: the timestamps are spread over it, not one burst.
        assert record.events[-1].data["ts"] - record.events[0].data["ts"] >= 0.5

    async def test_progress_never_decreases(self, make_client: MakeClient) -> None:
        """pct/overall_pct never decrease, stay < 100 until completion, are 100 at the end."""
        client = await make_client({"FLUSHLINE_PROGRESS_INTERVAL": "0.1"})
        job = await create_job(client, QUICK_JOB, strategy="combined")
        record = await stream_job(client, job["id"])
        payloads = record.payloads()
        assert sum(p["type"] == "step_progress" for p in payloads) >= 4
        check_progress(payloads)
        percentages = [p["pct"] for p in payloads if p["type"] == "step_progress"]
        assert len(set(percentages)) >= 3  # real estimates, not one constant

    async def test_failed_job_progress(self, client: Client) -> None:
        """A failed job's progress also never decreases and its done stays below 100."""
        job = await create_job(client, {**QUICK_JOB, "fail_at_step": 1}, strategy="frequency")
        record = await stream_job(client, job["id"])
        payloads = record.payloads()
        assert payloads[-1]["status"] == "failed"
        check_progress(payloads, succeeded=False)

    async def test_chunks_concatenate_to_the_result(self, client: Client) -> None:
        """Each step's chunk texts, concatenated, equal that step's text in the result."""
        job = await create_job(client, {**QUICK_JOB, "seed": "chunks"}, strategy="frequency")
        record = await stream_job(client, job["id"])
        payloads = record.payloads()
        result = payloads[-1]["result"]
        for name in ("analyze", "match"):
            chunks = [p for p in payloads if p["type"] == "chunk" and p["step"] == name]
            assert len(chunks) >= 2, name
            assert "".join(c["text"] for c in chunks) == result["steps"][name]
            assert sum(c["tokens"] for c in chunks) == QUICK_JOB["tokens_per_step"]
        assert result == (await get_job(client, job["id"]))["result"]

    async def test_finished_job_replays_and_ends(self, client: Client) -> None:
        """A finished job's stream replays its whole history at once and ends."""
        job = await create_job(client, FAST_JOB)
        snapshot = await wait_finished(client, job["id"])
        record = await stream_job(client, job["id"], timeout_s=5)
        assert record.seqs() == list(range(1, snapshot["last_event_id"] + 1))
        assert record.payloads()[-1]["type"] == "done"
        assert record.ended_at - record.requested_at < 1.0
        again = await stream_job(client, job["id"], timeout_s=5)
        assert again.payloads() == record.payloads()


class TestResume:
    """Last-Event-ID (header or ?last_event_id=) resumes after any seq."""

    async def _finished_history(self, client: Client) -> tuple[str, list[dict[str, Any]]]:
        job = await create_job(client, {**FAST_JOB, "steps": 3}, strategy="frequency")
        await wait_finished(client, job["id"])
        record = await stream_job(client, job["id"])
        payloads = record.payloads()
        assert len(payloads) >= 15
        assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
        return job["id"], payloads

    async def test_every_resume_point_by_header(self, client: Client) -> None:
        """For every k before the last event, Last-Event-ID: k gives exactly events k+1..end."""
        job_id, full = await self._finished_history(client)
        for k in range(len(full)):
            record = await stream_job(client, job_id, headers={"Last-Event-ID": str(k)})
            assert record.status == 200
            assert record.payloads() == full[k:], k
            assert record.raw.startswith(b"retry:")

    async def test_every_resume_point_by_query(self, client: Client) -> None:
        """For every k before the last event, ?last_event_id=k gives exactly events k+1..end."""
        job_id, full = await self._finished_history(client)
        for k in range(len(full)):
            record = await stream_job(client, job_id, query=f"?last_event_id={k}")
            assert record.status == 200
            assert record.payloads() == full[k:], k

    async def test_zero_means_everything(self, client: Client) -> None:
        """Last-Event-ID 0 (header or query) replays the whole history."""
        job_id, full = await self._finished_history(client)
        by_header = await stream_job(client, job_id, headers={"Last-Event-ID": "0"})
        by_query = await stream_job(client, job_id, query="?last_event_id=0")
        assert by_header.payloads() == full
        assert by_query.payloads() == full

    async def test_header_wins_over_query(self, client: Client) -> None:
        """With both, the Last-Event-ID header decides the resume point."""
        job_id, full = await self._finished_history(client)
        record = await stream_job(
            client, job_id, headers={"Last-Event-ID": "7"}, query="?last_event_id=2"
        )
        assert record.payloads() == full[7:]
        record = await stream_job(
            client, job_id, headers={"Last-Event-ID": "2"}, query="?last_event_id=7"
        )
        assert record.payloads() == full[2:]

    async def test_resume_mid_job_continues_live(self, client: Client) -> None:
        """Resuming a running job after seq k gives k+1.. from history, then the live events."""
        job = await create_job(client, QUICK_JOB)
        seen = await wait_for_job(client, job["id"], lambda s: s["last_event_id"] >= 4)
        assert seen["status"] == "running"
        k = seen["last_event_id"]
        record = await stream_job(client, job["id"], headers={"Last-Event-ID": str(k)})
        seqs = record.seqs()
        assert seqs[0] == k + 1
        assert seqs == list(range(k + 1, k + 1 + len(seqs)))
        assert record.payloads()[-1]["type"] == "done"
        assert seqs[-1] == (await get_job(client, job["id"]))["last_event_id"]

    @pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", " ", "1e3", "0x10", "+3", "٣"])
    async def test_invalid_header_is_400(self, client: Client, value: str) -> None:
        """A Last-Event-ID that is not a non-negative integer is a 400 naming the header."""
        job = await create_job(client, FAST_JOB)
        url = client.make_url(f"/api/jobs/{job['id']}/stream")
        response = await client.session.get(url, headers={"Last-Event-ID": value})
        await expect_json_error(response, 400, field="Last-Event-ID")

    @pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", "1e3", "%2B3", "%20"])
    async def test_invalid_query_is_400(self, client: Client, value: str) -> None:
        """A ?last_event_id= that is not a non-negative integer is a 400 naming the field."""
        job = await create_job(client, FAST_JOB)
        response = await client.get(f"/api/jobs/{job['id']}/stream?last_event_id={value}")
        await expect_json_error(response, 400, field="last_event_id")


class TestLiveSubscribers:
    """Subscribers joining late, many at once, or never reading."""

    async def test_late_joiner_gets_history_then_live(self, client: Client) -> None:
        """A subscriber joining mid-job without Last-Event-ID gets seq 1.. then live, no gap."""
        job = await create_job(client, QUICK_JOB)
        early = asyncio.create_task(stream_job(client, job["id"]))
        seen = await wait_for_job(client, job["id"], lambda s: s["last_event_id"] >= 4)
        assert seen["status"] == "running"
        late = await stream_job(client, job["id"])
        assert late.seqs() == list(range(1, len(late.events) + 1))
        assert late.payloads()[-1]["type"] == "done"
        assert late.payloads() == (await early).payloads()
        # The late joiner really was live: its last events arrived well after it connected.
        assert late.events[-1].at - late.headers_at >= 0.2

    async def test_fifty_subscribers_see_identical_sequences(self, client: Client) -> None:
        """50 concurrent subscribers of one job all receive the same complete sequence."""
        job = await create_job(client, QUICK_JOB)
        tasks = [asyncio.create_task(stream_job(client, job["id"])) for _ in range(50)]
        await wait_until(lambda: bus_of(client).subscriber_count(job["id"]) == 50, 5)
        records = await asyncio.gather(*tasks)
        first = records[0].payloads()
        assert first[-1]["type"] == "done"
        assert [p["seq"] for p in first] == list(range(1, len(first) + 1))
        for record in records:
            assert record.status == 200
            assert record.payloads() == first
        await wait_until(lambda: bus_of(client).subscriber_count(job["id"]) == 0, 2)

    async def test_late_joiners_keep_no_copy_of_the_history_they_replayed(
        self, client: Client
    ) -> None:
        """20 streams that replayed 640 KB each hold no copy of it once caught up."""
        job = await create_job(client, SLOW_JOB)
        text = "x" * 16_384
        for _ in range(40):
            await bus_of(client).publish(job["id"], ChunkEvent("step-1", text, 1))
        history_bytes = 40 * len(text)
        replayed = [asyncio.Event() for _ in range(20)]

        async def follow(done: asyncio.Event) -> None:
            url = client.make_url(f"/api/jobs/{job['id']}/stream")
            async with client.session.get(url) as response:
                received = 0
                async for data in response.content.iter_any():
                    received += len(data)
                    if received > history_bytes:
                        done.set()

        tracemalloc.start(32)
        try:
            before = tracemalloc.take_snapshot()
            readers = [asyncio.create_task(follow(done)) for done in replayed]
            async with asyncio.timeout(20):
                for done in replayed:
                    await done.wait()
            await asyncio.sleep(0.2)  # every stream back at its wait for the next event
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        for reader in readers:
            await cancel_and_wait(reader)
        in_streams = [tracemalloc.Filter(True, "*/app/web/stream.py", all_frames=True)]
        held = after.filter_traces(in_streams).compare_to(
            before.filter_traces(in_streams), "filename"
        )
        held_per_stream = sum(stat.size_diff for stat in held) / len(replayed)
        assert held_per_stream < history_bytes / 10, (held_per_stream, held[:5])

    async def test_stalled_subscriber_is_cut_off(self, make_client: MakeClient) -> None:
        """A socket that never reads is cut off; the others get every event and the job its pace."""
        client = await make_client(
            {
                "FLUSHLINE_STRATEGY": "padding",
                "FLUSHLINE_PADDING_BYTES": "262144",
                "FLUSHLINE_SUBSCRIBER_QUEUE": "20",
                "FLUSHLINE_CHUNK_INTERVAL": "0.05",
            }
        )
        options = {"steps": 2, "tokens_per_step": 120, "tokens_per_second": 80}  # ~3 s
        job = await create_job(client, options)
        bus = bus_of(client)
        loop = asyncio.get_running_loop()
        stalled = await open_stalled_stream(client, job["id"])
        try:
            assert bus.subscriber_count(job["id"]) == 1
            normal = asyncio.create_task(stream_job(client, job["id"]))
            await wait_until(lambda: bus.subscriber_count(job["id"]) == 2, 5)

            # The stalled subscriber is dropped while the job is still running.
            await wait_until(lambda: bus.subscriber_count(job["id"]) <= 1, 5, "the cut-off")
            assert (await get_job(client, job["id"]))["status"] == "running"

            # The server closed the stalled connection: draining it reaches EOF or a reset.
            async def drain() -> None:
                with contextlib.suppress(ConnectionResetError):
                    while await loop.sock_recv(stalled, 1 << 16):
                        pass

            await asyncio.wait_for(drain(), 10)

            record = await normal
            payloads = record.payloads()
            assert [p["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
            assert payloads[-1]["type"] == "done"
            assert payloads[-1]["status"] == "succeeded"
            assert len(payloads) > 30
            snapshot = await get_job(client, job["id"])
            assert snapshot["last_event_id"] == payloads[-1]["seq"]
            elapsed = payloads[-1]["ts"] - payloads[0]["ts"]
            assert elapsed < 3.0 + 1.0, elapsed
        finally:
            stalled.close()


class TestHeartbeat:
    """Keep-alive frames while the job is silent."""

    async def test_heartbeats_during_silence(self, make_client: MakeClient) -> None:
        """A silent stretch gets event: heartbeat frames with no id: line and no seq."""
        client = await make_client(
            {"FLUSHLINE_HEARTBEAT_INTERVAL": "0.2", "FLUSHLINE_STRATEGY": "none"}
        )
        # 2 tokens at 1/s: 2 s, whose only events after the start are the token at 1 s
        # (its progress, 50%, and the chunk at 1.2 s) and the end: silences of a second.
        job = await create_job(client, {"steps": 1, "tokens_per_step": 2, "tokens_per_second": 1})
        record = await stream_job(client, job["id"])
        beats = record.heartbeats
        assert len(beats) >= 4, [(a.at, a.message.event) for a in record.arrivals]
        for beat in beats:
            assert beat.message.event == "heartbeat"
            assert beat.message.id is None
            data = orjson.loads(beat.message.data or "")
            assert set(data) == {"type", "job_id", "ts"}, data
            assert data["type"] == "heartbeat"
            assert data["job_id"] == job["id"]
            assert abs(data["ts"] - beat.at) < 0.5
        assert b"id: " not in b"".join(
            block for block in record.raw.split(b"\n\n") if b"event: heartbeat" in block
        )
        # Heartbeats never break the event sequence, and are paced by the interval.
        assert record.seqs() == list(range(1, len(record.events) + 1))
        gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
        assert min(gaps) >= 0.1, gaps
        arrivals = [a.at for a in record.arrivals if a.message.data is not None]
        silences = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(silences) < 0.2 + 0.4, silences

    async def test_no_heartbeat_while_events_flow(self, make_client: MakeClient) -> None:
        """While events come faster than the heartbeat interval, no heartbeat is sent."""
        client = await make_client(
            {
                "FLUSHLINE_HEARTBEAT_INTERVAL": "0.2",
                "FLUSHLINE_STRATEGY": "none",
                "FLUSHLINE_CHUNK_INTERVAL": "0.05",
            }
        )
        job = await create_job(client, QUICK_JOB)
        record = await stream_job(client, job["id"])
        times = [a.data["ts"] for a in record.events]
        assert max(b - a for a, b in itertools.pairwise(times)) < 0.15
        assert record.heartbeats == []
        assert b"heartbeat" not in record.raw


class TestDisconnect:
    """A client that goes away."""

    async def test_disconnect_releases_subscriber_and_job_goes_on(
        self, make_client: MakeClient
    ) -> None:
        """A client leaving during a silent stretch is released at once; the job still succeeds."""
        client = await make_client(
            {
                "FLUSHLINE_STRATEGY": "none",
                "FLUSHLINE_CHUNK_INTERVAL": "60",
                "FLUSHLINE_CHUNK_CHARS": "100000",
            }
        )
        # 20 tokens at 10/s: 2 s with no event between the step's start and its end.
        job = await create_job(client, {"steps": 1, "tokens_per_step": 20, "tokens_per_second": 10})
        bus = bus_of(client)
        partial = await stream_job(client, job["id"], stop_after=3)
        assert [p["type"] for p in partial.payloads()] == ["job_started", "step_started", "insight"]
        left = time.monotonic()
        await wait_until(lambda: bus.subscriber_count(job["id"]) == 0, 1.0, "the release")
        assert time.monotonic() - left < 1.0
        assert (await get_job(client, job["id"]))["status"] == "running"
        snapshot = await wait_finished(client, job["id"])
        assert snapshot["status"] == "succeeded"

    async def test_disconnect_is_not_logged_as_server_error(self, make_client: MakeClient) -> None:
        """A client leaving mid-stream is logged as 499 (client closed request), not 500."""
        client = await make_client({"FLUSHLINE_STRATEGY": "none"})
        job = await create_job(client, {"steps": 1, "tokens_per_step": 20, "tokens_per_second": 10})
        path = f"/api/jobs/{job['id']}/stream"
        with structlog.testing.capture_logs() as logs:
            await stream_job(client, job["id"], stop_after=3)

            def request_lines() -> list[dict[str, Any]]:
                return [e for e in logs if e.get("event") == "request" and e.get("path") == path]

            await wait_until(lambda: len(request_lines()) == 1, 2, "the request log line")
        assert request_lines()[0]["status"] == 499
        assert all(e.get("log_level") != "error" for e in logs), logs
        await client.post(f"/api/jobs/{job['id']}/cancel")
