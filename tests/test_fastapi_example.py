"""examples/fastapi_app, installed and run as its users would, driven end to end.

The example gets a venv of its own (``python -m venv``) with FastAPI, uvicorn and the
client distribution (``./clients/python``), and not the Flushline service: its own
package is named ``app``, and there ``import app`` must be the example's. Flushline runs
beside it as ``flushline serve`` with auth on; the example creates jobs with the API token
and its agent publishes through ``SyncPublisher`` from a worker thread. The test reads the
progress from Flushline with the client's consumer.

Installing takes a registry: without one the tests skip, saying so (they fail instead under
``FLUSHLINE_REQUIRE_INTEGRATION=1``). A run takes about a minute, most of it pip.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from flushline_client import JobEvent, cancel_job, watch_job

from tests.support.process import (
    ROOT,
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)
from tests.support.registry import require_registry

if TYPE_CHECKING:
    from playwright.async_api import Browser

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "fastapi_app"
CLIENT = ROOT / "clients" / "python"
API_TOKEN = "example-api-token-0123456789"
STEPS = ["research", "outline", "draft", "review"]
PIP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def example_python(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh venv with fastapi, uvicorn and ./clients/python: its Python."""
    require_registry("FastAPI and uvicorn")
    venv = tmp_path_factory.mktemp("fastapi-example") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    requirements = EXAMPLE / "requirements.txt"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(requirements), str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        env=_without_pythonpath(),
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def _without_pythonpath(**extra: str) -> dict[str, str]:
    env = clean_env(**extra)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def example_port() -> int:
    """The example's port, known before Flushline starts (its origin may read streams)."""
    return free_port()


@pytest.fixture
async def flushline(tmp_path: pathlib.Path, example_port: int) -> AsyncIterator[str]:
    """``flushline serve`` with auth on (an API token), on a free loopback port, letting the
    example's page (its origin) read streams."""
    script = require_flushline_script()
    port = free_port()
    env = clean_env(
        FLUSHLINE_HOST="127.0.0.1",
        FLUSHLINE_PORT=str(port),
        FLUSHLINE_API_TOKEN=API_TOKEN,
        FLUSHLINE_CORS_ORIGINS=f"http://127.0.0.1:{example_port}",
    )
    log = tmp_path / "flushline.log"
    async with server_process([script, "serve"], env, log) as process:
        await wait_accepting(process, port)
        yield f"http://127.0.0.1:{port}"
        assert process.returncode is None, read_log(log)[-2000:]


@pytest.fixture
async def example(
    example_python: pathlib.Path, flushline: str, example_port: int, tmp_path: pathlib.Path
) -> AsyncIterator[str]:
    """The example under uvicorn, from its folder, in its venv; its base URL."""
    port = example_port
    env = _without_pythonpath(
        FLUSHLINE_URL=flushline, FLUSHLINE_API_TOKEN=API_TOKEN, AGENT_STEP_SECONDS="1.0"
    )
    argv = [str(example_python), "-m", "uvicorn", "app.main:app", "--port", str(port)]
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=EXAMPLE, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        await wait_accepting(process, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def start_report(session: aiohttp.ClientSession, example: str) -> dict[str, Any]:
    """``POST /api/reports`` on the example: its 201 body."""
    async with session.post(f"{example}/api/reports", json={"topic": "heat pumps"}) as response:
        assert response.status == 201, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def agent_state(session: aiohttp.ClientSession, example: str, job_id: str) -> str:
    """What the example says its agent for ``job_id`` is doing."""
    async with session.get(f"{example}/api/reports/{job_id}") as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["agent"])


async def settled_state(
    session: aiohttp.ClientSession, example: str, job_id: str, within_s: float = 5.0
) -> str:
    """The agent's state once it is no longer running (it must stop within ``within_s``)."""
    deadline = time.monotonic() + within_s
    while (state := await agent_state(session, example, job_id)) == "running":
        assert time.monotonic() < deadline, "the agent kept running"
        await asyncio.sleep(0.05)
    return state


