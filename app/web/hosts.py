"""The ``Host`` allow-list: with auth off, a DNS-rebinding page cannot drive the service.

A page on ``evil.example`` whose DNS name is rebound to ``127.0.0.1`` talks to the service
as a same-origin page: its requests carry no foreign ``Origin`` for CORS to refuse, but
they do carry ``Host: evil.example``. With auth off, only requests for the names in
``FLUSHLINE_ALLOWED_HOSTS`` (default ``localhost``, ``127.0.0.1``, ``::1``; ``*`` for any)
are served; the others get ``403 host_not_allowed``. With auth on, the bearer token a
rebinding page cannot know is the guard, and every ``Host`` is served.

``/healthz`` and ``/readyz`` answer whatever the ``Host``: platform probes address the
instance by its IP, and they tell nothing about any job.
"""

from __future__ import annotations

import attrs
from aiohttp import web
from aiohttp.typedefs import Handler

from app.core.settings import Settings
from app.web.middleware import error_response

__all__ = ["HostAllowList"]

#: Paths served whatever the ``Host`` (health probes by IP address).
_ANY_HOST_PATHS = frozenset({"/healthz", "/readyz"})


@attrs.frozen
class HostAllowList:
    """The ``Host`` names served (lower case, no port; ``("*",)`` for any)."""

    hosts: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> HostAllowList | None:
        """The allow-list in force: ``None`` with auth on, or when every host is allowed."""
        if settings.api_tokens or settings.allowed_hosts == ("*",):
            return None
        return cls(settings.allowed_hosts)

    def allows(self, host_header: str) -> bool:
        """Whether a request with this ``Host`` header (port included or not) is served."""
        return _host_name(host_header) in self.hosts

    def install(self, app: web.Application) -> None:
        """Add the check to ``app``'s middlewares (inside the JSON errors one)."""
        app.middlewares.append(self.middleware)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a request whose ``Host`` is not allowed, before any handler runs."""
        host = request.headers.get("Host", "")
        if request.path in _ANY_HOST_PATHS or self.allows(host):
            return await handler(request)
        shown = host if len(host) <= 100 else host[:100] + "..."
        return error_response(
            403,
            "host_not_allowed",
            f"Host {shown!r} is not served: with auth off only FLUSHLINE_ALLOWED_HOSTS "
            f"({', '.join(self.hosts)}) are (set it, or FLUSHLINE_API_TOKEN)",
        )


def _host_name(host_header: str) -> str:
    """``Host`` without its port, lower case: ``[::1]:8080`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.removesuffix(".")
