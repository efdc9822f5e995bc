"""Per-job producer state of external jobs, and the lock that serialises their publishers.

An external job (``"pipeline": "external"``) is fed by a producer over HTTP, through any
instance. What each publish must see and update together lives here, one record per job:
the hash of its publish token, the last ``producer_seq`` accepted, the ``last_event_id``
that batch left, the translator's state (``emitter``: step, token counts, pending
cadence), the bytes published so far, the rate bucket, the last publish's time and,
once the job has ended, its final status.

Publishers of one job are serialised by :meth:`ProducerStore.locked`; inside it a
publish loads the record, publishes, and commits with :meth:`ProducerStore.save`, a
compare-and-set on ``producer_seq``. :class:`MemoryProducerStore` serves one instance
(an ``asyncio.Lock`` per job);
:class:`~app.jobs.redis_producers.RedisProducerStore` every instance on one Redis (a
local lock first, then a short Redis lock, ``SET NX PX``, and a Lua compare-and-set that
also checks the lock is still held). ``tests/test_publish_producers.py`` runs the same
suite against both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

import attrs
import orjson

from app.core.errors import ProducerBusy

__all__ = [
    "LOCK_WAIT_S",
    "LocalLocks",
    "MemoryProducerStore",
    "ProducerState",
    "ProducerStore",
]

#: How long a publish waits for another publish (or a cancel, or the sweeper) to the same
#: job before it is answered 503 ``producer_busy``.
LOCK_WAIT_S = 5.0


@attrs.frozen(kw_only=True)
class ProducerState:
    """What the publishes of one external job share (stored whole after each batch)."""

    #: SHA-256 (hex) of the job's publish token: the token itself is kept nowhere.
    token_hash: str
    #: The last ``producer_seq`` accepted (0 before the first batch).
    producer_seq: int = 0
    #: The job's newest seq once that batch was published.
    last_event_id: int = 0
    #: The final status once the job has ended (a terminal event, a cancel, the timeout).
    status: str | None = None
    #: Wall-clock time of the last accepted publish (the job's creation before the first).
    last_publish_at: float
    #: Bytes of text and results the producer has published in all.
    bytes_used: int = 0
    #: The rate bucket: producer events that may still be published now, as of ``bucket_at``.
    bucket: float = 0.0
    bucket_at: float = 0.0
    #: The translator's state (:class:`app.jobs.external.Translator`), as JSON.
    emitter: dict[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> bytes:
        """The record as stored."""
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> ProducerState:
        """The record :meth:`to_json` stored."""
        return cls(**orjson.loads(raw))


class ProducerStore(Protocol):
    """Where producer states live, and the per-job lock that orders their publishers."""

    async def create(self, job_id: str, state: ProducerState) -> None:
        """Record a new external job's state."""
        ...

    async def load(self, job_id: str) -> ProducerState | None:
        """The job's state; None if it is not an external job (or has expired)."""
        ...

    def locked(self, job_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the job's lock (on every instance); ``ProducerBusy`` after ``LOCK_WAIT_S``."""
        ...

    async def save(self, job_id: str, state: ProducerState, *, expected_seq: int) -> None:
        """Store ``state`` if the stored ``producer_seq`` is still ``expected_seq``.

        Called with the lock held. Raises ``ProducerBusy`` when it is not (the lock was
        lost: another publisher went ahead), so the caller's answer says to retry.
        """
        ...

    async def silent_since(self, cutoff: float) -> list[str]:
        """Unfinished jobs whose last publish (or creation) was before ``cutoff``."""
        ...

    async def statuses(self, job_ids: Iterable[str]) -> dict[str, str | None]:
        """The final status of each job (None: still open; missing jobs are left out)."""
        ...

    async def expire(self, cutoff: float) -> None:
        """Forget the states of jobs that ended before ``cutoff`` (Redis: key TTLs do)."""
        ...


@attrs.define(eq=False)
class LocalLocks:
    """One ``asyncio.Lock`` per job, dropped when nobody holds or waits for it."""

    _locks: dict[str, tuple[asyncio.Lock, int]] = attrs.Factory(dict)

    @contextlib.asynccontextmanager
    async def hold(self, job_id: str, wait_s: float) -> AsyncIterator[None]:
        lock, users = self._locks.get(job_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[job_id] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(wait_s):
                    await lock.acquire()
            except TimeoutError:
                raise ProducerBusy(job_id) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[job_id]
            if users <= 1:
                del self._locks[job_id]
            else:
                self._locks[job_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@attrs.define(eq=False)
class MemoryProducerStore:
    """:class:`ProducerStore` in this process (one instance)."""

    _states: dict[str, ProducerState] = attrs.Factory(dict)
    _ended_at: dict[str, float] = attrs.Factory(dict)
    _locks: LocalLocks = attrs.Factory(LocalLocks)

    async def create(self, job_id: str, state: ProducerState) -> None:
        self._states[job_id] = state

    async def load(self, job_id: str) -> ProducerState | None:
        return self._states.get(job_id)

    def locked(self, job_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._locks.hold(job_id, LOCK_WAIT_S)

    async def save(self, job_id: str, state: ProducerState, *, expected_seq: int) -> None:
        current = self._states.get(job_id)
        if current is None or current.producer_seq != expected_seq:
            raise ProducerBusy(job_id)
        self._states[job_id] = state
        if state.status is not None:
            self._ended_at.setdefault(job_id, time.time())

    async def silent_since(self, cutoff: float) -> list[str]:
        return [
            job_id
            for job_id, state in self._states.items()
            if state.status is None and state.last_publish_at < cutoff
        ]

    async def statuses(self, job_ids: Iterable[str]) -> dict[str, str | None]:
        return {i: self._states[i].status for i in job_ids if i in self._states}

    async def expire(self, cutoff: float) -> None:
        for job_id in [i for i, at in self._ended_at.items() if at < cutoff]:
            del self._ended_at[job_id]
            self._states.pop(job_id, None)
