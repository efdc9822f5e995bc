"""The publish API against real ``flushline serve`` processes (two on one Redis).

A producer may publish each batch through either instance; every stream, on either,
holds the same events once, in order. A producer killed with SIGKILL ends the job
``failed`` (``producer_lost``) on every instance's streams within the timeout plus 2 s,
ended once. A cancel on one instance stops the producer publishing through the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.process import (
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)
from tests.support.publishing import HttpProducer, assert_progress_rules, create_external
from tests.support.redis import RedisServer
from tests.support.sse_client import StreamRecord, read_stream
from tests.test_redis_instances import Instance, start_instances

PRODUCER_TIMEOUT_S = 2.0

#: A worker that publishes a batch every 0.2 s until it is killed (urllib only).
WORKER = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    url, token = sys.argv[1], sys.argv[2]
    def publish(seq, events):
        body = json.dumps({"producer_seq": seq, "events": events}).encode()
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Authorization": "Bearer " + token, "Content-Type": "application/json"})
        with urllib.request.urlopen(request) as answer:
            answer.read()
    publish(1, [{"type": "step_started", "step": "work"}])
    print("started", flush=True)
    seq = 1
    while True:
        seq += 1
        publish(seq, [{"type": "tokens", "step": "work", "count": 5, "text": "tok "}])
        time.sleep(0.2)
    """
)


@pytest.fixture
async def pair(
    redis_server: RedisServer, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[Instance, Instance]]:
    """A and B on the session's Redis, with a short producer timeout."""
    async with contextlib.AsyncExitStack() as stack:
        a, b = await start_instances(
            stack,
            redis_server.url,
            tmp_path,
            FLUSHLINE_PRODUCER_TIMEOUT_S=str(PRODUCER_TIMEOUT_S),
        )
        yield a, b


async def watch(session: aiohttp.ClientSession, on: Instance, job_id: str) -> StreamRecord:
    url = f"{on.url}/api/jobs/{job_id}/stream?proxy_buffer=0"
    return await read_stream(session, url, timeout_s=30)


async def watch_url(session: aiohttp.ClientSession, url: str) -> StreamRecord:
    return await read_stream(session, f"{url}?proxy_buffer=0", timeout_s=30)


async def snapshot(session: aiohttp.ClientSession, on: Instance, job_id: str) -> Any:
    async with session.get(f"{on.url}/api/jobs/{job_id}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def watched_on_both(
    session: aiohttp.ClientSession, a: Instance, b: Instance, job_id: str
) -> list[asyncio.Task[StreamRecord]]:
    """Streams of the job open on A and B (the job has published once, so both exist)."""
    return [asyncio.create_task(watch(session, on, job_id)) for on in (a, b)]


class TestAnyInstance:
    """Batches through either instance make one log, whole and in order, on both."""

    async def test_batches_published_alternately_through_a_and_b(
        self, pair: tuple[Instance, Instance]
    ) -> None:
        """Twenty batches, odd ones through A, even through B: both streams hold every
        event once in order, both snapshots agree, and neither log shows the token."""
        a, b = pair
        async with aiohttp.ClientSession() as session:
            job = await create_external(session, a.url, [("first", 100), ("second", 100)])
            via = {
                name: HttpProducer(session, on.url, job["id"], job["publish_token"])
                for name, on in (("a", a), ("b", b))
            }
            seq = 0

            async def publish(*events: dict[str, Any]) -> dict[str, Any]:
                nonlocal seq
                producer = via["a" if seq % 2 == 0 else "b"]
                producer.seq = seq
                answer = await producer.publish(*events)
                seq += 1
                return answer

            await publish({"type": "step_started", "step": "first"})
            streams = await watched_on_both(session, a, b, job["id"])
            for step in ("first", "second"):
                if step == "second":
                    await publish({"type": "step_started", "step": step})
                for i in range(9):
                    await publish(
                        {"type": "insight", "text": f"{step} {i}"},
                        {"type": "tokens", "step": step, "count": 10, "text": f"[{step}{i}]"},
                    )
                await publish({"type": "step_completed", "step": step})
            last = await publish({"type": "succeeded", "result": {"ok": True}})
            records = await asyncio.wait_for(asyncio.gather(*streams), 20)
            snapshots = [await snapshot(session, on, job["id"]) for on in (a, b)]
        on_a, on_b = (record.payloads() for record in records)
        assert_progress_rules(on_a, job["id"])
        assert on_a == on_b
        assert len(on_a) == last["last_event_id"]
        insights = [p["text"] for p in on_a if p["type"] == "insight"]
        assert insights == [f"{s} {i}" for s in ("first", "second") for i in range(9)]
        text = "".join(p["text"] for p in on_a if p["type"] == "chunk")
        assert text == "".join(f"[{s}{i}]" for s in ("first", "second") for i in range(9))
        for snap in snapshots:
            assert (snap["status"], snap["result"]) == ("succeeded", {"ok": True})
            assert snap["last_event_id"] == len(on_a)
            assert [s["tokens"] for s in snap["steps"]] == [90, 90]
        for instance in (a, b):
            assert job["publish_token"] not in read_log(instance.log)

    async def test_a_cancel_on_b_stops_the_producer_publishing_through_a(
        self, pair: tuple[Instance, Instance]
    ) -> None:
        """Cancelled on B: the stream on A ends cancelled; the next publish through A is
        409 job_finished with the status."""
        a, b = pair
        async with aiohttp.ClientSession() as session:
            job = await create_external(session, a.url, ["work"])
            producer = HttpProducer(session, a.url, job["id"], job["publish_token"])
            await producer.publish({"type": "step_started", "step": "work"})
            stream = asyncio.create_task(watch(session, a, job["id"]))
            async with session.post(f"{b.url}/api/jobs/{job['id']}/cancel") as cancel:
                assert cancel.status == 202, await cancel.text()
            record = await asyncio.wait_for(stream, 5)
            async with await producer.post(2, [{"type": "heartbeat"}]) as late:
                body = await late.json()
                assert late.status == 409, body
        assert record.payloads()[-1]["status"] == "cancelled"
        assert (body["error"]["code"], body["error"]["status"]) == ("job_finished", "cancelled")


