"""A worker process publishing through SyncPublisher, watched on the page in a real browser.

Everything is real and separate, as a user runs it: ``flushline serve`` with its defaults
(only the loopback host and a free port given), the worker ``examples/worker_thread.py``
as a subprocess (its agent in a thread, publishing through ``SyncPublisher``), and the
page at ``/?job=ID`` in headless Chromium.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from flushline_client import ExternalJob, create_external_job, get_job

from tests.support.browser import ARTIFACTS
from tests.support.process import (
    ROOT,
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.integration

WORKER = ROOT / "examples" / "worker_thread.py"
STEPS = ("research", "outline", "draft", "review")
REPORTS = 10  # the worker's reports per step
JOB_TIMEOUT_MS = 45_000
#: Records every value the progress bar takes, with the page's clock (ms).
_RECORD_PROGRESS_JS = """
() => {
  const bar = document.getElementById('progress');
  const read = () => [performance.now(), +bar.getAttribute('aria-valuenow')];
  window.__progress = [read()];
  new MutationObserver(() => window.__progress.push(read()))
    .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
}
"""


@pytest.fixture
async def flushline(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    """``flushline serve`` with its defaults on a free loopback port; its base URL."""
    script = require_flushline_script()
    port = free_port()
    env = clean_env(FLUSHLINE_HOST="127.0.0.1", FLUSHLINE_PORT=str(port))
    log = tmp_path / "serve.log"
    async with server_process([script, "serve"], env, log) as process:
        await wait_accepting(process, port)
        yield f"http://127.0.0.1:{port}"
        assert process.returncode is None, read_log(log)[-2000:]


async def start_worker(base: str, job: ExternalJob, step_s: float) -> asyncio.subprocess.Process:
    """``python examples/worker_thread.py`` publishing to ``job``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        f"--url={base}",
        f"--job={job.id}",
        f"--publish-token={job.publish_token}",
        f"--step-seconds={step_s}",
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def open_job_page(browser: Browser, base: str, job_id: str) -> tuple[Page, list[str]]:
    """The page at ``/?job=ID``, recording its progress values; and its errors, as they come."""
    context = await browser.new_context(viewport={"width": 1100, "height": 1000})
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{base}/?job={job_id}")
    await page.wait_for_function("() => window.flushlineWatcher != null")
    await page.evaluate(_RECORD_PROGRESS_JS)
    return page, errors


async def new_job(base: str) -> ExternalJob:
    """An external job with the worker's four steps."""
    steps = [{"name": step, "expected_tokens": REPORTS * 20} for step in STEPS]
    return await create_external_job(base, steps)


class TestWorkerOnThePage:
    """The page shows a worker's progress live, and its cancel reaches the worker."""

    async def test_progress_rises_through_the_job_and_the_result_shows(
        self, flushline: str, browser: Browser
    ) -> None:
        """Four steps of 1.5 s from a worker subprocess: the bar takes rising values all through
        the job (never back), ends at 100 with every step done, the last step's text and
        the worker's result."""
        job = await new_job(flushline)
        page, errors = await open_job_page(browser, flushline, job.id)
        worker = await start_worker(flushline, job, step_s=1.5)
        try:
            await page.wait_for_function(
                "() => document.body.dataset.state === 'succeeded'", timeout=JOB_TIMEOUT_MS
            )
        finally:
            out, err = await asyncio.wait_for(worker.communicate(), 30)
        assert worker.returncode == 0, err.decode()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page-external-worker.png"), full_page=True)
        progress: list[list[float]] = await page.evaluate("() => window.__progress")
        values = [value for _, value in progress]
        assert values == sorted(values), values
        assert values[-1] == 100
        intermediate = [(at, v) for at, v in progress if 0 < v < 100]
        assert len({v for _, v in intermediate}) >= 12, values
        # Rising all through the job, not all at the end: values in each quarter of the time
        # from the first value the worker moved to the last (100).
        first, last = intermediate[0][0], progress[-1][0]
        quarters = {min(int(4 * (at - first) / (last - first)), 3) for at, _ in intermediate}
        assert quarters == {0, 1, 2, 3}, progress
        state: dict[str, Any] = await page.evaluate(
            "() => { const s = window.flushlineWatcher.state;"
            " return {result: s.result, status: s.status}; }"
        )
        assert state["status"] == "succeeded"
        assert state["result"] == {"steps": list(STEPS), "words": len(STEPS) * REPORTS * 2}
        assert await page.text_content("#status-line") == "Job succeeded."
        phases = await page.eval_on_selector_all(".phase", "els => els.map(e => e.dataset.status)")
        assert phases == ["done"] * len(STEPS)
        review = "".join(f"review {n}. " for n in range(1, REPORTS + 1))
        assert await page.text_content("#text") == review
        assert errors == []
        assert out.decode().startswith('{"job": "' + job.id)

    async def test_a_cancel_from_the_page_stops_the_worker_within_a_second(
        self, flushline: str, browser: Browser
    ) -> None:
        """The page's cancel button mid-job: the worker's SyncPublisher reports the cancel
        within 1 s of the service taking it (the worker's on_cancel line on stderr), the
        agent stops at its next report, the worker exits 3, the job ends cancelled."""
        job = await new_job(flushline)
        page, errors = await open_job_page(browser, flushline, job.id)
        worker = await start_worker(flushline, job, step_s=3.0)
        assert worker.stderr is not None
        try:
            await page.wait_for_function(
                "() => +document.getElementById('progress').getAttribute('aria-valuenow') >= 10",
                timeout=JOB_TIMEOUT_MS,
            )
            async with page.expect_response(lambda r: r.url.endswith("/cancel")) as answer:
                await page.click("#cancel")
            assert (await answer.value).status == 202
            cancelled = time.monotonic()
            line = await asyncio.wait_for(worker.stderr.readline(), 10)
            reported = time.monotonic()
            stopped = await asyncio.wait_for(worker.stderr.readline(), 10)
            code = await asyncio.wait_for(worker.wait(), 10)
            exited = time.monotonic()
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        assert line.decode() == "the job was cancelled\n", line
        assert stopped.decode() == "the agent stopped\n", stopped
        assert reported - cancelled < 1.0
        assert code == 3
        assert exited - cancelled < 2.0
        await page.wait_for_function("() => document.body.dataset.state === 'cancelled'")
        snapshot = await get_job(flushline, job.id)
        assert snapshot["status"] == "cancelled"
        assert snapshot["steps"][-1]["status"] != "succeeded"
        assert errors == []
