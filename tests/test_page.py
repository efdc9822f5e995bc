"""The live progress page at ``/`` in a real headless Chromium, on the real app on a real port."""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from app.core.settings import Settings
from app.web.factory import init_app
from tests.conftest import QUICK_JOB
from tests.support.browser import ARTIFACTS
from tests.support.jobs import (
    SLOW_JOB,
    Client,
    create_job,
    expect_json_error,
    get_job,
    wait_finished,
    wait_for_job,
)
from tests.support.paths import EMULATOR_4096_ALL, open_path, serve

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, ViewportSize

#: A demo job long enough to catch the page mid-job (4 steps x 90 tokens at 60 tokens/s, ~6 s).
PAGE_JOB: dict[str, Any] = {"steps": 4, "tokens_per_step": 90, "tokens_per_second": 60}
#: Generous bounds: two cores shared with other test runs.
LOAD_TIMEOUT_MS = 15_000
JOB_TIMEOUT_MS = 45_000
DESKTOP: ViewportSize = {"width": 1100, "height": 900}
#: Tall enough for the client's whole reason in the health panel (the README's screenshot).
TALL: ViewportSize = {"width": 1100, "height": 1000}
PHONE: ViewportSize = {"width": 375, "height": 800}
#: The start form's demo option inputs (their ids are the option names).
OPTION_FIELDS = ("steps", "tokens_per_step", "tokens_per_second")


#: A `none` job of about 8 s (4 steps x 120 tokens at 60 tokens/s) for the proxy test.
PROXY_JOB: dict[str, Any] = {"steps": 4, "tokens_per_step": 120, "tokens_per_second": 60}
#: Records every value the progress bar takes (a MutationObserver on aria-valuenow).
_RECORD_PROGRESS_JS = """
() => {
  const bar = document.getElementById('progress');
  window.__progressValues = [+bar.getAttribute('aria-valuenow')];
  new MutationObserver(() => window.__progressValues.push(+bar.getAttribute('aria-valuenow')))
    .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
}
"""


@attrs.define
class Recorder:
    """What a page did: console errors, uncaught exceptions and every request it made."""

    console_errors: list[str] = attrs.Factory(list)
    page_errors: list[str] = attrs.Factory(list)
    requests: list[tuple[str, str]] = attrs.Factory(list)

    def assert_clean(self) -> None:
        """No console error and no uncaught exception."""
        assert self.console_errors == []
        assert self.page_errors == []

    def paths(self, method: str | None = None) -> list[str]:
        """The path of every request (of ``method`` when given), in order."""
        return [urlsplit(url).path for m, url in self.requests if method in (None, m)]


OpenPage = Callable[..., Awaitable[tuple["Page", Recorder]]]


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Open a URL in a fresh browser context that records errors and requests."""
    contexts = []

    async def open_(url: str, viewport: ViewportSize = DESKTOP) -> tuple[Page, Recorder]:
        context = await browser.new_context(viewport=viewport)
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(LOAD_TIMEOUT_MS)
        record = Recorder()
        page.on(
            "console",
            lambda msg: record.console_errors.append(msg.text) if msg.type == "error" else None,
        )
        page.on("pageerror", lambda exc: record.page_errors.append(str(exc)))
        page.on("request", lambda req: record.requests.append((req.method, req.url)))
        await page.goto(url)
        await page.wait_for_function("() => document.body.dataset.sensing !== undefined")
        return page, record

    yield open_
    for context in contexts:
        await context.close()


def base_url(client: Client, path: str = "/") -> str:
    """The absolute URL of ``path`` on the test server."""
    return str(client.make_url(path))


async def state_of(page: Page) -> str:
    """The page's ``body[data-state]``."""
    return str(await page.evaluate("() => document.body.dataset.state"))


async def wait_state(page: Page, state: str, timeout_ms: int = JOB_TIMEOUT_MS) -> None:
    """Wait until ``body[data-state]`` is ``state``."""
    await page.wait_for_function(
        "s => document.body.dataset.state === s", arg=state, timeout=timeout_ms
    )


async def progress_of(page: Page) -> int:
    """The progress bar's ``aria-valuenow``."""
    value = await page.get_attribute("#progress", "aria-valuenow")
    assert value is not None
    return int(value)


