"""A Python client for Flushline jobs, over aiohttp: start one, and watch its events.

::

    from app.client import create_job, stream_url, watch_job

    job = await create_job("http://localhost:8080", pipeline="chat", input={"prompt": "Hi"})
    async for event in watch_job(stream_url("http://localhost:8080", job)):
        print(event.seq, event.type, event.data)

``watch_job`` yields every event of the job once, in order, and ends after ``done``. When
the connection drops (a proxy's timeout, a restart, a network blip) it reconnects with
``Last-Event-ID`` set to the last seq it yielded, so nothing is missed or repeated.

With auth on (``FLUSHLINE_API_TOKEN`` set on the service), pass ``token=`` (the API
token) to every call: it goes out as ``Authorization: Bearer``. ``stream_url`` is the
snapshot's ``links.stream``, which then carries the job's signed stream token; a watch
given ``token=`` too keeps working once that stream token has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urljoin

import aiohttp
import attrs
import orjson

from app.core.sse import SSEParser

__all__ = [
    "ClientError",
    "JobEvent",
    "StreamLost",
    "cancel_job",
    "create_job",
    "get_job",
    "stream_url",
    "watch_job",
]

#: Give up after this many reconnects in a row that delivered no new event.
MAX_ATTEMPTS = 10
#: The longest wait between reconnects, whatever the server's ``retry:`` says.
MAX_RETRY_WAIT_S = 30.0
#: A stream silent this long is taken as dropped (the server sends heartbeats every 15 s).
READ_TIMEOUT_S = 60.0


class ClientError(Exception):
    """The service refused a request; carries its JSON error (``code``, ``field``)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class StreamLost(Exception):
    """The stream kept dropping: ``MAX_ATTEMPTS`` reconnects in a row brought nothing new."""


@attrs.frozen
class JobEvent:
    """One event of a job's stream: its SSE ``event`` name, ``seq`` and JSON data."""

    type: str
    seq: int | None
    data: Mapping[str, Any]


async def _error(response: aiohttp.ClientResponse) -> ClientError:
    body = await response.read()
    try:
        error = orjson.loads(body)["error"]
        return ClientError(response.status, error["code"], error["message"], error.get("field"))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body.decode("utf-8", "replace")[:200]
        return ClientError(response.status, "http_error", text or response.reason or "")


