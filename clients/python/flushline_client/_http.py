"""What every request of the client shares: a session, the bearer token, the JSON errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from flushline_client.errors import ClientError, JobCancelled, JobFinished, ProducerSeqGap

__all__ = ["call", "error_from", "session_for", "with_token"]


@contextlib.asynccontextmanager
async def session_for(
    session: aiohttp.ClientSession | None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """``session`` as it is, or a session of its own closed on the way out."""
    if session is not None:
        yield session
        return
    async with aiohttp.ClientSession() as own:
        yield own


def with_token(headers: Mapping[str, str] | None, token: str | None) -> dict[str, str]:
    """``headers`` plus ``Authorization: Bearer`` when a ``token`` is given."""
    merged = dict(headers or {})
    if token is not None:
        merged["Authorization"] = f"Bearer {token}"
    return merged


def error_from(status: int, body: bytes, reason: str | None = None) -> ClientError:
    """The :class:`ClientError` (or the subclass its code names) of an error answer."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace")[:200]
        return ClientError(status, "http_error", text or reason or "")
    field = error.get("field")
    details = {k: v for k, v in error.items() if k not in {"code", "message", "field"}}
    kind: type[ClientError] = ClientError
    if code == "job_finished":
        kind = JobCancelled if details.get("status") == "cancelled" else JobFinished
    elif code == "producer_seq_gap":
        kind = ProducerSeqGap
    return kind(status, code, message, field if isinstance(field, str) else None, details)


async def read_error(response: aiohttp.ClientResponse) -> ClientError:
    """The :class:`ClientError` of an error ``response`` (its body read)."""
    return error_from(response.status, await response.read(), response.reason)


async def call(
    method: str,
    url: str,
    status: int,
    *,
    session: aiohttp.ClientSession | None,
    headers: Mapping[str, str] | None,
    token: str | None,
    body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One API request whose answer is a JSON object with ``status``, else :class:`ClientError`."""
    async with (
        session_for(session) as client,
        client.request(method, url, json=body, headers=with_token(headers, token)) as response,
    ):
        if response.status != status:
            raise await read_error(response)
        answer: dict[str, Any] = await response.json()
        return answer
