"""The browser client never dies while its job lives: real service, real sockets, headless Chromium.

A page that falls behind a job whose history is trimmed meets a 410 on resume, shows the
gap and the job's snapshot, and still reaches ``done`` with the job's final result; with
auth on and stream tokens living 5 s, a 20 s watch finishes through refreshed tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.jobs import Client, create_job, get_job, wait_finished, wait_for_job

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

MakeClient = Callable[..., Awaitable[Client]]
#: Generous bounds: two cores shared with other test runs.
JOB_TIMEOUT_MS = 60_000
#: A job of about 12 s with an event every ~0.2 s or faster (frequency: chunks every
#: 0.3 s or 100 characters, progress with them).
GAP_JOB: dict[str, Any] = {"steps": 3, "tokens_per_step": 160, "tokens_per_second": 40}
#: A job of about 20 s (2 steps x 200 tokens at 20 tokens/s).
LONG_JOB: dict[str, Any] = {"steps": 2, "tokens_per_step": 200, "tokens_per_second": 20}
API_TOKEN = "resilience-test-token"


@pytest.fixture
async def new_page(browser: Browser) -> AsyncIterator[Callable[[], Awaitable[Page]]]:
    """A page in a fresh context (closed afterwards) that fails the test on a page error."""
    contexts = []
    errors: list[str] = []

    async def open_() -> Page:
        context = await browser.new_context()
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(JOB_TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert errors == []


async def watched_events(page: Page) -> list[int]:
    """The seq of every event the page applied, in order."""
    return list(await page.evaluate("() => window.flushlineEvents.map(e => e.data.seq)"))


async def gaps_of(page: Page) -> list[list[Any]]:
    """Each gap the watcher reported: [skipped, firstKept, whether a snapshot came]."""
    return list(
        await page.evaluate(
            "() => window.flushlineWatcher.state.gaps"
            ".map(g => [g.skipped, g.firstKept, !!g.snapshot])"
        )
    )


class TestGapOnResume:
    """A client that falls behind a job whose history is trimmed resumes through a reported gap."""

    async def test_page_offline_past_the_kept_history_reaches_done(
        self, make_client: MakeClient, new_page: Callable[[], Awaitable[Page]]
    ) -> None:
        """Long-polling, offline while 30+ events pass (5 kept): 410, gap shown, snapshot, done."""
        client = await make_client({"FLUSHLINE_HISTORY_LIMIT": "5"})
        job = await create_job(client, GAP_JOB, strategy="frequency")
        page = await new_page()
        await page.goto(str(client.make_url(f"/?job={job['id']}&transport=long-poll")))
        await page.wait_for_function("() => window.flushlineEvents.length >= 3")
        await page.context.set_offline(True)  # new requests fail; the next poll is a resume
        paused_at = (await get_job(client, job["id"]))["last_event_id"]
        await wait_for_job(client, job["id"], lambda s: s["last_event_id"] >= paused_at + 30, 30)
        await page.context.set_offline(False)
        await page.wait_for_function(
            "() => document.body.dataset.state === 'succeeded'", timeout=JOB_TIMEOUT_MS
        )
        final = await wait_finished(client, job["id"])
        gaps = await gaps_of(page)
        # Five kept events are few: a poll may also fall behind before the pause. The pause
        # itself is one gap of 20 events or more past the point where it began.
        assert any(s >= 20 and f > paused_at and snap for s, f, snap in gaps), (paused_at, gaps)
        assert all(snap for _, _, snap in gaps), gaps
        assert await page.evaluate("() => document.body.dataset.gaps") == str(len(gaps))
        assert await page.is_visible("#gap")
        notice = await page.text_content("#gap")
        skipped = sum(s for s, _, _ in gaps)
        assert notice is not None
        assert f"{skipped} events the server no longer kept" in notice, notice
        assert await page.get_attribute("#progress", "aria-valuenow") == "100"
        assert await page.text_content("#status-line") == "Job succeeded."
        state = await page.evaluate("() => window.flushlineWatcher.state")
        assert state["result"] == final["result"]
        seqs = await watched_events(page)
        assert seqs == sorted(set(seqs)), "every event once, in order"
        assert seqs[-1] == final["last_event_id"]
        assert len(seqs) < final["last_event_id"], "the gap's events were never delivered"

    async def test_stream_resume_older_than_the_history_reaches_done(
        self, make_client: MakeClient, new_page: Callable[[], Awaitable[Page]]
    ) -> None:
        """flushline.js on the stream resuming after seq 2 once 25 events passed: 410, gap, done."""
        client = await make_client({"FLUSHLINE_HISTORY_LIMIT": "5"})
        job = await create_job(client, GAP_JOB, strategy="frequency")
        await wait_for_job(client, job["id"], lambda s: s["last_event_id"] >= 25, 30)
        page = await new_page()
        await page.goto(str(client.make_url("/")))
        outcome = await page.evaluate(
            """async (id) => {
                const { watchJob } = await import('./static/flushline.js');
                const gaps = [];
                const watcher = watchJob(`api/jobs/${id}/stream`, {
                    transport: 'fetch-stream', lastEventId: 2, onGap: (gap) => gaps.push(gap),
                });
                const state = await watcher.done;
                return {
                    status: state.status, result: state.result, pct: state.overallPct,
                    last: state.lastEventId,
                    gaps: gaps.map(g => [g.afterSeq, g.firstKept, g.skipped]),
                    snapshotPct: gaps.length ? gaps[0].snapshot.progress : null,
                };
            }""",
            job["id"],
        )
        final = await wait_finished(client, job["id"])
        assert outcome["status"] == "succeeded", outcome
        assert outcome["result"] == final["result"]
        assert outcome["pct"] == 100
        assert outcome["last"] == final["last_event_id"]
        # The first gap is the resume's; five kept events may be trimmed again while the
        # snapshot is read (a second, short gap).
        after_seq, first_kept, skipped = outcome["gaps"][0]
        assert after_seq == 2, outcome["gaps"]
        assert first_kept > 20, outcome["gaps"]
        assert skipped == first_kept - 3, outcome["gaps"]
        for (_, kept, _), (later_after, _, _) in itertools.pairwise(outcome["gaps"]):
            assert later_after >= kept - 1, outcome["gaps"]
        assert outcome["snapshotPct"] > 0


@contextlib.asynccontextmanager
async def cutting_proxy(port: int, cut_after_s: float) -> AsyncIterator[int]:
    """A TCP proxy to ``127.0.0.1:port`` that cuts every connection ``cut_after_s`` after
    it opened (a network that drops long responses); yields its own port."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(cut_after_s):
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except TimeoutError:
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(relay(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class TestStreamTokenRefresh:
    """With stream tokens living 5 s, a 20 s watch lives on through getStreamUrl."""

    AUTH_ENV = {"FLUSHLINE_API_TOKEN": API_TOKEN, "FLUSHLINE_STREAM_TOKEN_TTL_S": "5"}
    HEADERS = {"Authorization": f"Bearer {API_TOKEN}"}

    async def watch_to_the_end(self, client: Client, page: Page, url: str, job_id: str) -> None:
        """The page at ``url`` shows the job succeeded, every event once, after a refresh."""
        await page.goto(url)
        await page.wait_for_function(
            "() => document.body.dataset.state === 'succeeded'", timeout=JOB_TIMEOUT_MS
        )
        response = await client.get(f"/api/jobs/{job_id}", headers=self.HEADERS)
        final = await response.json()
        assert final["status"] == "succeeded"
        state = await page.evaluate("() => window.flushlineWatcher.state")
        assert state["tokenRefreshes"] >= 1, state["decisions"]
        assert state["gaps"] == []
        assert state["result"] == final["result"]
        assert await watched_events(page) == list(range(1, final["last_event_id"] + 1))
        assert await page.get_attribute("#progress", "aria-valuenow") == "100"
        refreshes = await page.evaluate("() => document.body.dataset.tokenRefreshes")
        assert refreshes == str(state["tokenRefreshes"])

    async def create(self, client: Client) -> dict[str, Any]:
        """A 20 s job created with the API token."""
        response = await client.post(
            "/api/jobs", json={"options": LONG_JOB, "strategy": "frequency"}, headers=self.HEADERS
        )
        assert response.status == 201, await response.text()
        job: dict[str, Any] = await response.json()
        assert "token=" in job["links"]["stream"]
        return job

    async def test_long_polling_page_refreshes_its_token(
        self, make_client: MakeClient, new_page: Callable[[], Awaitable[Page]]
    ) -> None:
        """Long-polling for 20 s on 5 s tokens: every poll after the first 5 s needs a fresh one."""
        client = await make_client(self.AUTH_ENV)
        job = await self.create(client)
        url = client.make_url(f"/?job={job['id']}&transport=long-poll")
        await self.watch_to_the_end(
            client, await new_page(), f"{url}#api_token={API_TOKEN}", job["id"]
        )

    async def test_stream_cut_every_3_s_resumes_with_fresh_tokens(
        self, make_client: MakeClient, new_page: Callable[[], Awaitable[Page]]
    ) -> None:
        """A stream cut every 3 s reconnects about 6 times in 20 s, each time with a live token."""
        client = await make_client(self.AUTH_ENV)
        job = await self.create(client)
        port = client.make_url("/").port
        assert port is not None
        async with cutting_proxy(port, cut_after_s=3.0) as proxy_port:
            url = f"http://127.0.0.1:{proxy_port}/?job={job['id']}&transport=fetch-stream"
            await self.watch_to_the_end(
                client, await new_page(), f"{url}#api_token={API_TOKEN}", job["id"]
            )
