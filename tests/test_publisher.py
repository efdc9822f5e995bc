"""The publishers (flushline_client's Publisher and SyncPublisher) against the real publish API.

The service is the real app factory on a real port; what a publisher posts goes through
a recording proxy (:class:`PublishProxy`) that can drop answers after the service has
processed the request, as a lost connection does. What watchers get is read back with the
client's own consumer (``watch_job``) from the job's stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from flushline_client import (
    ExternalJob,
    JobCancelled,
    JobEvent,
    JobFinished,
    ProducerSeqGap,
    Publisher,
    PublisherClosed,
    PublishFailed,
    SyncPublisher,
    cancel_job,
    create_external_job,
    get_job,
    watch_job,
)

from tests.support.paths import serve
from tests.support.process import free_port
from tests.support.publish_proxy import publish_proxy

STEPS: list[Any] = [{"name": "research", "expected_tokens": 400}, "write"]


async def events_of(job: ExternalJob) -> list[JobEvent]:
    """Every event of the job's stream, to its ``done`` (the job must end)."""
    async with asyncio.timeout(30):
        return [event async for event in watch_job(job.stream_url)]


def of_type(events: list[JobEvent], kind: str) -> list[dict[str, Any]]:
    """The data of the events of type ``kind``, in order."""
    return [dict(e.data) for e in events if e.type == kind]


def assert_gapless(events: list[JobEvent]) -> None:
    """seq runs 1, 2, 3... to the ``done``."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "done"


async def wait_status(base: str, job_id: str, want: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll the job's snapshot until its status is ``want``."""
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = await get_job(base, job_id)
        if snapshot["status"] == want:
            return snapshot
        assert time.monotonic() < deadline, snapshot
        await asyncio.sleep(0.05)


