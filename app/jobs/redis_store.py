"""RedisJobStore: job snapshots in Redis, so every instance answers the same.

Layout: ``{prefix}job:{id}`` holds the snapshot as JSON with the key's TTL at
``FLUSHLINE_JOB_TTL``, reset by every write, so a finished job expires that long after its
last event by Redis key expiry (nothing sweeps; :meth:`RedisJobStore.finished_before`
has nothing to report). ``{prefix}jobs`` is a sorted set of ids by creation time for
``GET /api/jobs``: ids older than the TTL are trimmed from it by score when jobs are
created or counted (O(log n) per removed id), and an id whose snapshot has expired is
dropped when a listing meets it. So a listing shows the jobs created within the TTL
(with the memory store, every retained job): a job still running, or finished, longer
than the TTL after its creation is found by its id but no longer listed.

Costs: creating a job is one transaction (``SET``, ``ZADD``, trim). The instance that
runs a job keeps its newest snapshot in memory until it finishes (the manager's
read-modify-write per event costs no read) and writes it to Redis (one ``SET ... XX``
script) when the job ends, and meanwhile only when the last write is
:data:`SNAPSHOT_INTERVAL_S` old, not once per event. A reader on another instance folds
the events published since the stored snapshot (``XRANGE`` from its ``last_event_id``,
one round trip, about a second of events) into it, so every instance answers with the
same snapshot as the runner, and the lost-runner sweeper ends a job from the folded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import attrs
import orjson
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.bus.redis import Entry, RedisEventBus, decode_entry
from app.core.errors import JobNotFound
from app.core.events import DoneEvent, ErrorEvent, decode_event, encode_event
from app.jobs.store import JobSnapshot, JobStatus, StepState, StepStatus, apply_event

__all__ = [
    "RUNNER_LOST",
    "RedisJobControl",
    "RedisJobStore",
    "snapshot_from_json",
    "snapshot_to_json",
]

log = structlog.get_logger(__name__)

#: Ids read per page while listing.
LIST_PAGE = 200
#: A running job's snapshot is written at most this often (its end at once).
SNAPSHOT_INTERVAL_S = 1.0
#: Event types that change a snapshot beyond its ``last_event_id`` (see ``apply_event``).
_FOLDED_TYPES = frozenset(
    {"job_started", "step_started", "step_progress", "step_completed", "error", "done"}
)


# SET XX unless the stored snapshot is finished: 1 stored, 0 no such job, -1 finished.
_PUT_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local status = string.match(cur, '^{"status":"(%a+)"')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def snapshot_to_json(job: JobSnapshot) -> bytes:
    """The snapshot as stored: every field, times as Unix seconds."""
    return orjson.dumps(
        {
            # First: the put script reads it without decoding the JSON.
            "status": job.status.value,
            "id": job.id,
            "pipeline": job.pipeline,
            "strategy": job.strategy,
            "steps": [[s.name, s.status.value, s.pct, s.tokens] for s in job.steps],
            "created_at": job.created_at,
            "progress": job.progress,
            "result": job.result,
            "error": job.error,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "last_event_id": job.last_event_id,
            "input": dict(job.input),
            "options": dict(job.options),
            "owner": job.owner,
        }
    )


def snapshot_from_json(raw: bytes) -> JobSnapshot:
    """The inverse of :func:`snapshot_to_json`."""
    data: dict[str, Any] = orjson.loads(raw)
    return JobSnapshot(
        id=data["id"],
        pipeline=data["pipeline"],
        strategy=data["strategy"],
        steps=tuple(
            StepState(name, StepStatus(status), pct, tokens)
            for name, status, pct, tokens in data["steps"]
        ),
        created_at=data["created_at"],
        status=JobStatus(data["status"]),
        progress=data["progress"],
        result=data["result"],
        error=data["error"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        last_event_id=data["last_event_id"],
        input=cast(Mapping[str, Any], data["input"]),
        options=cast(Mapping[str, Any], data["options"]),
        owner=data.get("owner"),
    )


@attrs.define(eq=False)
class RedisJobStore:
    """:class:`JobStore` in Redis, shared by every instance.

    ``redis`` must return bytes (``decode_responses=False``, the default); the app owns
    it and closes it.
    """

    redis: Redis
    job_ttl_s: float = 3600.0
    prefix: str = "flushline:"
    snapshot_interval_s: float = SNAPSHOT_INTERVAL_S
    #: Unfinished jobs this instance writes: their newest snapshot, read without Redis.
    _writing: dict[str, JobSnapshot] = attrs.Factory(dict)
    #: The same jobs' snapshots as last written to Redis, and when (monotonic).
    _saved: dict[str, tuple[JobSnapshot, float]] = attrs.Factory(dict)
    _put_script: AsyncScript = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._put_script = self.redis.register_script(_PUT_SCRIPT)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.job_ttl_s * 1000))

    @property
    def _index(self) -> str:
        return f"{self.prefix}jobs"

    def key(self, job_id: str) -> str:
        """The Redis key of the job's snapshot."""
        return f"{self.prefix}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        """The job's event stream (the layout of :class:`RedisEventBus`, same prefix)."""
        return f"{self.prefix}job:{job_id}:events"

    def _remember(self, job: JobSnapshot) -> None:
        if job.status.finished:
            self._forget(job.id)
        else:
            self._writing[job.id] = job
            self._saved[job.id] = (job, time.monotonic())

    def _forget(self, job_id: str) -> None:
        self._writing.pop(job_id, None)
        self._saved.pop(job_id, None)

    def _can_wait(self, job: JobSnapshot) -> bool:
        """Whether ``job`` may stay unwritten for now (readers elsewhere fold the events)."""
        saved = self._saved.get(job.id)
        return (
            saved is not None
            and job.id in self._writing
            and not job.status.finished
            and time.monotonic() - saved[1] < self.snapshot_interval_s
        )

    async def fold(self, job: JobSnapshot, until: bytes | str = "+") -> JobSnapshot:
        """``job`` with the events published after it (up to stream id ``until``) applied."""
        if job.status.finished:
            return job
        entries = cast(
            list[Entry],
            await self.redis.xrange(
                self.events_key(job.id), min=f"{job.last_event_id + 1}-0", max=until
            ),
        )
        return _apply_entries(job, entries)

    async def add(self, job: JobSnapshot) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(job.id), snapshot_to_json(job), px=self._ttl_ms)
            pipe.zadd(self._index, {job.id: job.created_at})
            pipe.zremrangebyscore(self._index, "-inf", f"({time.time() - self.job_ttl_s}")
            await pipe.execute()
        self._remember(job)

    async def get(self, job_id: str) -> JobSnapshot:
        job = self._writing.get(job_id)
        if job is not None:
            return job
        raw = await self.redis.get(self.key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return await self.fold(snapshot_from_json(cast(bytes, raw)))

    async def put(self, job: JobSnapshot) -> None:
        if self._can_wait(job):
            self._writing[job.id] = job
            return
        # Like SET XX (a job that is not, or no longer, stored stays away), and a finished
        # snapshot is final: a runner that lost its lease cannot undo the job's end.
        stored = await self._put_script(
            keys=[self.key(job.id)], args=[snapshot_to_json(job), self._ttl_ms]
        )
        if stored == 1:
            self._remember(job)
        else:
            self._forget(job.id)

    async def newest(
        self, *, limit: int, status: JobStatus | None = None, owner: str | None = None
    ) -> list[JobSnapshot]:
        out: list[JobSnapshot] = []
        start = 0
        filtered = status is not None or owner is not None
        page = max(limit, LIST_PAGE) if filtered else limit
        horizon = f"({time.time() - self.job_ttl_s}"
        while len(out) < limit:
            ids = cast(
                list[bytes],
                await self.redis.zrevrangebyscore(
                    self._index, "+inf", horizon, start=start, num=page
                ),
            )
            if not ids:
                break
            raws = cast(
                list[bytes | None], await self.redis.mget([self.key(i.decode()) for i in ids])
            )
            gone = [job_id for job_id, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:  # expired: the index forgets them as it meets them
                await self.redis.zrem(self._index, *gone)
            for job in await self._current([snapshot_from_json(r) for r in raws if r]):
                if job.listed(status, owner):
                    out.append(job)
                    if len(out) >= limit:
                        break
            if len(ids) < page:
                break
            start += page - len(gone)
        return out

    async def discard(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(job_id))
            pipe.zrem(self._index, job_id)
            await pipe.execute()
        self._forget(job_id)

    async def _current(self, jobs: list[JobSnapshot]) -> list[JobSnapshot]:
        """``jobs`` as they are now: this instance's own, else folded (one round trip)."""
        stale = [
            i
            for i, job in enumerate(jobs)
            if job.id not in self._writing and not job.status.finished
        ]
        if stale:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in stale:
                    pipe.xrange(self.events_key(jobs[i].id), min=f"{jobs[i].last_event_id + 1}-0")
                tails = await pipe.execute()
            for i, entries in zip(stale, tails, strict=True):
                jobs[i] = _apply_entries(jobs[i], entries)
        return [self._writing.get(job.id, job) for job in jobs]

    async def finished_before(self, ts: float) -> list[str]:
        # Redis expires finished jobs by itself (the snapshot key's TTL): none to sweep.
        return []

    async def count(self) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self._index, "-inf", f"({time.time() - self.job_ttl_s}")
            pipe.zcard(self._index)
            _, count = await pipe.execute()
        return int(count)


def _apply_entries(job: JobSnapshot, entries: list[Entry]) -> JobSnapshot:
    """Fold stream entries (events; markers are skipped) into ``job``."""
    for entry_id, fields in entries:
        if not entry_id.endswith(b"-0"):
            continue  # a marker (open, end)
        encoded = decode_entry(entry_id, fields)
        if encoded.seq <= job.last_event_id:
            continue
        if encoded.type in _FOLDED_TYPES:
            encoded = attrs.evolve(encoded, event=decode_event(encoded.payload))
        job = apply_event(job, encoded)
    return job


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
    request whose message was missed (a reconnect) still lands within ``lease_s / 3``.
    """

    redis: Redis
    bus: RedisEventBus
    store: RedisJobStore
    lease_s: float = 15.0
    job_ttl_s: float = 3600.0
    prefix: str = "flushline:"
    instance: str = attrs.Factory(lambda: secrets.token_hex(8))
    _takeover: AsyncScript = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._takeover = self.redis.register_script(_TAKEOVER_SCRIPT)

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.job_ttl_s * 1000))

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
        ids = list(job_ids)
        deadline = self._deadline_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.set(self._lease_key(job_id), self.instance, px=self._lease_ms)
                pipe.zadd(self._leases, {job_id: deadline})
                # A quiet job (a model thinking) publishes nothing: its keys must not expire.
                pipe.pexpire(self.store.key(job_id), self._ttl_ms)
                pipe.pexpire(self.bus.key(job_id), self._ttl_ms)
                pipe.exists(self._cancel_key(job_id))
            results = await pipe.execute()
        return {job_id for job_id, asked in zip(ids, results[4::5], strict=True) if asked}

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
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ping(self) -> None:
        await self.redis.ping()

    async def sweep(self) -> list[str]:
        now_ms = time.time() * 1000
        expired = cast(
            list[bytes],
            await self.redis.zrangebyscore(self._leases, "-inf", now_ms, start=0, num=SWEEP_BATCH),
        )
        ended = []
        for raw in expired:
            job_id = raw.decode()
            if await self._end_lost(job_id):
                ended.append(job_id)
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
            if result != -2:
                return bool(result == 1)
        return False
