"""The Redis client the bus, the job store and the job control share (``FLUSHLINE_BUS=redis``).

One pool per process, built by :func:`connect_redis`, for short commands only: the bus's
blocking reads each have a connection of their own (:func:`reader_client`), a fixed few
per instance, so the pool's connections are those of the commands in flight, and the
pool counts the commands that had to wait for one (:class:`CountingPool`).

Its connections re-raise a cancellation that Python 3.11 would otherwise lose: redis-py
sends each command under ``asyncio.wait_for`` (the socket timeout), and before Python
3.12 ``wait_for`` returns the result instead of raising when the cancel lands in the loop
step where the send finished. A job cancelled there ran on to ``succeeded``; a reader or
watcher cancelled there would keep a shutdown waiting for ever.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "POOL_CLIENT_NAME",
    "POOL_WAIT_S",
    "READER_CLIENT_NAME",
    "CountingPool",
    "cancel_safe",
    "connect_redis",
    "milliseconds",
    "reader_client",
]

#: How long opening a connection to Redis may take (start-up's check included).
CONNECT_TIMEOUT_S = 5.0
#: Pooled Redis connections one instance opens at most: those of the commands in flight
#: (no command holds one while it waits for events: the readers have their own). A burst
#: of 400 streams on a loaded machine has ~400 commands in flight; ten instances stay
#: within Redis's default ``maxclients`` (10,000).
MAX_CONNECTIONS = 512
#: How long a request waits for a free Redis connection before its 503.
POOL_WAIT_S = 5.0
#: ``CLIENT SETNAME`` of the pool's connections and of the readers' (``CLIENT LIST`` tells
#: them apart).
POOL_CLIENT_NAME = "flushline"
READER_CLIENT_NAME = "flushline-reader"


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


class CountingPool(BlockingConnectionPool):
    """redis-py's blocking pool, counting the commands that found no connection free."""

    #: Commands that had to wait for a connection (each one a sign the pool is too small).
    waits: int = 0
    #: The most connections in use at once.
    peak_in_use: int = 0

    @property
    def opened(self) -> int:
        """The connections the pool holds now (in use or idle)."""
        return len(self._in_use_connections) + len(self._available_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if not self.can_get_connection():
            self.waits += 1
        connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.peak_in_use = max(self.peak_in_use, len(self._in_use_connections))
        return cast(AbstractConnection, connection)


def connect_redis(url: str, *, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client on a new pool for ``url`` (connections open on first use)."""
    pool = CountingPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        client_name=POOL_CLIENT_NAME,
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


def reader_client(redis: Redis, *, read_timeout_s: float) -> Redis:
    """A client with one connection of its own, to the server of ``redis``, for blocking reads.

    Its socket timeout is ``read_timeout_s`` (redis-py applies the socket timeout to the
    reply of ``XREAD BLOCK`` too: a block longer than the URL's timeout, 5 s by default,
    would fail as a lost connection on a healthy Redis). Close it with ``aclose()``.
    """
    shared = redis.connection_pool
    kwargs = {
        **shared.connection_kwargs,
        "socket_timeout": read_timeout_s,
        "client_name": READER_CLIENT_NAME,
        # No silent reconnect inside a read: the reader sees the failure (its connection's
        # id changes, its feeds' subscribers are told) and reads again itself.
        "retry": Retry(NoBackoff(), 0),
    }
    own = ConnectionPool(connection_class=shared.connection_class, max_connections=1, **kwargs)
    return Redis.from_pool(own)