async def phase_statuses(page: Page) -> list[str]:
    """Every phase's ``data-status``, in step order."""
    statuses = await page.eval_on_selector_all(".phase", "els => els.map(e => e.dataset.status)")
    return [str(s) for s in statuses]


async def shown_text(page: Page) -> str:
    """The step text on screen."""
    return str(await page.eval_on_selector("#text", "e => e.textContent"))


async def start_from_form(page: Page, strategy: str, options: dict[str, Any]) -> None:
    """Fill the start form and submit it."""
    await page.select_option("#strategy", strategy)
    for name, value in options.items():
        await page.fill(f"#{name}", str(value))
    await page.click("#start")


async def assert_finished_view(page: Page, snapshot: dict[str, Any]) -> None:
    """The page shows ``snapshot``'s succeeded job complete: bar at 100, every phase done, text."""
    assert snapshot["status"] == "succeeded", snapshot
    assert await state_of(page) == "succeeded"
    assert await page.evaluate("() => document.body.dataset.jobId") == snapshot["id"]
    assert await progress_of(page) == 100
    assert await page.get_attribute("#progress", "role") == "progressbar"
    assert await page.get_attribute("#progress", "aria-valuemin") == "0"
    assert await page.get_attribute("#progress", "aria-valuemax") == "100"
    step_texts = snapshot["result"]["steps"]
    assert await phase_statuses(page) == ["done"] * len(step_texts)
    # With no step running, the text shown is the last step's, exactly as generated.
    assert await shown_text(page) == list(step_texts.values())[-1]
    assert await page.text_content("#status-line") == "Job succeeded."
    seqs = await page.evaluate("() => window.flushlineEvents.map(e => e.data.seq)")
    assert seqs == list(range(1, snapshot["last_event_id"] + 1))
    logged = await page.eval_on_selector_all("#log li", "els => els.map(e => +e.dataset.seq)")
    assert logged == list(reversed(seqs))[:200]


async def test_page_loads_clean_and_accessible(client: Client, open_page: OpenPage) -> None:
    """/ loads with no console error, only same-origin requests, labelled inputs and headings."""
    page, record = await open_page(base_url(client))
    assert await state_of(page) == "idle"
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.labels.length === 0).map(e => e.id || e.name)"""
    )
    assert unlabelled == []
    assert await page.locator("h1").count() == 1
    assert await page.locator("h2").count() >= 4
    assert await page.get_attribute("#status-line", "aria-live") == "polite"
    assert await page.get_attribute("#progress", "aria-valuenow") == "0"
    origin = base_url(client, "/").rstrip("/")
    assert record.requests, "the page made no request at all"
    outside = [url for _, url in record.requests if not url.startswith(origin + "/")]
    assert outside == []
    assert sorted(set(record.paths())) == [
        "/",
        "/static/flushline.js",
        "/static/page.css",
        "/static/page.js",
    ]
    record.assert_clean()


async def test_form_runs_a_job_to_the_end(client: Client, open_page: OpenPage) -> None:
    """The form starts a demo job and the page follows it live to 100%, every phase done."""
    page, record = await open_page(base_url(client))
    # frequency: text every 0.3 s, so the running step shows some mid-job.
    await start_from_form(page, "frequency", PAGE_JOB)
    await page.wait_for_function(
        """() => { const v = +document.getElementById('progress').getAttribute('aria-valuenow');
                   return v >= 40 && v < 100 && document.getElementById('text').textContent; }""",
        timeout=JOB_TIMEOUT_MS,
    )
    assert await state_of(page) == "running"
    statuses = await phase_statuses(page)
    assert len(statuses) == PAGE_JOB["steps"]
    assert "running" in statuses
    assert "done" in statuses
    assert await page.text_content("#status-line") not in ("", "Start a job, or open one by id.")
    assert await page.eval_on_selector_all("#log li", "els => els.length") > 0
    assert await page.get_attribute("#health", "data-transport") in (
        "fetch-stream",
        "eventsource",
        "long-poll",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "page-mid-job.png"))

    await wait_state(page, "succeeded")
    job_id = await page.evaluate("() => document.body.dataset.jobId")
    snapshot = await get_job(client, job_id)
    await assert_finished_view(page, snapshot)
    assert snapshot["strategy"] == "frequency"
    assert snapshot["options"] == PAGE_JOB
    assert urlsplit(page.url).query == f"job={job_id}"
    assert await page.get_attribute("#health", "data-connection") == "closed"
    record.assert_clean()
    assert {urlsplit(url).netloc for _, url in record.requests} == {
        client.make_url("/").raw_authority
    }
    assert record.paths("POST") == ["/api/jobs"]
    await page.screenshot(path=str(ARTIFACTS / "page-end.png"), full_page=True)


async def test_opens_a_finished_job_by_id(client: Client, open_page: OpenPage) -> None:
    """/?job=ID of a finished job replays it: bar at 100, every phase done, its text."""
    job = await create_job(client, QUICK_JOB, strategy="none")
    snapshot = await wait_finished(client, job["id"])
    page, record = await open_page(base_url(client, f"/?job={job['id']}"))
    await wait_state(page, "succeeded")
    await assert_finished_view(page, snapshot)
    assert await page.text_content("#job-strategy") == "none"
    # The time since the last byte keeps counting with no event: it is redrawn every second.
    before = await page.text_content("#last-byte")
    assert before is not None
    assert before.endswith(" s ago")
    await page.wait_for_function(
        "b => document.getElementById('last-byte').textContent !== b", arg=before, timeout=3000
    )
    record.assert_clean()


async def test_event_log_keeps_the_newest_events(client: Client, open_page: OpenPage) -> None:
    """A job of more events than the log's bound leaves the newest 200 rows, newest first."""
    job = await create_job(
        client, {"steps": 50, "tokens_per_step": 10, "tokens_per_second": 5000}, strategy="none"
    )
    snapshot = await wait_finished(client, job["id"])
    assert snapshot["last_event_id"] > 250
    page, _ = await open_page(base_url(client, f"/?job={job['id']}"))
    await wait_state(page, "succeeded")
    await assert_finished_view(page, snapshot)
    logged = await page.eval_on_selector_all("#log li", "els => els.map(e => +e.dataset.seq)")
    newest = snapshot["last_event_id"]
    assert logged == list(range(newest, newest - 200, -1))


