"""Long-polling over the real server: every event once, in order, complete responses, errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from app.web.keys import BUS, MANAGER
from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import (
    FAST_JOB,
    Client,
    ScriptedPipeline,
    create_job,
    expect_json_error,
    stream_job,
    wait_finished,
    wait_until,
)
from tests.support.redis import RedisServer


async def poll(client: Client, job_id: str, query: str) -> dict[str, Any]:
    """One poll; asserts the complete, uncacheable 200 answer and returns its body."""
    response = await client.get(f"/api/jobs/{job_id}/events?{query}")
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    assert int(response.headers["Content-Length"]) == len(await response.read())
    assert "Transfer-Encoding" not in response.headers
    body = await response.json()
    assert set(body) == {"events", "last_event_id", "done"}
    return dict(body)


async def poll_all(client: Client, job_id: str, query: str = "") -> list[dict[str, Any]]:
    """Poll from seq 0 until ``done``, the way a client does; return every event."""
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(1000):
        body = await poll(client, job_id, f"after={after}&wait_s=5{query}")
        events.extend(body["events"])
        after = body["last_event_id"]
        if body["done"]:
            return events
    raise AssertionError("the job never reported done")


class TestDelivery:
    """Polling a job delivers exactly the stream's events."""

    async def test_polling_a_running_job_gets_every_event_once(self, client: Client) -> None:
        """Polls started before the job ends return seq 1..N once each, equal to the stream."""
        job = await create_job(client, QUICK_JOB)
        events = await poll_all(client, job["id"])
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "done"
        streamed = await stream_job(client, job["id"])
        assert events == streamed.payloads()

    async def test_limit_splits_history_without_gaps(self, client: Client) -> None:
        """With ?limit=3 every answer holds at most 3 events and together they hold all."""
        job = await create_job(client, {**FAST_JOB, "steps": 3})
        await wait_finished(client, job["id"])
        sizes = []
        after, events = 0, []
        while True:
            body = await poll(client, job["id"], f"after={after}&limit=3")
            sizes.append(len(body["events"]))
            events.extend(body["events"])
            after = body["last_event_id"]
            if body["done"]:
                break
        assert max(sizes) == 3
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "done"

    async def test_finished_job_answers_done_at_once(self, client: Client) -> None:
        """After the last event, a poll answers at once with no events and done."""
        job = await create_job(client, FAST_JOB)
        snapshot = await wait_finished(client, job["id"])
        last = snapshot["last_event_id"]
        started = time.monotonic()
        body = await poll(client, job["id"], f"after={last}&wait_s=30")
        assert time.monotonic() - started < 5
        assert body == {"events": [], "last_event_id": last, "done": True}

    async def test_waits_for_the_next_event(self, client: Client) -> None:
        """A poll at the newest event returns when the next one is published, not at wait_s."""
        job = await create_job(client, {"steps": 1, "tokens_per_step": 60, "tokens_per_second": 20})
        first = await poll(client, job["id"], "after=0&wait_s=10")
        after = first["last_event_id"]
        started = time.monotonic()
        body = await poll(client, job["id"], f"after={after}&wait_s=30")
        assert body["events"], body
        assert body["events"][0]["seq"] == after + 1
        assert time.monotonic() - started < 10

    async def test_times_out_empty(self, make_client: MakeClient) -> None:
        """With nothing new, the poll answers after wait_s with an empty list, not done."""
        quiet = ScriptedPipeline(((0.0, "a"), (60.0, "b")))  # silent for 60 s after "a"
        env = {
            "FLUSHLINE_PIPELINE": "scripted",
            "FLUSHLINE_CHUNK_INTERVAL": "600",
            "FLUSHLINE_PROGRESS_INTERVAL": "600",
        }
        client = await make_client(env, pipelines=(quiet,))
        job = await create_job(client, strategy="none")
        first = await poll(client, job["id"], "after=0&wait_s=5")
        after = first["last_event_id"]
        assert after > 0
        started = time.monotonic()
        body = await poll(client, job["id"], f"after={after}&wait_s=1")
        waited_s = time.monotonic() - started
        assert 0.9 <= waited_s < 5
        assert body == {"events": [], "last_event_id": after, "done": False}
        await client.post(f"/api/jobs/{job['id']}/cancel")

    async def test_many_pollers_one_job(self, client: Client) -> None:
        """Ten concurrent pollers each get the same complete event list."""
        job = await create_job(client, QUICK_JOB)
        results = await asyncio.gather(*(poll_all(client, job["id"]) for _ in range(10)))
        assert all(r == results[0] for r in results)
        assert results[0][-1]["type"] == "done"