@contextlib.asynccontextmanager
async def _session(session: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    if session is not None:
        yield session
        return
    async with aiohttp.ClientSession() as own:
        yield own


def _with_token(headers: Mapping[str, str] | None, token: str | None) -> dict[str, str]:
    """``headers`` plus ``Authorization: Bearer`` when an API ``token`` is given."""
    merged = dict(headers or {})
    if token is not None:
        merged["Authorization"] = f"Bearer {token}"
    return merged


async def _call(
    method: str,
    url: str,
    status: int,
    *,
    session: aiohttp.ClientSession | None,
    headers: Mapping[str, str] | None,
    token: str | None,
    body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One API request whose answer is a snapshot with ``status``, else :class:`ClientError`."""
    async with (
        _session(session) as client,
        client.request(method, url, json=body, headers=_with_token(headers, token)) as response,
    ):
        if response.status != status:
            raise await _error(response)
        snapshot: dict[str, Any] = await response.json()
        return snapshot


async def create_job(
    base_url: str,
    *,
    pipeline: str | None = None,
    input: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    strategy: str | None = None,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``POST {base_url}/api/jobs``; the new job's snapshot, or :class:`ClientError`.

    ``token``: the API token, sent as ``Authorization: Bearer`` (needed when the service
    has auth on).
    """
    body: dict[str, Any] = {}
    for key, value in (
        ("pipeline", pipeline),
        ("input", input),
        ("options", options),
        ("strategy", strategy),
    ):
        if value is not None:
            body[key] = value
    url = base_url.rstrip("/") + "/api/jobs"
    return await _call("POST", url, 201, session=session, headers=headers, token=token, body=body)


async def get_job(
    base_url: str,
    job_id: str,
    *,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``GET {base_url}/api/jobs/{job_id}``: the job's snapshot, or :class:`ClientError`."""
    url = f"{base_url.rstrip('/')}/api/jobs/{job_id}"
    return await _call("GET", url, 200, session=session, headers=headers, token=token)


async def cancel_job(
    base_url: str,
    job_id: str,
    *,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``POST {base_url}/api/jobs/{job_id}/cancel``: the snapshot (``202``), else
    :class:`ClientError` (``409`` once the job has ended)."""
    url = f"{base_url.rstrip('/')}/api/jobs/{job_id}/cancel"
    return await _call("POST", url, 202, session=session, headers=headers, token=token)


def stream_url(base_url: str, snapshot: Mapping[str, Any]) -> str:
    """The absolute stream URL of a job ``snapshot`` from ``base_url``: its ``links.stream``,
    with the stream token the service put in its query when auth is on."""
    return urljoin(base_url.rstrip("/") + "/", str(snapshot["links"]["stream"]))


@attrs.define
class _Resume:
    """Where a watch is: the last seq yielded and the reconnect delay the server asked for."""

    last_seq: int | None
    retry_s: float = 3.0
    #: Connections answered with 200 so far.
    connected: int = 0


async def watch_job(
    url: str,
    *,
    last_event_id: int | None = None,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    heartbeats: bool = False,
    on_connect: Callable[[int, int | None], None] | None = None,
    read_timeout_s: float = READ_TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
    token: str | None = None,
) -> AsyncIterator[JobEvent]:
    """Yield the events of the job streamed at ``url`` until its ``done``, resuming on drops.

    ``last_event_id``: start after that seq (None: the whole history). ``on_connect`` is
    called as each connection is answered, with the attempt number (1 first) and the seq
    it resumes after. 4xx answers raise :class:`ClientError` (a 410: the events after the
    resume point are no longer kept); a first connection that fails raises aiohttp's
    error; :class:`StreamLost` after ``max_attempts`` reconnects in a row bring nothing.

    ``url`` keeps its query on every reconnect (a ``links.stream`` stream token included).
    ``token``: the API token, sent as ``Authorization: Bearer``; with it a watch outlives
    the stream token's expiry (the service accepts either).
    """
    headers = _with_token(headers, token)
    resume = _Resume(last_event_id)
    failures = 0
    attempt = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout_s)
    async with _session(session) as client:
        while True:
            attempt += 1
            before = resume.last_seq
            done = False
            try:
                events = _connect(client, url, resume, headers, timeout, attempt, on_connect)
                async with contextlib.aclosing(events):
                    async for event in events:
                        if event.type == "heartbeat":
                            if heartbeats:
                                yield event
                            continue
                        yield event
                        if event.type == "done":
                            done = True
                            break
            except _Finished:
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                if resume.connected == 0:
                    raise  # never got through: a wrong URL or a service that is down
                # else a drop: resume below
            except _ServerBusy:
                pass  # a restart or an overloaded proxy: try again below
            if done:
                return
            failures = 0 if resume.last_seq != before else failures + 1
            if failures >= max_attempts:
                raise StreamLost(
                    f"{url}: {failures} reconnects in a row brought no new event "
                    f"(last seq {resume.last_seq})"
                )
            await asyncio.sleep(min(resume.retry_s * 2 ** max(failures - 1, 0), MAX_RETRY_WAIT_S))


class _Finished(Exception):
    """204: the job has ended and its last event was already seen."""


class _ServerBusy(Exception):
    """A 5xx answer: worth another try."""


async def _connect(
    client: aiohttp.ClientSession,
    url: str,
    resume: _Resume,
    headers: Mapping[str, str] | None,
    client_timeout: aiohttp.ClientTimeout,
    attempt: int,
    on_connect: Callable[[int, int | None], None] | None,
) -> AsyncGenerator[JobEvent, None]:
    """One connection: yield its events (recording the seq), until it ends or drops."""
    request_headers = {"Accept": "text/event-stream", **(headers or {})}
    if resume.last_seq is not None:
        request_headers["Last-Event-ID"] = str(resume.last_seq)
    async with client.get(url, headers=request_headers, timeout=client_timeout) as response:
        if response.status == 204:
            raise _Finished
        if response.status >= 500:
            raise _ServerBusy
        if response.status != 200:
            raise await _error(response)
        resume.connected += 1
        if on_connect is not None:
            on_connect(attempt, resume.last_seq)
        parser = SSEParser()
        async for chunk in response.content.iter_any():
            for message in parser.feed(chunk):
                if message.retry_ms is not None:
                    resume.retry_s = message.retry_ms / 1000
                if message.data is None:
                    continue
                data = orjson.loads(message.data)
                seq = data.get("seq")
                if isinstance(seq, int):
                    if resume.last_seq is not None and seq <= resume.last_seq:
                        continue  # already yielded (a server replaying more than asked)
                    resume.last_seq = seq
                yield JobEvent(message.event, seq if isinstance(seq, int) else None, data)