class TestFastAPIExample:
    """The example app: its own venv, its own `app`, its agent's progress through Flushline."""

    def test_the_venv_holds_the_example_and_the_client_not_the_service(
        self, example_python: pathlib.Path
    ) -> None:
        """In the example's venv, `import app` is the example's package, flushline_client is
        installed, and the Flushline service is not."""
        probe = (
            "import importlib.metadata as m, importlib.util as u, json, app, flushline_client;"
            "print(app.__file__); print(flushline_client.__file__);"
            "print(u.find_spec('app.web')); print(json.dumps([d.metadata['Name'] for d in"
            " m.distributions()]))"
        )
        out = subprocess.run(
            [str(example_python), "-c", probe],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            check=True,
            env=_without_pythonpath(),
        ).stdout.splitlines()
        assert pathlib.Path(out[0]) == EXAMPLE / "app" / "__init__.py"
        assert "site-packages" in out[1]
        assert out[2] == "None"
        names = {name.lower() for name in json.loads(out[3])}
        assert {"fastapi", "uvicorn", "flushline-client"} <= names
        assert "flushline" not in names

    async def test_a_report_streams_its_agents_progress_through_flushline(
        self, example: str, flushline: str
    ) -> None:
        """POST /api/reports: the job's links.stream (with its stream token) carries the
        agent's four steps, rising progress, its text and its result; the page is served."""
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{example}/") as response:
                assert response.status == 200
                assert "EventSource" in await response.text()
            report = await start_report(session, example)
            assert report["steps"] == STEPS
            stream = report["stream"]
            assert stream.startswith(f"{flushline}/api/jobs/{report['job_id']}/stream?")
            started = time.monotonic()
            events: list[JobEvent] = []
            async with asyncio.timeout(60):
                async for event in watch_job(stream):
                    events.append(event)
            took_s = time.monotonic() - started
            assert await settled_state(session, example, report["job_id"]) == "succeeded"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [e.data["step"] for e in events if e.type == "step_started"] == STEPS
        overall = [e.data["overall_pct"] for e in events if e.type == "step_progress"]
        assert overall == sorted(overall)
        assert len({round(p) for p in overall if 0 < p < 100}) >= 8, overall
        done = events[-1].data
        assert done["status"] == "succeeded"
        assert list(done["result"]["sections"]) == STEPS
        text = "".join(e.data["text"] for e in events if e.type == "chunk")
        assert text == "".join(done["result"]["sections"].values())
        # Four steps of 1 s each, live: neither instant nor stuck.
        assert 3.0 < took_s < 30, took_s

    async def test_a_cancel_stops_the_agent(self, example: str, flushline: str) -> None:
        """A cancel through Flushline's API mid-job: the example's agent stops (its state says
        cancelled) within two seconds; the stream ends cancelled."""
        async with aiohttp.ClientSession() as session:
            report = await start_report(session, example)
            job_id = report["job_id"]
            async with asyncio.timeout(30):
                async for event in watch_job(report["stream"]):
                    if event.type == "step_started" and event.data["step"] == "outline":
                        break
            await cancel_job(flushline, job_id, token=API_TOKEN)
            state = await settled_state(session, example, job_id, within_s=2.0)
            events = [e async for e in watch_job(report["stream"])]
        assert state == "cancelled"
        assert events[-1].data["status"] == "cancelled"
        assert "review" not in [e.data.get("step") for e in events if e.type == "step_started"]

    async def test_its_page_shows_the_progress_and_the_report(
        self, example: str, browser: Browser
    ) -> None:
        """The example's own page in Chromium: the button starts a report, the bar takes
        rising values from Flushline's stream (another origin), then 100 and the text."""
        context = await browser.new_context()
        page = await context.new_page()
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{example}/")
        await page.click("button")
        values: list[float] = []
        deadline = time.monotonic() + 30
        while (await page.text_content("#insight")) != "Job succeeded.":
            assert time.monotonic() < deadline, (values, await page.text_content("#insight"))
            values.append(await page.evaluate("() => document.getElementById('progress').value"))
            await asyncio.sleep(0.1)
        values.append(await page.evaluate("() => document.getElementById('progress').value"))
        text = await page.text_content("#text")
        await context.close()
        assert values == sorted(values), values
        assert values[-1] == 100
        assert len({v for v in values if 0 < v < 100}) >= 5, values
        assert text is not None
        assert text.startswith("research of heat pumps, part 1. ")
        assert text.endswith("review of heat pumps, part 8. ")
        assert errors == []
