"""The shared Redis client: a cancel that lands anywhere in a command is never lost.

redis-py sends under ``asyncio.wait_for``; on Python 3.11 a cancel landing in the loop
step where the send finished was swallowed (the command's reply came back instead), and
a job cancelled there ran on to ``succeeded``. Each test sweeps the cancel over every
loop step of a command on a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from app.bus.redis_client import connect_redis
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

#: Loop steps to sweep: past the last, every command has finished before its cancel.
STEPS = 40


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = connect_redis(redis_server.url)
    await redis.ping()
    yield redis
    await redis.aclose()


async def _sweep(command: Callable[[], Awaitable[Any]]) -> list[int]:
    """The loop steps at which a cancel was requested and the command still returned."""
    lost: list[int] = []
    for step in range(STEPS):
        task = asyncio.create_task(command())
        for _ in range(step):
            await asyncio.sleep(0)
        requested = task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            continue
        if requested:
            lost.append(step)
    return lost


async def test_a_cancel_during_a_command_always_cancels(client: Redis) -> None:
    """PING, SET and XADD cancelled at every loop step: each cancel raises in the caller."""
    assert await _sweep(client.ping) == []
    assert await _sweep(lambda: client.set("cancel-sweep:key", b"v")) == []
    assert await _sweep(lambda: client.xadd("cancel-sweep:stream", {b"f": b"v"})) == []


async def test_a_cancel_during_a_pipeline_always_cancels(client: Redis) -> None:
    """A pipeline cancelled at every loop step of its execute: each cancel raises."""

    async def pipelined() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr("cancel-sweep:counter")
            pipe.get("cancel-sweep:counter")
            return list(await pipe.execute())

    assert await _sweep(pipelined) == []


async def test_no_reply_is_left_for_the_next_command(client: Redis) -> None:
    """After the sweeps, each command on the pool still reads its own reply."""
    assert await _sweep(lambda: client.get("cancel-sweep:missing")) == []
    for index in range(50):
        await client.set(f"cancel-sweep:{index}", str(index))
    values = await asyncio.gather(*(client.get(f"cancel-sweep:{i}") for i in range(50)))
    assert values == [str(i).encode() for i in range(50)]