async def test_opens_a_running_job_by_id(client: Client, open_page: OpenPage) -> None:
    """/?job=ID of a running job shows it running, then follows it to the end."""
    job = await create_job(client, PAGE_JOB)
    await wait_for_job(client, job["id"], lambda s: s["progress"] > 0)
    page, _ = await open_page(base_url(client, f"/?job={job['id']}"))
    await wait_state(page, "running")
    assert 0 < await progress_of(page) < 100
    await wait_state(page, "succeeded")
    await assert_finished_view(page, await get_job(client, job["id"]))


async def test_unknown_job_id_shows_the_api_error(client: Client, open_page: OpenPage) -> None:
    """/?job=ID of an unknown job shows the API's 404 message and watches nothing."""
    page, record = await open_page(base_url(client, "/?job=no-such-job"))
    await wait_state(page, "error")
    expected = await expect_json_error(await client.get("/api/jobs/no-such-job"), 404)
    assert await page.text_content("#form-error") == expected["message"]
    assert await page.is_visible("#form-error")
    assert await page.evaluate("() => window.flushlineWatcher") is None
    assert not [p for p in record.paths() if p.endswith("/stream") or p.endswith("/events")]


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", "0"), ("tokens_per_second", "0"), ("tokens_per_step", "-5")],
)
async def test_bad_input_shows_the_api_error(
    client: Client, open_page: OpenPage, field: str, value: str
) -> None:
    """A value the API rejects shows its message by the form, marks the field, starts nothing."""
    page, _ = await open_page(base_url(client))
    # The same body the page sends: the form's values, with the bad one.
    options = {name: json.loads(await page.input_value(f"#{name}")) for name in OPTION_FIELDS}
    options[field] = json.loads(value)
    strategy = await page.input_value("#strategy")
    await page.fill(f"#{field}", value)
    await page.click("#start")
    await page.wait_for_selector("#form-error", state="visible")
    response = await client.post("/api/jobs", json={"strategy": strategy, "options": options})
    expected = await expect_json_error(response, 400, field)
    assert await page.text_content("#form-error") == expected["message"]
    assert await page.get_attribute(f"#{field}", "aria-invalid") == "true"
    assert await state_of(page) == "idle"
    assert urlsplit(page.url).query == ""
    listed = await (await client.get("/api/jobs")).json()
    assert listed["jobs"] == []


