"""Prometheus metrics: ``GET /metrics`` (being built for issue 8)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["install_metrics"]


def install_metrics(app: web.Application) -> None:
    """Give ``app`` its metrics registry and the ``/metrics`` route."""