class TestBatching:
    """Events go out in order, a short window's worth per POST, each POST the next seq."""

    async def test_a_burst_goes_out_in_few_batches_in_order(self) -> None:
        """120 events queued at once: a handful of POSTs, producer_seq 1, 2, 3..., every event in
        the stream in order, token text whole."""
        async with serve() as base, publish_proxy(base) as proxy:
            job = await create_external_job(base, STEPS)
            async with Publisher(proxy.url, job.id, job.publish_token) as pub:
                await pub.step_started("research")
                for n in range(60):
                    await pub.tokens("research", 5, f"w{n} ")
                    await pub.insight(f"insight {n}")
                await pub.step_completed("research")
                await pub.step_started("write")
                await pub.step_completed("write")
                await pub.succeeded({"pages": 3})
            events = await events_of(job)
        seqs = [p.producer_seq for p in proxy.posts]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) <= 4, [len(p.events) for p in proxy.posts]
        assert sum(len(p.events) for p in proxy.posts) == 125
        assert_gapless(events)
        assert [d["text"] for d in of_type(events, "insight")] == [
            f"insight {n}" for n in range(60)
        ]
        chunks = "".join(d["text"] for d in of_type(events, "chunk"))
        assert chunks == "".join(f"w{n} " for n in range(60))
        assert events[-1].data["status"] == "succeeded"
        assert events[-1].data["result"] == {"pages": 3}

    async def test_a_lone_event_leaves_within_the_window(self) -> None:
        """One event on an idle publisher is posted about batch_window_s later, alone."""
        async with serve() as base, publish_proxy(base) as proxy:
            job = await create_external_job(base, STEPS)
            async with Publisher(proxy.url, job.id, job.publish_token, batch_window_s=0.05) as pub:
                await pub.step_started("research")
                await pub.flush()
                await asyncio.sleep(0.2)
                called = time.monotonic()
                await pub.insight("alone")
                while len(proxy.posts) < 2:
                    assert time.monotonic() - called < 2, "the lone event was never posted"
                    await asyncio.sleep(0.005)
                await pub.failed("enough")
        posted = proxy.posts[1]
        assert posted.events == [{"type": "insight", "text": "alone"}]
        assert 0.04 <= posted.at - called < 0.5

    async def test_batches_stop_at_max_batch_events(self) -> None:
        """35 events queued at once with max_batch_events=10: batches of 10, 10, 10, 5."""
        async with serve() as base, publish_proxy(base) as proxy:
            job = await create_external_job(base, STEPS)
            async with Publisher(proxy.url, job.id, job.publish_token, max_batch_events=10) as pub:
                for n in range(35):
                    await pub.insight(f"{n}")
                await pub.flush()
                await pub.failed("enough")
        assert [len(p.events) for p in proxy.posts[:4]] == [10, 10, 10, 5]

    async def test_a_value_json_cannot_carry_is_refused_at_the_call(self) -> None:
        """A NaN percentage raises ValueError from the call; the publisher carries on."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)
            async with Publisher(base, job.id, job.publish_token) as pub:
                await pub.step_started("research")
                with pytest.raises(ValueError, match="JSON"):
                    await pub.progress("research", float("nan"))
                await pub.progress("research", 30)
                await pub.failed("enough")
            snapshot = await get_job(base, job.id)
        assert snapshot["steps"][0]["pct"] == 30


class TestRetries:
    """A post whose answer is lost, or refused for now, is sent again: the same seq, the same
    bytes; the service publishes it once."""

    async def test_dropped_answers_publish_every_event_exactly_once(
        self, bus_env: dict[str, str]
    ) -> None:
        """Every third answer dropped after the service processed it (memory bus, Redis): the
        stream holds each event once, in order; each dropped batch was resent byte for byte."""
        async with serve(bus_env) as base, publish_proxy(base, drop_every=3) as proxy:
            job = await create_external_job(base, STEPS)
            async with Publisher(
                proxy.url, job.id, job.publish_token, batch_window_s=0.01, first_backoff_s=0.02
            ) as pub:
                await pub.step_started("research")
                for n in range(60):
                    await pub.insight(f"insight {n}")
                    await pub.tokens("research", 3, f"w{n} ")
                    await asyncio.sleep(0.015)
                await pub.step_completed("research")
                await pub.step_started("write")
                await pub.step_completed("write")
                await pub.succeeded({"ok": True})
            events = await events_of(job)
        assert proxy.dropped >= 5, len(proxy.posts)
        assert pub.stats.duplicates == proxy.dropped
        assert pub.stats.retries == proxy.dropped
        for at, post in enumerate(proxy.posts):
            if post.dropped:
                again = proxy.posts[at + 1]
                assert again.body == post.body
                assert again.status == 200
        accepted = sorted({p.producer_seq for p in proxy.posts})
        assert accepted == list(range(1, len(accepted) + 1))
        assert_gapless(events)
        assert [d["text"] for d in of_type(events, "insight")] == [
            f"insight {n}" for n in range(60)
        ]
        assert "".join(d["text"] for d in of_type(events, "chunk")) == "".join(
            f"w{n} " for n in range(60)
        )
        assert [d["step"] for d in of_type(events, "step_started")] == ["research", "write"]
        assert events[-1].data["status"] == "succeeded"

    async def test_timed_out_answers_publish_every_event_exactly_once(self) -> None:
        """Every fourth answer held back past request_timeout_s: the publisher posts the same
        batch again, the service answers it is a duplicate, each event lands once."""
        async with serve() as base, publish_proxy(base, stall_every=4, stall_s=1.0) as proxy:
            job = await create_external_job(base, STEPS)
            async with Publisher(
                proxy.url,
                job.id,
                job.publish_token,
                batch_window_s=0.01,
                request_timeout_s=0.3,
                first_backoff_s=0.02,
            ) as pub:
                for n in range(40):
                    await pub.insight(f"insight {n}")
                    await asyncio.sleep(0.02)
                await pub.failed("enough")
            events = await events_of(job)
        stalled = [at for at, post in enumerate(proxy.posts) if post.stalled]
        assert len(stalled) >= 3, len(proxy.posts)
        for at in stalled:
            again = proxy.posts[at + 1]
            assert again.body == proxy.posts[at].body
        assert pub.stats.duplicates >= len(stalled)
        assert [d["text"] for d in of_type(events, "insight")] == [
            f"insight {n}" for n in range(40)
        ]
        assert_gapless(events)

    async def test_a_rate_limited_batch_waits_for_retry_after(self) -> None:
        """Over FLUSHLINE_PUBLISH_RATE, a 429's Retry-After is waited out (no post sooner), and
        every event still lands once, in order."""
        async with (
            serve({"FLUSHLINE_PUBLISH_RATE": "100", "FLUSHLINE_PUBLISH_MAX_EVENTS": "50"}) as base,
            publish_proxy(base) as proxy,
        ):
            job = await create_external_job(base, STEPS)
            async with Publisher(
                proxy.url, job.id, job.publish_token, max_batch_events=50, batch_window_s=0
            ) as pub:
                for n in range(250):
                    await pub.insight(f"{n}")
                await pub.flush()
                await pub.failed("enough")
            events = await events_of(job)
        limited = [at for at, post in enumerate(proxy.posts) if post.status == 429]
        assert limited, [p.status for p in proxy.posts]
        for at in limited:
            assert proxy.posts[at + 1].at - proxy.posts[at].answered_at >= 0.9
        assert [d["text"] for d in of_type(events, "insight")] == [f"{n}" for n in range(250)]

    async def test_an_unreachable_service_is_given_up_on(self) -> None:
        """Nobody listening: the publisher retries with backoff, then flush raises PublishFailed."""
        url = f"http://127.0.0.1:{free_port()}"
        pub = Publisher(url, "job", "token", give_up_after_s=1.0, first_backoff_s=0.05)
        await pub.start()
        await pub.insight("lost")
        started = time.monotonic()
        with pytest.raises(PublishFailed, match="producer_seq 1 undelivered"):
            await pub.flush()
        assert time.monotonic() - started < 3
        assert pub.stats.retries >= 3
        with pytest.raises(PublishFailed):
            await pub.insight("after")
        await pub.close()  # raised already: not again
        assert isinstance(pub.error, PublishFailed)

    async def test_a_producer_seq_gap_is_a_clear_error(self) -> None:
        """Starting past the next batch: ProducerSeqGap naming the expected seq, from the next
        call and from close() (when no call has raised it yet); nothing was published."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)
            pub = Publisher(base, job.id, job.publish_token, first_producer_seq=3)
            await pub.start()
            await pub.step_started("research")
            with pytest.raises(ProducerSeqGap) as gap:
                await pub.flush()
            assert gap.value.expected == 1
            assert gap.value.status == 409
            assert "expects producer_seq 1" in gap.value.message
            with pytest.raises(ProducerSeqGap):
                await pub.insight("after")
            await pub.close()
            unseen = Publisher(base, job.id, job.publish_token, first_producer_seq=3)
            await unseen.start()
            await unseen.step_started("research")
            with pytest.raises(ProducerSeqGap):
                await unseen.close()
            snapshot = await get_job(base, job.id)
        assert snapshot["last_event_id"] == 0