#: One chunk per token, no progress keep-alive: the scripted job is silent between tokens.
SCRIPTED_ENV = {
    "FLUSHLINE_PIPELINE": "scripted",
    "FLUSHLINE_CHUNK_CHARS": "1",
    "FLUSHLINE_CHUNK_INTERVAL": "600",
    "FLUSHLINE_PROGRESS_INTERVAL": "600",
}


async def scripted_job(
    make_client: MakeClient, second_token_at_s: float, env: dict[str, str] | None = None
) -> tuple[Client, str, int]:
    """A job that publishes token "a" at once, then "b" after ``second_token_at_s``, then
    nothing for a minute; the client, the job id and the seq to poll after (past "a")."""
    pipeline = ScriptedPipeline(((0.0, "a"), (second_token_at_s, "b"), (60.0, "c")))
    client = await make_client({**SCRIPTED_ENV, **(env or {})}, pipelines=(pipeline,))
    job = await create_job(client, strategy="none")
    events: list[dict[str, Any]] = []
    after = 0
    while not any(e["type"] == "chunk" for e in events):
        body = await poll(client, job["id"], f"after={after}&wait_s=5")
        events += body["events"]
        after = body["last_event_id"]
    await asyncio.sleep(0.3)  # what "a" brings after its chunk (with Redis, a read later)
    return (
        client,
        job["id"],
        (await poll(client, job["id"], f"after={after}&wait_s=0"))["last_event_id"],
    )


