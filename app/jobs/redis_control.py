"""RedisJobControl: how instances sharing Redis coordinate the jobs they run.

Cancel from any instance (the first request anywhere wins; the runner hears it on one
pub/sub watcher per instance), runner leases renewed by the instance that runs a job, and
the sweep that ends, once and atomically, a job whose runner stopped renewing (its
``error`` and ``done`` appended after every event already published, its log closed so a
runner that comes back cannot publish after them). The seam is
:class:`~app.jobs.control.JobControl`; one instance alone has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Collection
from typing import cast

import attrs
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.bus.redis import RedisEventBus
from app.bus.redis_client import milliseconds
from app.core.events import DoneEvent, ErrorEvent, encode_event
from app.jobs.redis_store import RedisJobStore, snapshot_from_json, snapshot_to_json
from app.jobs.store import StepStatus, apply_event

__all__ = ["RUNNER_LOST", "RedisJobControl"]

log = structlog.get_logger(__name__)

# Ends a job whose runner's lease expired: appends `error` and `done` (seqs after the
# top the caller read, which must still be the top), the `closed` marker, and the final
# snapshot, in one step, so that of several sweepers exactly one ends the job, and the
# lost runner, should it come back, finds its log closed (its next XADD is refused).
# 1 ended, 0 the lease is held again, -1 nothing to end (already ended; a `done`
# without its marker gets it), -2 the log moved on since it was read (read again).
_TAKEOVER_SCRIPT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top == 0 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return -1
end
local id, f = top[1][1], top[1][2]
if f[1] == 'end' or (f[1] == 't' and f[2] == 'done') then
  if f[1] ~= 'end' then
    redis.call('XADD', KEYS[1], string.match(id, '^(%d+)-') .. '-*', 'end', 'closed')
  end
  redis.call('ZREM', KEYS[4], ARGV[1])
  return -1
end
if id ~= ARGV[2] then return -2 end
for i = 6, 10, 4 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[4], ARGV[i],
             't', ARGV[i + 1], 'ts', ARGV[i + 2], 'f', ARGV[i + 3])
end
redis.call('XADD', KEYS[1], string.match(ARGV[10], '^(%d+)-') .. '-*', 'end', 'closed')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[3])
end
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# Renews one job's lease (and its keys' TTLs) unless the job was taken from this instance:
# its lease is held by another, or it is gone from the lease set (a sweeper ended the job
# as runner lost, which also removed the lease). Returns -1 then, else whether a cancel
# was asked for (1) or not (0). A lease that merely expired, not swept yet, is taken back.
_RENEW_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[2] and (holder or not redis.call('ZSCORE', KEYS[2], ARGV[1])) then
  return -1
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return redis.call('EXISTS', KEYS[5])
"""

#: Why a job whose runner stopped renewing its lease failed.
RUNNER_LOST = "runner lost: the instance running the job stopped renewing its lease"
#: Expired leases one sweep ends at most (the next sweep takes the rest).
SWEEP_BATCH = 100
#: Tries to end one job when its log keeps moving (a runner still publishing).
TAKEOVER_TRIES = 3
#: Pause before the cancel watcher subscribes again after losing Redis.
WATCH_RETRY_S = (0.1, 0.5, 1.0, 2.0)


