"""Watch a job: every event of its stream once, in order, resuming across dropped connections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from flushline_client._http import read_error, session_for, with_token
from flushline_client.errors import StreamLost
from flushline_client.sse import SSEParser

__all__ = ["MAX_ATTEMPTS", "MAX_RETRY_WAIT_S", "READ_TIMEOUT_S", "JobEvent", "watch_job"]

#: Give up after this many reconnects in a row that delivered no new event.
MAX_ATTEMPTS = 10
#: The longest wait between reconnects, whatever the server's ``retry:`` says.
MAX_RETRY_WAIT_S = 30.0
#: A stream silent this long is taken as dropped (the server sends heartbeats every 15 s).
READ_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: its SSE ``event`` name, ``seq`` and JSON data."""

    type: str
    seq: int | None
    data: Mapping[str, Any]


@dataclasses.dataclass
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
    headers = with_token(headers, token)
    resume = _Resume(last_event_id)
    failures = 0
    attempt = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout_s)
    async with session_for(session) as client:
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
            raise await read_error(response)
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
                data = json.loads(message.data)
                seq = data.get("seq")
                if isinstance(seq, int):
                    if resume.last_seq is not None and seq <= resume.last_seq:
                        continue  # already yielded (a server replaying more than asked)
                    resume.last_seq = seq
                yield JobEvent(message.event, seq if isinstance(seq, int) else None, data)
