"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from app.bus import EventBus
from app.core.settings import Settings
from app.jobs.manager import JobManager
from app.jobs.store import JobSnapshot

if TYPE_CHECKING:
    from app.web.auth import Authenticator
    from app.web.metrics import Metrics
    from app.web.server import ConnectionTracker

__all__ = [
    "AUTH",
    "BUS",
    "CONNECTIONS",
    "JOB",
    "MANAGER",
    "METRICS",
    "OWNER",
    "SETTINGS",
    "STREAM_BYTES",
]

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
MANAGER = web.AppKey("manager", JobManager)
#: API and stream tokens (``app.web.auth``).
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
#: With auth on: the fingerprint of the API token a request came with (set by the auth
#: middleware on bearer-authenticated job API requests; absent otherwise).
OWNER = web.RequestKey("owner", str)
#: The job of a ``{job_id}`` route as the auth middleware read it to check its owner
#: (see ``app.web.auth.requested_job``: the handler does not read it again).
JOB = web.RequestKey("job", JobSnapshot)
#: The Prometheus registry and metrics (``app.web.metrics``).
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
#: Open connections of the server running the app (``app.web.server``); absent when the
#: app runs under another server (e.g. a test client).
CONNECTIONS: web.AppKey[ConnectionTracker] = web.AppKey("connections")
#: Bytes a stream wrote, for the request log line (aiohttp counts only completed bodies).
STREAM_BYTES = web.ResponseKey("stream_bytes", int)