@attrs.define(eq=False)
class RedisJobControl:
    """:class:`~app.jobs.control.JobControl` on Redis: cancel from anywhere, runner leases.

    Layout, beside the bus's and the store's keys: ``{prefix}job:{id}:lease`` (the runner
    instance's id, expiring ``lease_s`` after the last renewal), ``{prefix}leases`` (a
    sorted set of running job ids by lease deadline, so a sweep reads only the expired
    ones), ``{prefix}job:{id}:cancel`` (set once, with ``SET NX``: the first cancel
    anywhere wins) and the pub/sub channel ``{prefix}cancels`` that every instance's one
    watcher listens on. A renewal also checks the cancel keys of the jobs it renews, so a
    request whose message was missed (a reconnect) still lands within ``lease_s / 3``,
    and it never takes back a lease that a sweeper took: a runner that was frozen (or cut
    off) past its lease learns that its job was ended elsewhere, and stops it.
    """

    redis: Redis
    bus: RedisEventBus
    store: RedisJobStore
    lease_s: float = 15.0
    job_ttl_s: float = 3600.0
    prefix: str = "flushline:"
    instance: str = attrs.Factory(lambda: secrets.token_hex(8))
    _takeover: AsyncScript = attrs.field(init=False)
    _renew: AsyncScript = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._takeover = self.redis.register_script(_TAKEOVER_SCRIPT)
        self._renew = self.redis.register_script(_RENEW_SCRIPT)

    @property
    def _lease_ms(self) -> int:
        return milliseconds(self.lease_s)

    @property
    def _ttl_ms(self) -> int:
        return milliseconds(self.job_ttl_s)

    @property
    def _leases(self) -> str:
        return f"{self.prefix}leases"

    @property
    def channel(self) -> str:
        """The pub/sub channel of cancel requests."""
        return f"{self.prefix}cancels"

    def _lease_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:lease"

    def _cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:cancel"

    def _deadline_ms(self) -> float:
        return (time.time() + self.lease_s) * 1000

    async def acquire(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._lease_key(job_id), self.instance, px=self._lease_ms)
            pipe.zadd(self._leases, {job_id: self._deadline_ms()})
            await pipe.execute()

    async def renew(self, job_ids: Collection[str]) -> set[str]:
        """Renew the jobs' leases; those to stop here: a cancel was asked for, or another
        instance's sweeper ended the job (this instance had stopped renewing long enough
        to be taken for lost), which ``RunningJobs`` then stops without publishing.
        """
        ids = list(job_ids)
        deadline = self._deadline_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                await self._renew(
                    keys=[
                        self._lease_key(job_id),
                        self._leases,
                        # A quiet job (a model thinking) publishes nothing: its keys
                        # must not expire.
                        self.store.key(job_id),
                        self.bus.key(job_id),
                        self._cancel_key(job_id),
                    ],
                    args=[job_id, self.instance, self._lease_ms, deadline, self._ttl_ms],
                    client=pipe,
                )
            results = await pipe.execute()
        stop = set()
        for job_id, result in zip(ids, results, strict=True):
            if result == -1:
                log.warning("lease lost: the job was ended elsewhere as runner lost", job_id=job_id)
            if result != 0:
                stop.add(job_id)
        return stop

    async def release(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._lease_key(job_id))
            pipe.zrem(self._leases, job_id)
            await pipe.execute()

    async def claim_cancel(self, job_id: str) -> bool:
        return bool(await self.redis.set(self._cancel_key(job_id), b"1", nx=True, px=self._ttl_ms))

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.publish(self.channel, job_id)

    async def watch_cancels(self, on_cancel: Callable[[str], None]) -> None:
        failures = 0
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                failures = 0
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        on_cancel(cast(bytes, message["data"]).decode())
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                delay = WATCH_RETRY_S[min(failures, len(WATCH_RETRY_S) - 1)]
                failures += 1
                log.warning("cancel watcher lost Redis; retrying", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await pubsub.aclose()

    async def ping(self) -> None:
        await self.redis.ping()

    async def sweep(self) -> list[str]:
        """End the jobs whose lease expired; one job that cannot be ended never stops the
        others (it is logged, and tried again a lease later).
        """
        now_ms = time.time() * 1000
        expired = cast(
            list[bytes],
            await self.redis.zrangebyscore(self._leases, "-inf", now_ms, start=0, num=SWEEP_BATCH),
        )
        ended = []
        for raw in expired:
            job_id = raw.decode()
            try:
                if await self._end_lost(job_id):
                    ended.append(job_id)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                raise  # Redis is lost: the whole sweep is retried
            except Exception:
                log.exception("lost runner's job not ended; tried again later", job_id=job_id)
                # Out of the front of the set, so that it cannot hold the others back.
                with contextlib.suppress(redis_errors.RedisError):
                    await self.redis.zadd(self._leases, {job_id: self._deadline_ms()}, xx=True)
        return ended

    async def _end_lost(self, job_id: str) -> bool:
        """End a job whose runner is gone, unless someone (or something) else did."""
        keys = [
            self.bus.key(job_id),
            self.store.key(job_id),
            self._lease_key(job_id),
            self._leases,
        ]
        for _ in range(TAKEOVER_TRIES):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrevrange(self.bus.key(job_id), count=1)
                pipe.get(self.store.key(job_id))
                top, raw = await pipe.execute()
            seq = 0
            top_id = b"0-0"
            if top:
                top_id = top[0][0]
                seq = int(top_id.split(b"-", 1)[0])
            # The stored snapshot may be up to a second behind the log: fold up to the top.
            job = None if raw is None else await self.store.fold(snapshot_from_json(raw), top_id)
            step = None
            progress = 0.0
            if job is not None:
                progress = job.progress
                step = next((s.name for s in job.steps if s.status is StepStatus.RUNNING), None)
            error = encode_event(job_id, seq + 1, ErrorEvent(RUNNER_LOST, step))
            done = encode_event(job_id, seq + 2, DoneEvent("failed", progress, error=RUNNER_LOST))
            final = b""
            if job is not None:
                final = snapshot_to_json(apply_event(apply_event(job, error), done))
            result = await self._takeover(
                keys=keys,
                args=[
                    job_id,
                    top_id,
                    self._ttl_ms,
                    self.bus.history_limit,
                    final,
                    *(
                        part
                        for event in (error, done)
                        for part in (f"{event.seq}-0", event.type, repr(event.ts), event.frame)
                    ),
                ],
            )
            if result == 1:
                # The takeover script wrote the job's end itself: file it under its status.
                await self.store.settle_status(job_id)
            if result != -2:
                return bool(result == 1)
        return False