async def test_works_behind_a_path_prefix(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    open_page: OpenPage,
) -> None:
    """Mounted under /prefix/, the page starts and follows a job through /prefix/ URLs only."""
    root = web.Application()
    root.add_subapp("/prefix/", init_app(Settings.from_environ({})))
    client = await aiohttp_client(root)
    page, record = await open_page(base_url(client, "/prefix/"))
    await start_from_form(page, "frequency", QUICK_JOB)
    await wait_state(page, "succeeded")
    job_id = await page.evaluate("() => document.body.dataset.jobId")
    snapshot = await get_job_at(client, f"/prefix/api/jobs/{job_id}")
    await assert_finished_view(page, snapshot)
    assert urlsplit(page.url).path == "/prefix/"
    paths = record.paths()
    assert [p for p in paths if not p.startswith("/prefix/")] == []
    assert "/prefix/api/jobs" in record.paths("POST")
    assert [p for p in paths if p.startswith(f"/prefix/api/jobs/{job_id}/")] != []
    record.assert_clean()

    # And an existing job opened by id under the prefix.
    page2, record2 = await open_page(base_url(client, f"/prefix/?job={job_id}"))
    await wait_state(page2, "succeeded")
    await assert_finished_view(page2, snapshot)
    assert [p for p in record2.paths() if not p.startswith("/prefix/")] == []


async def get_job_at(client: Client, path: str) -> dict[str, Any]:
    """GET a snapshot at ``path`` (for an app mounted under a prefix)."""
    response = await client.get(path)
    assert response.status == 200, await response.text()
    snapshot = await response.json()
    assert isinstance(snapshot, dict)
    return snapshot


async def test_page_through_a_buffering_proxy(open_page: OpenPage, tmp_path: pathlib.Path) -> None:
    """Behind a 4 KB buffering proxy, /?job=ID of a `none` job shows live progress to the end."""
    async with (
        serve() as service,
        open_path(EMULATOR_4096_ALL, service, tmp_path) as front,
        aiohttp.ClientSession() as session,
    ):
        job = await post_job(session, service, {"strategy": "none", "options": PROXY_JOB})
        page, record = await open_page(f"{front}/?job={job['id']}", viewport=TALL)
        await page.evaluate(_RECORD_PROGRESS_JS)
        await page.wait_for_function(
            """() => +document.getElementById('progress').getAttribute('aria-valuenow') >= 55
                     || ['succeeded', 'failed', 'cancelled', 'error']
                        .includes(document.body.dataset.state)""",
            timeout=JOB_TIMEOUT_MS,
        )
        ARTIFACTS.mkdir(exist_ok=True)
        if await state_of(page) == "running":
            await page.screenshot(path=str(ARTIFACTS / "page-behind-proxy-mid-job.png"))
        await wait_state(page, "succeeded")
        values = await page.evaluate("() => window.__progressValues")
        intermediate = sorted({v for v in values if 0 < v < 100})
        assert len(intermediate) >= 3, values
        state = await page.evaluate(
            "() => { const s = window.flushlineWatcher.state;"
            " return {transport: s.transport, reason: s.reason, decisions: s.decisions.length}; }"
        )
        # The health panel shows the client's own final choice and its reason.
        assert await page.get_attribute("#health", "data-transport") == state["transport"]
        assert await page.text_content("#reason") == state["reason"]
        assert state["decisions"] >= 2, state
        async with session.get(f"{service}/api/jobs/{job['id']}") as response:
            snapshot = await response.json()
        await assert_finished_view(page, snapshot)
        record.assert_clean()
        assert {urlsplit(url).netloc for _, url in record.requests} == {urlsplit(front).netloc}
        await page.screenshot(path=str(ARTIFACTS / "page-behind-proxy.png"), full_page=True)


async def test_form_through_a_proxy_starts_a_job(
    open_page: OpenPage, tmp_path: pathlib.Path
) -> None:
    """Through a reverse proxy, the page's own form starts a job (its POST is same-origin)."""
    async with serve() as service, open_path(EMULATOR_4096_ALL, service, tmp_path) as front:
        page, _ = await open_page(f"{front}/")
        await start_from_form(page, "aligned", QUICK_JOB)
        await page.wait_for_function(
            "() => document.body.dataset.jobId || !document.getElementById('form-error').hidden"
        )
        assert await page.is_hidden("#form-error"), await page.text_content("#form-error")
        await wait_state(page, "succeeded")


