"""The API description: ``GET /openapi.json`` (being built for issue 8)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["install_openapi"]


def install_openapi(app: web.Application) -> None:
    """Add the ``/openapi.json`` route to ``app``."""
