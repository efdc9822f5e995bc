"""RedisProducerStore: external jobs' producer states and publish locks in Redis.

The :class:`~app.jobs.producers.ProducerStore` every instance on one Redis shares, so a
producer may publish through any of them (its batches in order, exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import cast

import attrs
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.bus.redis_client import milliseconds
from app.core.errors import ProducerBusy
from app.jobs.producers import LOCK_WAIT_S, LocalLocks, ProducerState

__all__ = ["LOCK_TTL_S", "RedisProducerStore"]

#: How long a Redis lock lives if its holder dies mid-publish (nothing renews it: a batch
#: of ``publish_max_events`` takes well under a second).
LOCK_TTL_S = 10.0
#: Pauses between tries for a Redis lock another instance holds.
_LOCK_BACKOFF_S = (0.001, 0.002, 0.005, 0.01, 0.02)

# KEYS: state, lock, index. ARGV: lock token, expected seq, new seq, state, ttl ms, job
# id, last publish (index score; '' once ended). 1 saved, 0 the lock or the seq moved on.
_SAVE_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local seq = redis.call('HGET', KEYS[1], 'seq')
if not seq or seq ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'state', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[7] == '' then
  redis.call('ZREM', KEYS[3], ARGV[6])
else
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6])
end
return 1
"""

# Deletes the lock only if it is still this holder's.
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@attrs.define(eq=False)
class RedisProducerStore:
    """:class:`ProducerStore` on Redis, shared by every instance.

    Layout, beside the bus's and the job store's keys: ``{prefix}job:{id}:producer``, a
    hash (``seq``, the last ``producer_seq`` accepted; ``state``, the whole record as
    JSON) expiring ``FLUSHLINE_JOB_TTL`` after its last write;
    ``{prefix}job:{id}:producer:lock``, the lock (a random holder id, ``SET NX PX``);
    ``{prefix}producers``, the open jobs by last publish time (the producer-timeout
    sweep reads only the silent ones).
    """

    redis: Redis
    job_ttl_s: float = 3600.0
    prefix: str = "flushline:"
    _locks: LocalLocks = attrs.Factory(LocalLocks)
    #: The Redis lock's holder id, per job this instance holds the lock of.
    _held: dict[str, bytes] = attrs.Factory(dict)
    _save: AsyncScript = attrs.field(init=False)
    _unlock: AsyncScript = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._save = self.redis.register_script(_SAVE_SCRIPT)
        self._unlock = self.redis.register_script(_UNLOCK_SCRIPT)

    def key(self, job_id: str) -> str:
        """The Redis key of the job's producer state."""
        return f"{self.prefix}job:{job_id}:producer"

    def _lock_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:producer:lock"

    @property
    def _index(self) -> str:
        return f"{self.prefix}producers"

    @property
    def _ttl_ms(self) -> int:
        return milliseconds(self.job_ttl_s)

    async def create(self, job_id: str, state: ProducerState) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(job_id), mapping={"seq": 0, "state": state.to_json()})
            pipe.pexpire(self.key(job_id), self._ttl_ms)
            pipe.zadd(self._index, {job_id: state.last_publish_at})
            await pipe.execute()

    async def load(self, job_id: str) -> ProducerState | None:
        raw = await self.redis.hget(self.key(job_id), "state")
        return None if raw is None else ProducerState.from_json(cast(bytes, raw))

    @contextlib.asynccontextmanager
    async def _hold(self, job_id: str) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + LOCK_WAIT_S
        async with self._locks.hold(job_id, LOCK_WAIT_S):
            holder = secrets.token_bytes(12)
            tries = 0
            while not await self.redis.set(
                self._lock_key(job_id), holder, nx=True, px=milliseconds(LOCK_TTL_S)
            ):
                if loop.time() >= give_up_at:
                    raise ProducerBusy(job_id)
                await asyncio.sleep(_LOCK_BACKOFF_S[min(tries, len(_LOCK_BACKOFF_S) - 1)])
                tries += 1
            self._held[job_id] = holder
            try:
                yield
            finally:
                del self._held[job_id]
                # Shielded: a cancelled publish must not leave the lock for LOCK_TTL_S.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._unlock(keys=[self._lock_key(job_id)], args=[holder]))

    def locked(self, job_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._hold(job_id)

    async def save(self, job_id: str, state: ProducerState, *, expected_seq: int) -> None:
        holder = self._held.get(job_id)
        if holder is None:
            raise ProducerBusy(job_id)
        score = "" if state.status is not None else repr(state.last_publish_at)
        saved = await self._save(
            keys=[self.key(job_id), self._lock_key(job_id), self._index],
            args=[
                holder,
                expected_seq,
                state.producer_seq,
                state.to_json(),
                self._ttl_ms,
                job_id,
                score,
            ],
        )
        if saved != 1:
            raise ProducerBusy(job_id)

    async def silent_since(self, cutoff: float) -> list[str]:
        ids = [
            raw.decode()
            for raw in cast(
                list[bytes], await self.redis.zrangebyscore(self._index, "-inf", f"({cutoff}")
            )
        ]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.key(job_id))
            exists = await pipe.execute()
        gone = [job_id for job_id, there in zip(ids, exists, strict=True) if not there]
        if gone:  # expired with their job: the index forgets them as the sweep meets them
            await self.redis.zrem(self._index, *gone)
        return [job_id for job_id, there in zip(ids, exists, strict=True) if there]

    async def statuses(self, job_ids: Iterable[str]) -> dict[str, str | None]:
        ids = list(job_ids)
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.key(job_id), "state")
            raws = await pipe.execute()
        out: dict[str, str | None] = {}
        for job_id, raw in zip(ids, raws, strict=True):
            if raw is not None:
                out[job_id] = ProducerState.from_json(raw).status
        return out

    async def expire(self, cutoff: float) -> None:
        return None  # the keys' TTLs do it
