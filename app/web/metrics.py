"""Prometheus metrics: ``GET /metrics`` (being built for issue 8)."""

from __future__ import annotations

import attrs
from aiohttp import web

__all__ = ["Metrics", "install_metrics"]


@attrs.define
class Metrics:
    """The app's Prometheus registry and the metrics the service updates."""


def install_metrics(app: web.Application) -> None:
    """Give ``app`` its metrics registry and the ``/metrics`` route."""
