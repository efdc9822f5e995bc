"""The fan-out floor: the least an asyncio server can do to broadcast a demo job over SSE.

Run by ``bench.fanout`` as its own process (``python -m bench.floor --port P``), with the
same environment as the servers it is compared with. No web framework: a bare
``asyncio.Protocol`` that reads a request head (and a ``POST``'s body), answers
``POST /api/jobs`` by starting a job that Flushline's own runner drives (the demo
pipeline, the strategy's cadence, as the anchor does), answers ``GET
/api/jobs/{id}/stream`` with the SSE headers at once, and writes each event's frame, the
same bytes Flushline writes, chunk-encoded once, to every open stream's transport with
``transport.write``. No history, heartbeats, padding, timeouts, back-pressure or logging:
what it measures is the machine and the load generator (accepting, one ``send`` per
stream per event, loopback), the floor under any real server's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import uuid
from typing import Any

import attrs
import orjson

from app.core.events import AnyEvent, encode_event
from app.core.settings import Settings
from app.core.tasks import cancel_and_wait
from bench.demo import start_demo_job

__all__ = ["FloorJob", "FloorServer", "main"]

#: Flushline's listen backlog, as for the anchor.
BACKLOG = 1024
#: A request head larger than this closes the connection.
MAX_HEAD_BYTES = 8192
_STREAM_PATH = re.compile(rb"^/api/jobs/([0-9a-f]+)/stream(?:\?.*)?$")
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"


def _answer(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


@attrs.define(eq=False)
class FloorJob:
    """One job's open streams and its runner task."""

    id: str
    streams: set[asyncio.Transport] = attrs.Factory(set)
    seq: int = 0
    ended: bool = False
    task: asyncio.Task[Any] | None = None

    async def publish(self, event: AnyEvent) -> None:
        """Stamp the event as Flushline's bus does; write its chunk to every stream."""
        self.seq += 1
        frame = encode_event(self.id, self.seq, event).frame
        chunk = b"%x\r\n%b\r\n" % (len(frame), frame)
        if event.type == "done":
            self.ended = True
            chunk += _LAST_CHUNK
        for transport in self.streams:
            transport.write(chunk)
        if self.ended:
            for transport in self.streams:
                transport.close()
            self.streams.clear()


@attrs.define(eq=False)
class FloorServer:
    """The jobs and the settings every connection of the server shares."""

    settings: Settings
    jobs: dict[str, FloorJob] = attrs.Factory(dict)

    def create_job(self, body: bytes) -> bytes:
        """``POST /api/jobs``: start a demo job now; its stream link in the answer."""
        job = FloorJob(uuid.uuid4().hex)
        job.task = start_demo_job(orjson.loads(body or b"{}"), self.settings, job.publish)
        self.jobs[job.id] = job
        answer = {"id": job.id, "links": {"stream": f"/api/jobs/{job.id}/stream"}}
        return _answer("201 Created", orjson.dumps(answer))


class FloorProtocol(asyncio.Protocol):
    """One connection: request heads in, answers (or a stream's chunks) out."""

    def __init__(self, server: FloorServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.streaming: FloorJob | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.streaming is not None:
            return  # a streaming client has nothing more to say
        self.buffer += data
        while self.transport is not None and self.streaming is None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self.transport.close()
                return
            head = self.buffer[:head_end].split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self._handle(head[0], body)

    def _handle(self, request_line: bytes, body: bytes) -> None:
        assert self.transport is not None
        method, _, rest = request_line.partition(b" ")
        target = rest.rpartition(b" ")[0]
        if method == b"POST" and target == b"/api/jobs":
            self.transport.write(self.server.create_job(body))
            return
        if method == b"GET" and target == b"/healthz":
            self.transport.write(_answer("200 OK", b'{"status":"ok"}'))
            return
        match = _STREAM_PATH.match(target) if method == b"GET" else None
        job = self.server.jobs.get(match.group(1).decode()) if match else None
        if job is None:
            self.transport.write(_answer("404 Not Found", b'{"error":"not found"}'))
        elif job.ended:
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            self.transport.write(_STREAM_HEAD)
            job.streams.add(self.transport)
            self.streaming = job

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None and self.transport is not None:
            self.streaming.streams.discard(self.transport)
        self.transport = None


async def serve(port: int) -> None:
    """Serve on ``127.0.0.1:port`` until cancelled."""
    server = FloorServer(Settings.from_environ())
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: FloorProtocol(server), "127.0.0.1", port, backlog=BACKLOG
    )
    try:
        await asyncio.Event().wait()
    finally:
        listener.close()
        for job in server.jobs.values():
            if job.task is not None:
                await cancel_and_wait(job.task)


def main() -> None:
    """``python -m bench.floor --port P``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
