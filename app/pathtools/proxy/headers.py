"""Header handling of the proxy emulator: hop-by-hop headers and gzip negotiation."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import hdrs
from multidict import CIMultiDict

__all__ = ["accepts_gzip", "request_headers", "response_headers"]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get(hdrs.CONNECTION, "")
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def request_headers(headers: Mapping[str, str], *, strip_accept_encoding: bool) -> CIMultiDict[str]:
    drop = _HOP_BY_HOP | _connection_tokens(headers) | {"host"}
    if strip_accept_encoding:
        drop |= {"accept-encoding"}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def response_headers(headers: Mapping[str, str], *, keep_length: bool) -> CIMultiDict[str]:
    drop = _HOP_BY_HOP | _connection_tokens(headers)
    if not keep_length:
        drop |= {"content-length"}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        key, _, qvalue = params.strip().partition("=")
        try:
            return key.strip().lower() != "q" or float(qvalue) > 0
        except ValueError:
            return False
    return False