async def post_job(
    session: aiohttp.ClientSession, service: str, body: dict[str, Any]
) -> dict[str, Any]:
    """POST a job straight to the service; assert 201; return the snapshot."""
    async with session.post(f"{service}/api/jobs", json=body) as response:
        snapshot = await response.json()
        assert response.status == 201, snapshot
    assert isinstance(snapshot, dict)
    return snapshot


async def test_phone_width_has_no_horizontal_scroll(client: Client, open_page: OpenPage) -> None:
    """At 375x800 the empty page and a finished job with its text and log fit the width."""
    page, _ = await open_page(base_url(client), viewport=PHONE)
    assert await page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    assert await page.is_visible("#job-form")
    job = await create_job(client, QUICK_JOB)
    await wait_finished(client, job["id"])
    page, _ = await open_page(base_url(client, f"/?job={job['id']}"), viewport=PHONE)
    await wait_state(page, "succeeded")
    widths = await page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1] == PHONE["width"]
    box = await page.locator("#progress").bounding_box()
    assert box is not None
    assert (box["y"], box["width"]) == (0, PHONE["width"])
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)


async def test_sense_off_switch(client: Client, open_page: OpenPage) -> None:
    """?sense=0 turns the client's sensing off and the page still follows the job to the end."""
    job = await create_job(client, QUICK_JOB, strategy="none")
    page, _ = await open_page(base_url(client, f"/?job={job['id']}&sense=0"))
    assert await page.evaluate("() => document.body.dataset.sensing") == "off"
    # The option the page passed to watchJob, as the client keeps it.
    assert await page.evaluate("() => window.flushlineWatcher.options.sensing") is False
    await wait_state(page, "succeeded")
    await assert_finished_view(page, await wait_finished(client, job["id"]))


async def test_sensing_is_on_by_default(client: Client, open_page: OpenPage) -> None:
    """Without ?sense=0 the page asks the client to sense delivery."""
    job = await create_job(client, QUICK_JOB)
    page, _ = await open_page(base_url(client, f"/?job={job['id']}"))
    await wait_state(page, "succeeded")
    assert await page.evaluate("() => document.body.dataset.sensing") == "on"
    assert await page.evaluate("() => window.flushlineWatcher.options.sensing") is True


async def test_cancel_button_cancels_the_job(client: Client, open_page: OpenPage) -> None:
    """The cancel button cancels the running job; the page ends showing it cancelled."""
    job = await create_job(client, SLOW_JOB)
    page, _ = await open_page(base_url(client, f"/?job={job['id']}"))
    await wait_state(page, "running")
    await page.click("#cancel")
    await wait_state(page, "cancelled")
    snapshot = await wait_finished(client, job["id"])
    assert snapshot["status"] == "cancelled"
    assert await page.text_content("#status-line") == "Job cancelled."
    assert await page.is_hidden("#cancel")


#: An API token for the auth-on page tests.
PAGE_API_TOKEN = "page-token-0123456789"


async def test_page_with_auth_on(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    open_page: OpenPage,
) -> None:
    """With auth on, the page sends the token of #api_token= and streams with the job's token."""
    settings = Settings.from_environ({"FLUSHLINE_API_TOKEN": PAGE_API_TOKEN})
    client = await aiohttp_client(init_app(settings))
    page, record = await open_page(base_url(client, f"/#api_token={PAGE_API_TOKEN}"))
    await start_from_form(page, "frequency", QUICK_JOB)
    await wait_state(page, "succeeded")
    job_id = await page.evaluate("() => document.body.dataset.jobId")
    streams = [url for _, url in record.requests if f"/api/jobs/{job_id}/stream" in url]
    assert streams, record.requests
    assert all("token=" in url for url in streams)
    assert all(PAGE_API_TOKEN not in url for _, url in record.requests)
    record.assert_clean()

    # Without the token the page shows the API's own refusal and starts nothing.
    page2, _ = await open_page(base_url(client, "/"))
    await start_from_form(page2, "frequency", QUICK_JOB)
    await page2.wait_for_selector("#form-error", state="visible")
    expected = await expect_json_error(await client.post("/api/jobs", json={}), 401)
    assert await page2.text_content("#form-error") == expected["message"]
    assert await state_of(page2) == "idle"
