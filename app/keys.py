"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

from aiohttp import web

from app.bus import EventBus
from app.manager import JobManager
from app.settings import Settings

__all__ = ["BUS", "MANAGER", "SETTINGS"]

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
MANAGER = web.AppKey("manager", JobManager)
