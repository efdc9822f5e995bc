"""Cross-origin access: which browser pages may call the API and open streams.

``FLUSHLINE_CORS_ORIGINS`` lists the origins allowed (or ``*``); unset, only the
service's own pages may. For an allowed origin, preflights are answered and every
response (streams included, through ``on_response_prepare``) carries the CORS headers;
an explicit origin may send credentials (``EventSource(url, {withCredentials: true})``).
Any other origin gets no CORS header, so its page cannot read a response.

That alone does not stop a cross-site ``text/plain`` form POST, which a browser sends
without asking: a state-changing request whose ``Origin`` is neither the service's own
nor allowed is refused with ``403`` before it reaches a handler.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from app.core.errors import OriginNotAllowed

__all__ = ["CorsPolicy"]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ALLOW_METHODS = "GET, POST, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Request-ID"
#: Content-Encoding lets a cross-origin flushline.js see that its path compresses the stream.
_EXPOSE_HEADERS = "Content-Encoding, Location, Retry-After, X-Request-ID"
_PREFLIGHT_MAX_AGE_S = 600


@attrs.frozen
class CorsPolicy:
    """The allowed origins (lower case; ``("*",)`` for any) and the checks built on them."""

    origins: tuple[str, ...] = ()

    @property
    def any_origin(self) -> bool:
        """Whether every origin is allowed (``FLUSHLINE_CORS_ORIGINS=*``)."""
        return self.origins == ("*",)

    def allows(self, origin: str) -> bool:
        """Whether a page from ``origin`` may read the API's responses."""
        return self.any_origin or origin.lower() in self.origins

    def install(self, app: web.Application) -> None:
        """Add the middleware (inside the JSON errors one) and the response hook to ``app``."""
        app.middlewares.append(self.middleware)
        app.on_response_prepare.append(self.add_headers)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer preflights; refuse state-changing requests from origins not allowed."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or _same_origin(origin, request):
            return await handler(request)
        preflight = request.method == "OPTIONS" and (
            hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )
        if not self.allows(origin):
            if preflight or request.method not in _SAFE_METHODS:
                raise OriginNotAllowed(origin)
            return await handler(request)  # readable by nobody: it gets no CORS header
        if preflight:
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: _ALLOW_METHODS,
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: _ALLOW_HEADERS,
                    hdrs.ACCESS_CONTROL_MAX_AGE: str(_PREFLIGHT_MAX_AGE_S),
                },
            )
        return await handler(request)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: the CORS headers of an allowed origin, before any byte."""
        if not self.origins:
            return
        headers = response.headers
        headers.add(hdrs.VARY, "Origin")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.allows(origin) or _same_origin(origin, request):
            return
        if self.any_origin:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
        else:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSE_HEADERS


def _same_origin(origin: str, request: web.Request) -> bool:
    """Whether ``origin`` is the service's own page.

    The browser says so itself with ``Sec-Fetch-Site: same-origin`` (on https and
    localhost; a page cannot set it). Otherwise the origin's host and port are compared
    with the host the page talked to: the first ``X-Forwarded-Host`` that a reverse proxy
    in front of us set, else ``Host``. (A cross-site page cannot add ``X-Forwarded-Host``
    either: a custom header needs a preflight, which an origin not allowed never passes.)
    Only host and port count: behind a TLS-terminating proxy the scheme the page saw
    (https) is not the one this process sees (http).
    """
    if request.headers.get("Sec-Fetch-Site") == "same-origin":
        return True
    netloc = urlsplit(origin).netloc.lower()
    forwarded = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip().lower()
    return netloc in (forwarded, request.host.lower()) and bool(netloc)
