"""The Redis client the bus, the job store and the job control share (``FLUSHLINE_BUS=redis``).

One pool per process, built by :func:`connect_redis`. Its connections re-raise a
cancellation that Python 3.11 would otherwise lose: redis-py sends each command under
``asyncio.wait_for`` (the socket timeout), and before Python 3.12 ``wait_for`` returns the
result instead of raising when the cancel lands in the loop step where the send finished.
A job cancelled there ran on to ``succeeded``; a reader or watcher cancelled there would
keep a shutdown waiting for ever.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "POOL_WAIT_S",
    "cancel_safe",
    "connect_redis",
    "milliseconds",
]

#: How long opening a connection to Redis may take (start-up's check included).
CONNECT_TIMEOUT_S = 5.0
#: Redis connections one instance opens at most: one per job it reads (a blocking
#: ``XREAD``), plus those of requests in flight. redis-py's default (100, failing at once
#: beyond it) turned a burst of 500 stream connections into 503s.
MAX_CONNECTIONS = 2_000
#: How long a request waits for a free Redis connection before its 503.
POOL_WAIT_S = 5.0


def milliseconds(seconds: float) -> int:
    """A duration as Redis expiries take it (``PX``, ``PEXPIRE``): milliseconds, at least 1."""
    return max(1, round(seconds * 1000))


class _CancelSafeSend:
    """Mixin for a redis-py connection class: a cancel during a send is never lost."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        task = asyncio.current_task()
        requested = 0 if task is None else task.cancelling()
        await super().send_packed_command(command, check_health)  # type: ignore[misc]
        if task is not None and task.cancelling() > requested:
            # The cancel arrived and was swallowed (see the module's docstring). The reply
            # to what was sent is still due: drop the connection, as redis-py does when a
            # cancel interrupts a send, so that no later command reads it.
            await cast(AbstractConnection, self).disconnect(nowait=True)
            raise asyncio.CancelledError


def cancel_safe(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or Unix socket) with the cancel-safe send."""
    if issubclass(connection_class, _CancelSafeSend):
        return connection_class
    name = f"CancelSafe{connection_class.__name__}"
    return cast(type[AbstractConnection], type(name, (_CancelSafeSend, connection_class), {}))


def connect_redis(url: str) -> Redis:
    """A client on a new pool for ``url`` (connections open on first use)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        # Once, at once: a pooled connection Redis closed (it restarted) fails its next
        # command; the retry goes out on a fresh one. A command that did run before its
        # reply was lost is safe to repeat: XADD ids are explicit (RedisEventBus
        # recognises its own entry), the scripts check before they write.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        retry_on_error=[RedisConnectionError],
    )
    # The scheme chose the class (redis://, rediss://, unix://): keep it, add the guard.
    pool.connection_class = cancel_safe(pool.connection_class)
    return Redis.from_pool(pool)