class TestCancel:
    """A cancel (API or page) reaches the producer: a flag to poll and JobCancelled."""

    async def test_a_cancel_stops_a_sync_worker_within_a_second(self) -> None:
        """A worker thread reporting every 100 ms: cancelled through the API, its SyncPublisher
        reports it within 1 s and the worker stops; nothing is published as failed."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)
            seen: dict[str, Any] = {}
            stopped = threading.Event()

            def worker() -> None:
                try:
                    with SyncPublisher(base, job.id, job.publish_token) as pub:
                        pub.step_started("research")
                        for n in range(600):
                            if pub.cancelled:
                                seen["flag_at"] = time.monotonic()
                                break
                            pub.progress("research", n / 10)
                            time.sleep(0.1)
                        pub.insight("after the cancel")
                except JobCancelled as exc:
                    seen["raised_at"] = time.monotonic()
                    seen["status"] = exc.job_status
                finally:
                    stopped.set()

            thread = threading.Thread(target=worker)
            thread.start()
            await wait_status(base, job.id, "running")
            await asyncio.sleep(0.5)
            cancelled_at = time.monotonic()
            await cancel_job(base, job.id)
            assert await asyncio.to_thread(stopped.wait, 5)
            await asyncio.to_thread(thread.join, 5)
            events = await events_of(job)
        assert seen["status"] == "cancelled"
        assert seen["raised_at"] - cancelled_at < 1.0
        assert not thread.is_alive()
        assert events[-1].data["status"] == "cancelled"
        assert of_type(events, "error") == []
        assert "after the cancel" not in [d["text"] for d in of_type(events, "insight")]

    async def test_an_idle_publisher_hears_of_a_cancel_from_its_heartbeat(self) -> None:
        """A worker that reports nothing (a long call): its heartbeats bring the cancel, the flag
        turns and wait_cancelled returns within a second."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)
            async with Publisher(base, job.id, job.publish_token, heartbeat_interval_s=0.3) as pub:
                await pub.step_started("research")
                await pub.flush()
                await cancel_job(base, job.id)
                started = time.monotonic()
                await asyncio.wait_for(pub.wait_cancelled(), 2)
                assert time.monotonic() - started < 1.0
                assert pub.cancelled
                with pytest.raises(JobCancelled):
                    await pub.progress("research", 50)
            assert pub.stats.idle_heartbeats >= 1

    async def test_a_failing_on_cancel_hook_is_logged_and_the_cancel_still_surfaces(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """on_cancel raising: logged; the flag turns and the next call raises JobCancelled."""

        def hook() -> None:
            raise RuntimeError("hook broke")

        async with serve() as base:
            job = await create_external_job(base, STEPS)

            def worker() -> None:
                with SyncPublisher(
                    base, job.id, job.publish_token, on_cancel=hook, heartbeat_interval_s=0.1
                ) as pub:
                    pub.step_started("research")
                    pub.flush()
                    asyncio.run(cancel_job(base, job.id))
                    assert pub.wait_cancelled(2)
                    pub.insight("after")

            with pytest.raises(JobCancelled):
                await asyncio.to_thread(worker)
        assert "on_cancel of the publisher of job" in caplog.text
        assert "hook broke" in caplog.text


class TestEnding:
    """How the block ends is how the job ends: failed with the error, or said so."""

    async def test_an_exception_in_the_block_publishes_failed(self) -> None:
        """`async with` left by an exception: the job ends failed with the exception's text."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)

            async def worker() -> None:
                async with Publisher(base, job.id, job.publish_token) as pub:
                    await pub.step_started("research")
                    raise RuntimeError("model quota exhausted")

            with pytest.raises(RuntimeError, match="quota exhausted"):
                await worker()
            events = await events_of(job)
        (error,) = of_type(events, "error")
        assert error["message"] == "RuntimeError: model quota exhausted"
        assert events[-1].data["status"] == "failed"

    async def test_a_sync_worker_raising_publishes_failed(self) -> None:
        """`with SyncPublisher` left by an exception in a worker thread: failed, with its text."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)

            def worker() -> None:
                with SyncPublisher(base, job.id, job.publish_token) as pub:
                    pub.step_started("research")
                    pub.tokens("research", 10, "half a thought")
                    raise ValueError("the PDF is encrypted")

            with pytest.raises(ValueError, match="encrypted"):
                await asyncio.to_thread(worker)
            events = await events_of(job)
        assert of_type(events, "error")[0]["message"] == "ValueError: the PDF is encrypted"
        assert events[-1].data["status"] == "failed"

    async def test_leaving_without_a_result_says_so(self) -> None:
        """A block left normally without succeeded()/failed(): failed, naming the omission,
        rather than a stream waiting for the producer timeout."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)
            async with Publisher(base, job.id, job.publish_token) as pub:
                await pub.step_started("research")
            events = await events_of(job)
        assert "without succeeded() or failed()" in of_type(events, "error")[0]["message"]

    async def test_nothing_follows_the_end(self) -> None:
        """After succeeded(), a call raises PublisherClosed; the job keeps its result."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)
            async with Publisher(base, job.id, job.publish_token) as pub:
                await pub.succeeded({"n": 1})
                with pytest.raises(PublisherClosed):
                    await pub.insight("late")
            snapshot = await get_job(base, job.id)
        assert snapshot["status"] == "succeeded"
        assert snapshot["result"] == {"n": 1}


class TestHeartbeats:
    """An idle publisher keeps its job alive; a silent producer's job ends producer_lost."""

    async def test_idle_heartbeats_keep_the_job_alive(self) -> None:
        """FLUSHLINE_PRODUCER_TIMEOUT_S=1: three idle seconds with heartbeats every 0.25 s, and
        the job is still running, then succeeds."""
        async with serve({"FLUSHLINE_PRODUCER_TIMEOUT_S": "1"}) as base:
            job = await create_external_job(base, STEPS)
            async with Publisher(base, job.id, job.publish_token, heartbeat_interval_s=0.25) as pub:
                await pub.step_started("research")
                await asyncio.sleep(3)
                assert (await get_job(base, job.id))["status"] == "running"
                await pub.succeeded({})
        assert pub.stats.idle_heartbeats >= 6

    async def test_without_heartbeats_the_job_ends_producer_lost(self) -> None:
        """The same with heartbeats every 60 s: the job ends failed (producer_lost); the next
        publish raises JobFinished with that status, not a cancel."""
        async with serve({"FLUSHLINE_PRODUCER_TIMEOUT_S": "1"}) as base:
            job = await create_external_job(base, STEPS)
            async with Publisher(base, job.id, job.publish_token, heartbeat_interval_s=60) as pub:
                await pub.step_started("research")
                await pub.flush()
                snapshot = await wait_status(base, job.id, "failed", timeout_s=5)
                await pub.insight("too late")
                with pytest.raises(JobFinished) as ended:
                    await pub.flush()
                assert ended.value.job_status == "failed"
                assert not isinstance(ended.value, JobCancelled)
                assert not pub.cancelled
        assert "producer_lost" in json.dumps(snapshot["error"])


class TestThreads:
    """SyncPublisher takes calls from any number of threads at once."""

    async def test_eight_threads_share_one_sync_publisher(self) -> None:
        """8 threads x 40 insights: each once in the stream, each thread's in its order."""
        async with serve() as base:
            job = await create_external_job(base, STEPS)

            def run_all() -> None:
                with SyncPublisher(base, job.id, job.publish_token) as pub:
                    threads = [threading.Thread(target=report, args=(pub, t)) for t in range(8)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    pub.succeeded({"threads": 8})

            def report(pub: SyncPublisher, thread: int) -> None:
                for n in range(40):
                    pub.insight(f"{thread}:{n}")

            await asyncio.to_thread(run_all)
            events = await events_of(job)
        texts = [d["text"] for d in of_type(events, "insight")]
        assert sorted(texts) == sorted(f"{t}:{n}" for t in range(8) for n in range(40))
        for thread in range(8):
            mine = [int(t.split(":")[1]) for t in texts if t.startswith(f"{thread}:")]
            assert mine == list(range(40))
        assert events[-1].data["result"] == {"threads": 8}

    def test_a_sync_publisher_refuses_calls_after_close(self) -> None:
        """close() delivers, stops its thread; a later call raises PublisherClosed."""
        pub = SyncPublisher(f"http://127.0.0.1:{free_port()}", "job", "token")
        pub.close()
        with pytest.raises(PublisherClosed):
            pub.insight("late")
