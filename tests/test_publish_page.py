"""The live page follows an external job like a built-in one (real headless Chromium)."""

from __future__ import annotations

import asyncio

from tests import test_page
from tests.support.jobs import Client, get_job
from tests.support.publishing import HttpProducer, create_external
from tests.test_page import (
    JOB_TIMEOUT_MS,
    OpenPage,
    base_url,
    phase_statuses,
    progress_of,
    shown_text,
    wait_state,
)

#: The page tests' fixture: a fresh browser context recording errors and requests.
open_page = test_page.open_page

STEPS = ("gather", "draft", "review", "polish")
#: Records every value the progress bar takes (a MutationObserver on aria-valuenow).
RECORD_PROGRESS_JS = """
() => {
  const bar = document.getElementById('progress');
  window.__progressValues = [+bar.getAttribute('aria-valuenow')];
  new MutationObserver(() => window.__progressValues.push(+bar.getAttribute('aria-valuenow')))
    .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
}
"""


class TestThePage:
    """``/?job=ID`` of an external job: its declared steps, rising progress, its end."""

    async def test_the_page_follows_an_external_job_to_its_end(
        self, client: Client, open_page: OpenPage
    ) -> None:
        """Opened while the job waits for its producer, the page shows the four declared
        steps, a bar that rises as the producer reports, and the finished job."""
        base = base_url(client).rstrip("/")
        job = await create_external(client.session, base, [(name, 40) for name in STEPS])
        producer = HttpProducer(client.session, base, job["id"], job["publish_token"])
        page, record = await open_page(base_url(client, f"/?job={job['id']}"))
        await page.evaluate(RECORD_PROGRESS_JS)
        await producer.publish({"type": "step_started", "step": STEPS[0]})
        await wait_state(page, "running")
        names = await page.eval_on_selector_all(".phase-name", "els => els.map(e => e.textContent)")
        assert names == [f"{i + 1}. {name}" for i, name in enumerate(STEPS)]
        for i, name in enumerate(STEPS):
            if i:
                await producer.publish({"type": "step_started", "step": name})
            for part in range(4):
                await producer.publish(
                    {"type": "tokens", "step": name, "count": 10, "text": f"{name}-{part} "}
                )
                await asyncio.sleep(0.15)
            await producer.publish({"type": "step_completed", "step": name})
        await producer.publish({"type": "succeeded", "result": {"summary": "all four"}})
        await wait_state(page, "succeeded", JOB_TIMEOUT_MS)
        assert await progress_of(page) == 100
        assert await phase_statuses(page) == ["done"] * len(STEPS)
        assert await shown_text(page) == "".join(f"polish-{part} " for part in range(4))
        assert await page.text_content("#status-line") == "Job succeeded."
        values = await page.evaluate("() => window.__progressValues")
        assert values == sorted(values)
        assert len(set(values)) >= 8, values
        assert (await get_job(client, job["id"]))["result"] == {"summary": "all four"}
        record.assert_clean()