class TestSharedReads:
    """Polls waiting after the same seq share one read of the bus and one answer."""

    async def test_concurrent_polls_share_one_subscription_and_answer(
        self, make_client: MakeClient
    ) -> None:
        """Twenty polls waiting after one seq: one bus subscriber, twenty identical answers."""
        client, job_id, after = await scripted_job(make_client, second_token_at_s=2.0)
        bus = client.app[BUS]

        async def raw_poll() -> bytes:
            response = await client.get(f"/api/jobs/{job_id}/events?after={after}&wait_s=10")
            assert response.status == 200
            return await response.read()

        polls = [asyncio.ensure_future(raw_poll()) for _ in range(20)]
        await wait_until(lambda: bus.subscriber_count(job_id) >= 1, 2.0, "the shared read")
        await asyncio.sleep(0.3)  # every poll has arrived on loopback by now
        assert not any(p.done() for p in polls)
        assert bus.subscriber_count(job_id) == 1
        bodies = await asyncio.gather(*polls)
        assert len(set(bodies)) == 1
        answer = json.loads(bodies[0])
        seqs = [e["seq"] for e in answer["events"]]
        assert seqs == list(range(after + 1, answer["last_event_id"] + 1))
        assert [e["text"] for e in answer["events"] if e["type"] == "chunk"] == ["b"]
        assert bus.subscriber_count(job_id) == 0
        await client.post(f"/api/jobs/{job_id}/cancel")

    async def test_a_poll_leaves_at_its_own_wait(self, make_client: MakeClient) -> None:
        """wait_s=1 answers empty at 1 s; a wait_s=10 poll of the same seq still gets the event."""
        client, job_id, after = await scripted_job(make_client, second_token_at_s=2.5)
        started = time.monotonic()
        short, long = await asyncio.gather(
            poll(client, job_id, f"after={after}&wait_s=1"),
            poll(client, job_id, f"after={after}&wait_s=10"),
        )
        assert short == {"events": [], "last_event_id": after, "done": False}
        assert [e["text"] for e in long["events"] if e["type"] == "chunk"] == ["b"]
        assert time.monotonic() - started < 8
        await client.post(f"/api/jobs/{job_id}/cancel")

    async def test_a_poll_whose_client_leaves_does_not_end_the_others(
        self, make_client: MakeClient
    ) -> None:
        """A poller gone mid-wait leaves the shared read; the one still waiting gets the event."""
        client, job_id, after = await scripted_job(make_client, second_token_at_s=2.0)
        bus = client.app[BUS]
        url = f"/api/jobs/{job_id}/events?after={after}&wait_s=10"
        staying = asyncio.ensure_future(poll(client, job_id, f"after={after}&wait_s=10"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await client.get(url)  # gives up and closes its connection mid-wait
        body = await staying
        assert [e["text"] for e in body["events"] if e["type"] == "chunk"] == ["b"]
        await wait_until(lambda: bus.subscriber_count(job_id) == 0, 2.0, "no subscriber left")
        await client.post(f"/api/jobs/{job_id}/cancel")

    async def test_the_last_poll_to_leave_ends_the_read(self, make_client: MakeClient) -> None:
        """Five polls that all time out leave no subscriber behind (the read is cancelled)."""
        client, job_id, after = await scripted_job(make_client, second_token_at_s=30.0)
        bus = client.app[BUS]
        bodies = await asyncio.gather(
            *(poll(client, job_id, f"after={after}&wait_s=1") for _ in range(5))
        )
        assert all(b == {"events": [], "last_event_id": after, "done": False} for b in bodies)
        await wait_until(lambda: bus.subscriber_count(job_id) == 0, 2.0, "no subscriber left")
        await client.post(f"/api/jobs/{job_id}/cancel")


class TestSharedReadsWithRedis:
    """With other instances (Redis), a drain ends every shared read at once."""

    async def test_drain_answers_waiting_polls_at_once(
        self, make_client: MakeClient, redis_server: RedisServer
    ) -> None:
        """Ten polls sharing a 20 s read answer within 2 s of a drain, and so does the next one."""
        env = {"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": redis_server.url}
        client, job_id, after = await scripted_job(make_client, 60.0, env)
        query = f"after={after}&wait_s=20"
        polls = [asyncio.ensure_future(poll(client, job_id, query)) for _ in range(10)]
        await asyncio.sleep(0.5)
        assert not any(p.done() for p in polls)
        manager = client.app[MANAGER]
        draining = asyncio.ensure_future(manager.drain(0.1))
        started = time.monotonic()
        bodies = await asyncio.gather(*polls)
        assert time.monotonic() - started < 2
        assert all(b == bodies[0] for b in bodies)
        assert all(e["seq"] > after for e in bodies[0]["events"])
        await draining
        started = time.monotonic()
        await poll(client, job_id, f"after={bodies[0]['last_event_id']}&wait_s=20")
        assert time.monotonic() - started < 2


class TestErrors:
    """Bad polls get the contract's JSON errors."""

    async def test_unknown_job_is_404(self, client: Client) -> None:
        """An unknown job id is a JSON 404."""
        response = await client.get("/api/jobs/nope/events")
        await expect_json_error(response, 404)

    @pytest.mark.parametrize(
        ("query", "field"),
        [
            ("after=-1", "after"),
            ("after=x", "after"),
            ("after=99999", "after"),
            ("wait_s=56", "wait_s"),
            ("wait_s=1.5", "wait_s"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
        ],
    )
    async def test_bad_parameters_are_400_naming_the_field(
        self, client: Client, query: str, field: str
    ) -> None:
        """A bad after, wait_s or limit is a 400 whose error names the parameter."""
        job = await create_job(client, FAST_JOB)
        await wait_finished(client, job["id"])
        response = await client.get(f"/api/jobs/{job['id']}/events?{query}")
        error = await expect_json_error(response, 400, field)
        assert error["field"] == field

    async def test_resume_before_kept_history_is_410(self, make_client: MakeClient) -> None:
        """A resume point older than the kept history is a 410, as for the stream."""
        client = await make_client({"FLUSHLINE_HISTORY_LIMIT": "5"})
        job = await create_job(client, {**FAST_JOB, "steps": 3})
        await wait_finished(client, job["id"])
        response = await client.get(f"/api/jobs/{job['id']}/events?after=1")
        error = await expect_json_error(response, 410)
        first = (await (await client.get(f"/api/jobs/{job['id']}/events?after=0")).json())[
            "events"
        ][0]["seq"]
        assert error["first_seq"] == first > 2  # where a watcher can resume from

    async def test_wrong_method_is_405(self, client: Client) -> None:
        """PUT on the events URL is a JSON 405 whose Allow names GET (POST there publishes)."""
        job = await create_job(client, FAST_JOB)
        response = await client.put(f"/api/jobs/{job['id']}/events")
        await expect_json_error(response, 405)
        assert "GET" in response.headers["Allow"]
