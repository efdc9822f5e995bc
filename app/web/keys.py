"""The typed ``web.AppKey``s whose values are of a lower floor (core, bus, jobs).

A key whose value is a type of ``app.web`` lives beside that type instead
(``app.web.auth.AUTH``, ``app.web.metrics.METRICS``, ``app.web.server.CONNECTIONS``), so
this module imports nothing from ``app.web`` and no import circle runs through it.
"""

from __future__ import annotations

from aiohttp import web

from app.bus import EventBus
from app.core.settings import Settings
from app.jobs.manager import JobManager
from app.jobs.store import JobSnapshot

__all__ = [
    "BUS",
    "JOB",
    "MANAGER",
    "OWNER",
    "SETTINGS",
    "STREAM_BYTES",
]

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
MANAGER = web.AppKey("manager", JobManager)
#: With auth on: the fingerprint of the API token a request came with (set by the auth
#: middleware on bearer-authenticated job API requests; absent otherwise).
OWNER = web.RequestKey("owner", str)
#: The job of a ``{job_id}`` route as the auth middleware read it to check its owner
#: (see ``app.web.auth.requested_job``: the handler does not read it again).
JOB = web.RequestKey("job", JobSnapshot)
#: Bytes a stream wrote, for the request log line (aiohttp counts only completed bodies).
STREAM_BYTES = web.ResponseKey("stream_bytes", int)