class TestProducerLost:
    """A producer that dies never leaves a stream hanging, on any instance."""

    async def test_a_producer_killed_mid_job_ends_every_stream_with_producer_lost(
        self, pair: tuple[Instance, Instance], tmp_path: pathlib.Path
    ) -> None:
        """SIGKILL the worker: streams on A and B end with one error (producer_lost) and
        one done failed, within the timeout plus 2 s of its last publish."""
        a, b = pair
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        async with aiohttp.ClientSession() as session:
            job = await create_external(session, a.url, ["work"])
            url = f"{b.url}/api/jobs/{job['id']}/events"
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                url,
                job["publish_token"],
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert worker.stdout is not None
                line = await asyncio.wait_for(worker.stdout.readline(), 10)
                assert line.strip() == b"started"
                streams = await watched_on_both(session, a, b, job["id"])
                await asyncio.sleep(1.0)
                worker.send_signal(signal.SIGKILL)
                killed_at = time.time()
            finally:
                if worker.returncode is None:
                    worker.kill()
                await worker.wait()
            records = await asyncio.wait_for(asyncio.gather(*streams), PRODUCER_TIMEOUT_S + 10)
        for record in records:
            payloads = record.payloads()
            assert [p["type"] for p in payloads].count("error") == 1
            assert [p["type"] for p in payloads[-2:]] == ["error", "done"]
            assert payloads[-2]["message"].startswith("producer_lost")
            assert payloads[-1]["status"] == "failed"
            assert any(p["type"] == "chunk" for p in payloads)
            assert record.events[-1].at - killed_at < PRODUCER_TIMEOUT_S + 2
        assert records[0].payloads() == records[1].payloads()


@contextlib.asynccontextmanager
async def memory_serve(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    """One ``flushline serve`` on the memory bus (it cancels the handlers of clients that
    leave, as deployed); yields its base URL."""
    script = require_flushline_script()
    port = free_port()
    env = clean_env(FLUSHLINE_LOG_LEVEL="warning")
    argv = [script, "serve", "--host", "127.0.0.1", "--port", str(port)]
    async with server_process(argv, env, tmp_path / "serve.log") as process:
        await wait_accepting(process, port)
        yield f"http://127.0.0.1:{port}"


async def abandon(base: str, job_id: str, token: str, seq: int, events: list[Any]) -> None:
    """Send a whole publish request, then close the connection without reading the answer."""
    body = orjson.dumps({"producer_seq": seq, "events": events})
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /api/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.transport.abort()


class TestAbandonedRequests:
    """A producer that gives up on its request never leaves half a batch published."""

    async def test_a_batch_whose_client_left_is_published_whole_or_not_at_all(
        self, tmp_path: pathlib.Path
    ) -> None:
        """Twenty batches of 100 events, each sent and abandoned at once (the server cancels
        the handler), then retried: each batch is in the log exactly once, whole."""
        async with memory_serve(tmp_path) as base, aiohttp.ClientSession() as session:
            job = await create_external(session, base, ["work"])
            producer = HttpProducer(session, base, job["id"], job["publish_token"])
            await producer.publish({"type": "step_started", "step": "work"})
            for round_ in range(20):
                events = [{"type": "insight", "text": f"r{round_}-{i}"} for i in range(100)]
                await abandon(base, job["id"], job["publish_token"], producer.seq + 1, events)
                await asyncio.sleep(0.05)
                await producer.publish(*events)
            await producer.publish({"type": "succeeded"})
            record = await watch_url(session, f"{base}/api/jobs/{job['id']}/stream")
        insights = [p["text"] for p in record.payloads() if p["type"] == "insight"]
        assert insights == [f"r{r}-{i}" for r in range(20) for i in range(100)]
        duplicates = sum(answer["duplicate"] for answer in producer.answers)
        assert 0 < duplicates <= 20  # some abandoned batches were published (whole)
