"""The fan-out anchor: a plain aiohttp + aiohttp-sse server broadcasting a demo job.

Run by ``bench.fanout`` as its own process (``python -m bench.anchor --port P``), with
the same environment as the Flushline servers it is compared with. It is what one
writes without Flushline: ``POST /api/jobs`` starts a job, which Flushline's own runner
drives (the demo pipeline, the strategy's cadence from the same ``FLUSHLINE_*`` tuning),
so every event has the same type, size and ``ts`` as Flushline's job of the scenario;
each event goes into every subscriber's ``asyncio.Queue`` at the same instant (a
broadcast), and each ``GET /api/jobs/{id}/stream`` handler takes its queue's events and
``send``s them through ``aiohttp_sse.EventSourceResponse`` (``sep="\\n"``, the frame
Flushline writes; its own ping task every 15 s, the same heartbeat interval). No
history: a stream gets the events published after it joined. No padding, whatever the
job's strategy. The ``web.run_app`` options of ``flushline serve`` (backlog 1024, no access
log, ``handler_cancellation``).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import attrs
import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from app.core.events import AnyEvent, encode_event
from app.core.settings import Settings
from app.core.tasks import cancel_and_wait
from bench.demo import start_demo_job

__all__ = ["AnchorJob", "make_app"]

#: One queued event: seq, type, JSON data.
Item = tuple[int, str, str]


@attrs.define(eq=False)
class AnchorJob:
    """One job's live subscribers (a queue each) and its runner task."""

    id: str
    subscribers: set[asyncio.Queue[Item]] = attrs.Factory(set)
    seq: int = 0
    ended: bool = False
    task: asyncio.Task[Any] | None = None

    async def publish(self, event: AnyEvent) -> None:
        """Stamp the event as Flushline's bus does and put it on every queue."""
        self.seq += 1
        item = (self.seq, event.type, encode_event(self.id, self.seq, event).payload.decode())
        for queue in self.subscribers:
            queue.put_nowait(item)
        if event.type == "done":
            self.ended = True


JOBS = web.AppKey("jobs", dict[str, AnchorJob])
SETTINGS = web.AppKey("settings", Settings)


async def create_job(request: web.Request) -> web.Response:
    """``POST /api/jobs``: start a demo job now; its stream link in the answer."""
    job = AnchorJob(uuid.uuid4().hex)
    job.task = start_demo_job(await request.json(), request.app[SETTINGS], job.publish)
    request.app[JOBS][job.id] = job
    stream = f"/api/jobs/{job.id}/stream"
    return web.json_response({"id": job.id, "links": {"stream": stream}}, status=201)


async def stream_job(request: web.Request) -> web.StreamResponse:
    """``GET /api/jobs/{id}/stream``: the job's events from now on, through aiohttp-sse."""
    job = request.app[JOBS].get(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound()
    if job.ended:
        return web.Response(status=204)
    queue: asyncio.Queue[Item] = asyncio.Queue()
    job.subscribers.add(queue)
    try:
        response = EventSourceResponse(sep="\n")
        await response.prepare(request)
        async with response:
            while True:
                seq, type_, data = await queue.get()
                await response.send(data, id=str(seq), event=type_)
                if type_ == "done":
                    break
        return response
    finally:
        job.subscribers.discard(queue)


async def _stop_jobs(app: web.Application) -> None:
    for job in app[JOBS].values():
        if job.task is not None:
            await cancel_and_wait(job.task)


def make_app(settings: Settings) -> web.Application:
    """The anchor's application."""
    app = web.Application()
    app[JOBS] = {}
    app[SETTINGS] = settings
    app.router.add_post("/api/jobs", create_job)
    app.router.add_get("/api/jobs/{job_id}/stream", stream_job)
    app.router.add_get("/healthz", lambda _: _healthz())
    app.on_shutdown.append(_stop_jobs)
    return app


async def _healthz() -> web.Response:
    return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")


def main() -> None:
    """``python -m bench.anchor --port P``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(Settings.from_environ()),
        host="127.0.0.1",
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        # Flushline's listen backlog: aiohttp's default (128) drops the SYNs of thousands
        # of streams opened at once, and the comparison would be of backlogs.
        backlog=1024,
        print=None,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
