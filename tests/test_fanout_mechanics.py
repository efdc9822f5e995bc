"""The fan-out's mechanisms (not its speed): what one publish costs per subscriber.

Timing figures live in ``bench/fanout.py``; these tests guard the mechanisms that make
them: a publish to many parked streams creates no timer, task or future per stream, and
a subscriber with several events pending gets them all in one batch (one write).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import selectors
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from app.bus import MemoryEventBus
from app.bus.local import LocalCursor
from app.core.events import EncodedEvent, InsightEvent
from app.core.tasks import cancel_and_wait
from tests.conftest import MakeClient
from tests.support.jobs import Client, ScriptedPipeline, bus_of, create_job, wait_until

#: One token, a minute in: the job publishes its start and then nothing while we measure.
QUIET = ScriptedPipeline(((60.0, "late"),), name="quiet")
QUIET_ENV = {"FLUSHLINE_STRATEGY": "none", "FLUSHLINE_PROGRESS_INTERVAL": "3600"}
#: The loop methods that make a timer, a future or a task.
COUNTED = ("call_at", "call_later", "create_future", "create_task")


@contextlib.contextmanager
def counting_loop_calls(skip: asyncio.Task[Any] | None) -> Iterator[collections.Counter[str]]:
    """Count calls of :data:`COUNTED` on the running loop, except those made by ``skip``."""
    loop = asyncio.get_running_loop()
    counts: collections.Counter[str] = collections.Counter()

    def wrap(name: str) -> Callable[..., Any]:
        original = getattr(loop, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if skip is None or asyncio.current_task(loop) is not skip:
                counts[name] += 1
            return original(*args, **kwargs)

        return counted

    for name in COUNTED:
        setattr(loop, name, wrap(name))
    try:
        yield counts
    finally:
        for name in COUNTED:
            delattr(loop, name)  # the instance attribute goes; the class's method is back


class _Readers:
    """Raw stream sockets read in a thread of their own, so the loop only runs the server."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.received: dict[int, bytearray] = {s.fileno(): bytearray() for s in sockets}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for each in self.sockets:
                selector.register(each, selectors.EVENT_READ, each)
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    sock: socket.socket = key.data
                    with contextlib.suppress(BlockingIOError):
                        data = sock.recv(65536)
                        self.received[sock.fileno()] += data
                        if not data:
                            selector.unregister(sock)

    def all_have(self, marker: bytes) -> bool:
        """Whether every stream has received ``marker``."""
        return all(marker in bytes(buf) for buf in list(self.received.values()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


async def _open_streams(client: Client, job_id: str, count: int) -> _Readers:
    """``count`` raw HTTP/1.1 stream requests, each parked once it has had the history."""
    assert client.port is not None
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((client.host, client.port))
        sock.sendall(
            f"GET /api/jobs/{job_id}/stream HTTP/1.1\r\nHost: {client.host}\r\n\r\n".encode()
        )
        sock.setblocking(False)
        sockets.append(sock)
    readers = _Readers(sockets)
    bus = bus_of(client)
    await wait_until(lambda: bus.subscriber_count(job_id) == count, 10, "every stream to join")
    await wait_until(lambda: readers.all_have(b"Following the script"), 10, "the history")
    await asyncio.sleep(0.2)  # every stream task writes its history, then parks
    return readers


async def _publish_cost(make_client: MakeClient, streams: int) -> collections.Counter[str]:
    """Timers, futures and tasks made while one event reaches ``streams`` parked streams."""
    client = await make_client(QUIET_ENV, pipelines=(QUIET,))
    job = await create_job(client, pipeline="quiet")
    readers = await _open_streams(client, job["id"], streams)
    try:
        marker = b"marker-of-the-measured-publish"
        with counting_loop_calls(skip=asyncio.current_task()) as counts:
            await bus_of(client).publish(job["id"], InsightEvent(marker.decode()))
            await wait_until(lambda: readers.all_have(marker), 10, "every stream to get it")
            await asyncio.sleep(0.2)  # the stream tasks finish their turn and wait again
        return counts
    finally:
        readers.close()


class TestPublishCostPerSubscriber:
    """One publish to N parked streams costs no timer, future or task per stream."""

    async def test_timers_futures_and_tasks_do_not_grow_with_the_streams(
        self, make_client: MakeClient
    ) -> None:
        """A publish to 100 streams makes (about) as many as one to a single stream."""
        one = await _publish_cost(make_client, 1)
        many = await _publish_cost(make_client, 100)
        grown = {name: many[name] - one[name] for name in COUNTED}
        # One per stream would add 99 of a kind; a few from elsewhere (the server's own
        # housekeeping landing in the window) are allowed.
        assert all(extra < 20 for extra in grown.values()), (
            f"per-stream growth {grown}; with 1 stream {dict(one)}, with 100 {dict(many)}"
        )


class TestCoalescing:
    """A subscriber that is behind gets everything pending in one batch (one write)."""

    async def test_pending_events_come_in_one_batch(self) -> None:
        """Five events published while the reader was busy come back from one next_batch."""
        bus = MemoryEventBus()
        await bus.open("job")
        async with bus.subscribe("job") as subscription:
            for i in range(5):
                await bus.publish("job", InsightEvent(f"event {i}"))
            batch = await subscription.next_batch(None)
        assert [event.seq for event in batch.events] == [1, 2, 3, 4, 5]

    async def test_a_woken_reader_gets_what_came_meanwhile_in_one_batch(self) -> None:
        """A reader parked in next_batch, woken by the first of five events, reads all five."""
        bus = MemoryEventBus()
        await bus.open("job")
        async with bus.subscribe("job") as subscription:
            reader = asyncio.create_task(subscription.next_batch(None))
            await asyncio.sleep(0)  # the reader parks
            for i in range(5):
                await bus.publish("job", InsightEvent(f"event {i}"))
            batch = await asyncio.wait_for(reader, 5)
        assert [event.seq for event in batch.events] == [1, 2, 3, 4, 5]


class TestLagCheckCost:
    """The queue-limit check of a publish costs the readers that can fall behind only."""

    async def test_parked_readers_are_not_checked_and_laggards_still_cut(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """200 parked readers, 1 that never reads: each publish checks 1; it is cut at 6."""
        checked: collections.Counter[int] = collections.Counter()
        pending = LocalCursor.pending

        def counted(self: LocalCursor, newest_seq: int) -> int:
            checked[newest_seq] += 1
            return pending(self, newest_seq)

        monkeypatch.setattr(LocalCursor, "pending", counted)
        bus = MemoryEventBus(queue_limit=5)
        await bus.open("job")
        pushed: collections.Counter[int] = collections.Counter()

        def push(frames: bytes, events: Sequence[EncodedEvent]) -> bool:
            pushed[events[-1].seq] += 1
            return True

        async with contextlib.AsyncExitStack() as stack:
            parked = [await stack.enter_async_context(bus.subscribe("job")) for _ in range(200)]
            idle = await stack.enter_async_context(bus.subscribe("job"))
            waits = [asyncio.create_task(s.next_batch(None, push=push)) for s in parked]
            await asyncio.sleep(0)  # every reader parks
            for i in range(6):
                await bus.publish("job", InsightEvent(f"event {i}"))
            assert all(pushed[seq] == 200 for seq in range(1, 7)), pushed
            assert all(checked[seq] == 1 for seq in range(1, 7)), checked
            assert idle.cut
            assert not any(s.cut for s in parked)
            for wait in waits:
                await cancel_and_wait(wait)
