"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

from aiohttp import web

from app.bus import EventBus
from app.core.settings import Settings
from app.jobs.manager import JobManager

__all__ = ["BUS", "MANAGER", "SETTINGS", "STREAM_BYTES"]

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
MANAGER = web.AppKey("manager", JobManager)
#: Bytes a stream wrote, for the request log line (aiohttp counts only completed bodies).
STREAM_BYTES = web.ResponseKey("stream_bytes", int)
