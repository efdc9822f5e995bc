"""Your backend, your agent, Flushline's delivery: a FastAPI app publishing to Flushline.

``POST /api/reports`` creates an external Flushline job (with the API token: the browser
never sees it), starts the agent in a worker thread that publishes through a
``SyncPublisher``, and answers the job's ``links.stream`` (carrying the job's stream token
when auth is on) for the page to watch. ``GET /`` is that page.

Run it (from this folder, with a Flushline service at FLUSHLINE_URL)::

    FLUSHLINE_URL=http://127.0.0.1:8080 uvicorn app.main:app --port 8000

Settings, from the environment: ``FLUSHLINE_URL`` (default http://127.0.0.1:8080),
``FLUSHLINE_PUBLIC_URL`` (where browsers reach it, when that differs), ``FLUSHLINE_API_TOKEN``
(when the service has auth on), ``AGENT_STEP_SECONDS`` (2). The
page reads the stream from Flushline's origin: start Flushline with
``FLUSHLINE_CORS_ORIGINS=http://127.0.0.1:8000`` (this app's origin).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any
from urllib.parse import urljoin

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from flushline_client import ExternalJob, JobFinished, SyncPublisher, create_external_job
from pydantic import BaseModel

from app.agent import STEPS, write_report

FLUSHLINE_URL = os.environ.get("FLUSHLINE_URL", "http://127.0.0.1:8080").rstrip("/")
#: Where browsers reach the same service, when it differs (a private address behind a proxy).
FLUSHLINE_PUBLIC_URL = os.environ.get("FLUSHLINE_PUBLIC_URL", FLUSHLINE_URL).rstrip("/")
FLUSHLINE_API_TOKEN = os.environ.get("FLUSHLINE_API_TOKEN") or None
STEP_SECONDS = float(os.environ.get("AGENT_STEP_SECONDS", "2"))

log = logging.getLogger("report-writer")
app = FastAPI(title="Report writer (a Flushline example)")

#: What each agent is doing: running, succeeded, cancelled or failed (by job id).
_agents: dict[str, str] = {}
_agents_lock = threading.Lock()


class ReportRequest(BaseModel):
    """What to write about."""

    topic: str = "heat pumps"


def _set_state(job_id: str, state: str) -> None:
    with _agents_lock:
        _agents[job_id] = state


def run_agent(job: ExternalJob, topic: str) -> None:
    """The worker thread: the agent, publishing through a SyncPublisher; stops on a cancel."""
    try:
        with SyncPublisher(FLUSHLINE_URL, job.id, job.publish_token) as pub:
            report = write_report(pub, topic, STEP_SECONDS)
        _set_state(job.id, "cancelled" if report.get("cancelled") else "succeeded")
    except JobFinished as ended:  # JobCancelled included: the job ended under the agent
        log.info("job %s ended (%s): the agent stops", job.id, ended.job_status)
        _set_state(job.id, ended.job_status or "finished")
    except Exception:
        # The SyncPublisher has published `failed` with the error's text already.
        log.exception("the agent of job %s failed", job.id)
        _set_state(job.id, "failed")


@app.post("/api/reports", status_code=201)
async def start_report(request: ReportRequest) -> dict[str, Any]:
    """Create the Flushline job, start the agent, answer what the page needs to watch it."""
    steps = [{"name": name, "expected_tokens": tokens} for name, tokens in STEPS]
    job = await create_external_job(FLUSHLINE_URL, steps, token=FLUSHLINE_API_TOKEN)
    _set_state(job.id, "running")
    threading.Thread(target=run_agent, args=(job, request.topic), daemon=True).start()
    stream = urljoin(FLUSHLINE_PUBLIC_URL + "/", job.links["stream"])
    return {"job_id": job.id, "stream": stream, "steps": [name for name, _ in STEPS]}


@app.get("/api/reports/{job_id}")
async def report_state(job_id: str) -> dict[str, str]:
    """What this backend's agent for ``job_id`` is doing (Flushline has the progress)."""
    with _agents_lock:
        state = _agents.get(job_id)
    if state is None:
        raise HTTPException(404, f"no report {job_id}")
    return {"job_id": job_id, "agent": state}


PAGE = """<!doctype html>
<html lang="en"><meta charset="utf-8"><title>Report writer</title><link rel="icon" href="data:,">
<body>
<h1>Report writer</h1>
<form id="start"><input id="topic" value="heat pumps" aria-label="Topic">
<button>Write the report</button></form>
<progress id="progress" max="100" value="0"></progress> <span id="pct">0%</span>
<p id="insight"></p><pre id="text"></pre>
<script type="module">
const $ = (id) => document.getElementById(id);
$("start").onsubmit = async (event) => {
  event.preventDefault();
  const answer = await fetch("api/reports", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({topic: $("topic").value}),
  });
  const {stream} = await answer.json();
  const source = new EventSource(stream);  // Flushline's stream, resumable, proxy-proof
  const show = (pct) => { $("progress").value = pct; $("pct").textContent = `${pct}%`; };
  for (const type of ["step_progress", "step_completed"]) {
    source.addEventListener(type, (e) => show(JSON.parse(e.data).overall_pct));
  }
  const text = (e) => JSON.parse(e.data).text;
  source.addEventListener("insight", (e) => { $("insight").textContent = text(e); });
  source.addEventListener("chunk", (e) => { $("text").textContent += text(e); });
  source.addEventListener("done", (e) => {
    const done = JSON.parse(e.data);
    $("insight").textContent = `Job ${done.status}.`;
    if (done.status === "succeeded") show(100);
    source.close();
  });
};
</script>
</body></html>
"""


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    """The page: start a report, watch its progress straight from Flushline."""
    return PAGE
