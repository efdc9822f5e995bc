"""Auth (issue 8, being built): bearer tokens for the API, signed per-job stream tokens."""

from __future__ import annotations

import attrs
from aiohttp import web

__all__ = ["Authenticator", "install_auth"]


@attrs.frozen
class Authenticator:
    """Checks API tokens and signs and verifies stream tokens."""


def install_auth(app: web.Application) -> None:
    """Give ``app`` its authenticator and the middleware that enforces it."""
