"""A clean end of stream: 204 once the client has the last event, so EventSource stops."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog.testing

from tests.conftest import MakeClient
from tests.support.jobs import (
    FAST_JOB,
    SLOW_JOB,
    Client,
    create_job,
    stream_job,
    wait_finished,
    wait_until,
)

if TYPE_CHECKING:
    from playwright.async_api import Browser


class TestNoContent:
    """The 204 answer over HTTP."""

    async def test_resume_at_last_event_of_finished_job_is_204(self, client: Client) -> None:
        """Last-Event-ID (header or query) at a finished job's last event answers 204, no body."""
        job = await create_job(client, FAST_JOB)
        last = (await wait_finished(client, job["id"]))["last_event_id"]
        by_header = await stream_job(client, job["id"], headers={"Last-Event-ID": str(last)})
        by_query = await stream_job(client, job["id"], query=f"?last_event_id={last}")
        for record in (by_header, by_query):
            assert record.status == 204
            assert record.raw == b""

    async def test_one_before_last_still_streams(self, client: Client) -> None:
        """One event short of the end, the stream answers 200 with exactly the last event."""
        job = await create_job(client, FAST_JOB)
        last = (await wait_finished(client, job["id"]))["last_event_id"]
        record = await stream_job(client, job["id"], headers={"Last-Event-ID": str(last - 1)})
        assert record.status == 200
        assert record.seqs() == [last]

    async def test_running_job_at_newest_event_streams(self, client: Client) -> None:
        """A running job resumed at its newest event is a live 200 stream, not a 204."""
        job = await create_job(client, SLOW_JOB)
        first = await stream_job(client, job["id"], stop_after=1)
        record_task = asyncio.create_task(
            stream_job(
                client,
                job["id"],
                headers={"Last-Event-ID": str(first.seqs()[-1])},
                stop_after=1,
                timeout_s=30,
            )
        )
        await asyncio.sleep(0.5)
        await client.post(f"/api/jobs/{job['id']}/cancel")
        record = await record_task
        assert record.status == 200
        assert record.seqs()[0] == first.seqs()[-1] + 1


async def test_eventsource_stops_reconnecting_after_done(
    make_client: MakeClient, browser: Browser
) -> None:
    """An EventSource that never calls close() is stopped by the 204: two requests, then none."""
    client = await make_client({"FLUSHLINE_RETRY_MS": "100"})
    job = await create_job(client, FAST_JOB)
    last = (await wait_finished(client, job["id"]))["last_event_id"]
    page = await browser.new_page()
    await page.goto(str(client.make_url("/healthz")))
    with structlog.testing.capture_logs() as logs:

        def stream_statuses() -> list[int]:
            """The status of every stream request, from the server's request log lines."""
            return [
                line["status"]
                for line in logs
                if line["event"] == "request" and line["path"].endswith("/stream")
            ]

        await page.evaluate(
            """(url) => {
                window.seen = [];
                window.source = new EventSource(url);
                window.source.addEventListener(
                    "done", (e) => window.seen.push(JSON.parse(e.data).seq));
            }""",
            job["links"]["stream"],
        )
        await wait_until(lambda: len(stream_statuses()) >= 2, timeout_s=10, what="a reconnect")
        # With retry 100 ms, a client that kept reconnecting would make ~20 more requests.
        await asyncio.sleep(2.0)
        assert stream_statuses() == [200, 204]
    assert await page.evaluate("window.source.readyState") == 2  # EventSource.CLOSED
    assert await page.evaluate("window.seen") == [last]
