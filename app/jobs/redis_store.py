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

Each status has an index of the same shape, ``{prefix}jobs:{status}``, kept with the
snapshot: the put script moves a job between them in the same script that writes a
snapshot whose status changed (and a status change is always written at once). So
``count_by_status`` (``/metrics``'s ``flushline_jobs``) is five ``ZCOUNT``s, the same
on every instance, whatever the number of jobs kept; and a listing filtered by status
reads that status's jobs only. Both count the jobs created within the TTL, as listings
show them. The lost-runner sweeper writes a job's end in its own script: it (or a
listing that meets the job in the wrong index) settles the index with
:meth:`RedisJobStore.settle_status`. With auth on, each owner's jobs have an index too,
``{prefix}jobs:owner:{owner}`` (added with the job, expiring a TTL after the owner's
newest job; an id whose snapshot is gone is dropped when a listing meets it): a listing
for one owner reads that owner's jobs only. Jobs written by a version without these
indexes are neither counted nor found by a filtered listing; they leave the plain
listing within the TTL too.

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

import time
from collections.abc import Mapping
from typing import Any, cast

import attrs
import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.bus.redis import Entry, decode_entry
from app.bus.redis_client import milliseconds
from app.core.errors import JobNotFound
from app.core.events import decode_event
from app.jobs.store import JobSnapshot, JobStatus, StepState, StepStatus, apply_event

__all__ = ["RedisJobStore", "snapshot_from_json", "snapshot_to_json"]

#: Ids read per page while listing.
LIST_PAGE = 200
#: A running job's snapshot is written at most this often (its end at once).
SNAPSHOT_INTERVAL_S = 1.0
#: Event types that change a snapshot beyond its ``last_event_id`` (see ``apply_event``).
_FOLDED_TYPES = frozenset(
    {"job_started", "step_started", "step_progress", "step_completed", "error", "done"}
)


#: The statuses in the order of their index keys in the scripts' KEYS (from KEYS[2]).
_STATUSES = tuple(JobStatus)

# SET XX unless the stored snapshot is finished: 1 stored, 0 no such job, -1 finished.
# KEYS: the snapshot, then the status indexes; ARGV: the snapshot, its TTL, its status, the
# position in KEYS of its status's index, its creation time, the job's id. A status change
# moves the id to its status's index.
_PUT_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local status = string.match(cur, '^{"status":"(%a+)"')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if status ~= ARGV[3] then
  local target = tonumber(ARGV[4])
  for i = 2, #KEYS do
    if i ~= target then redis.call('ZREM', KEYS[i], ARGV[6]) end
  end
  redis.call('ZADD', KEYS[target], ARGV[5], ARGV[6])
end
return 1
"""

# The id in the index of its stored snapshot's status, and only there (none if the
# snapshot is gone). KEYS: the snapshot, then the status indexes; ARGV: the id, then the
# statuses in the indexes' order.
_SETTLE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
local status, created
if cur then
  status = string.match(cur, '^{"status":"(%a+)"')
  created = string.match(cur, '"created_at":([-+.%deE]+)')
end
for i = 2, #KEYS do
  if status == ARGV[i] and created then
    redis.call('ZADD', KEYS[i], created, ARGV[1])
  else
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
end
return cur and 1 or 0
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
    _settle_script: AsyncScript = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._put_script = self.redis.register_script(_PUT_SCRIPT)
        self._settle_script = self.redis.register_script(_SETTLE_SCRIPT)

    @property
    def _ttl_ms(self) -> int:
        return milliseconds(self.job_ttl_s)

    @property
    def _index(self) -> str:
        return f"{self.prefix}jobs"

    def status_index(self, status: JobStatus) -> str:
        """The index of the jobs whose stored snapshot has ``status``."""
        return f"{self.prefix}jobs:{status.value}"

    def owner_index(self, owner: str) -> str:
        """The index of the jobs created with the API token whose fingerprint is ``owner``."""
        return f"{self.prefix}jobs:owner:{owner}"

    @property
    def _status_indexes(self) -> list[str]:
        return [self.status_index(status) for status in _STATUSES]

    def _horizon(self) -> str:
        """The lowest creation time (exclusive) a listing shows: within the TTL."""
        return f"({time.time() - self.job_ttl_s}"

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
            # A status change is written at once: the status indexes follow the writes.
            and saved[0].status is job.status
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
        horizon = f"({time.time() - self.job_ttl_s}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(job.id), snapshot_to_json(job), px=self._ttl_ms)
            pipe.zadd(self._index, {job.id: job.created_at})
            pipe.zadd(self.status_index(job.status), {job.id: job.created_at})
            for index in (self._index, *self._status_indexes):
                pipe.zremrangebyscore(index, "-inf", horizon)
            if job.owner is not None:
                owned = self.owner_index(job.owner)
                pipe.zadd(owned, {job.id: job.created_at})
                pipe.zremrangebyscore(owned, "-inf", horizon)
                pipe.pexpire(owned, self._ttl_ms)
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
            keys=[self.key(job.id), *self._status_indexes],
            args=[
                snapshot_to_json(job),
                self._ttl_ms,
                job.status.value,
                _STATUSES.index(job.status) + 2,  # Lua counts from 1, after the snapshot
                job.created_at,
                job.id,
            ],
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
        horizon = self._horizon()
        # The narrowest index that holds every job the filters let through.
        status_only = status if owner is None else None
        if owner is not None:
            index = self.owner_index(owner)
        elif status_only is not None:
            index = self.status_index(status_only)
        else:
            index = self._index
        while len(out) < limit:
            ids = cast(
                list[bytes],
                await self.redis.zrevrangebyscore(index, "+inf", horizon, start=start, num=page),
            )
            if not ids:
                break
            raws = cast(
                list[bytes | None], await self.redis.mget([self.key(i.decode()) for i in ids])
            )
            gone = [job_id for job_id, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:  # expired: the indexes forget them as they meet them
                async with self.redis.pipeline(transaction=False) as pipe:
                    for each in dict.fromkeys((index, self._index, *self._status_indexes)):
                        pipe.zrem(each, *gone)
                    await pipe.execute()
            stored = [snapshot_from_json(r) for r in raws if r]
            if status_only is not None:
                # Written by the sweeper's own script: the index follows now.
                for job in stored:
                    if job.status is not status_only:
                        await self.settle_status(job.id)
            for job in await self._current(stored):
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
            for index in (self._index, *self._status_indexes):
                pipe.zrem(index, job_id)
            await pipe.execute()
        self._forget(job_id)

    async def settle_status(self, job_id: str) -> None:
        """Put the job in the index of its stored snapshot's status (none if it is gone).

        For a snapshot written other than by :meth:`put` (the lost-runner sweeper's
        takeover script): call it after such a write.
        """
        await self._settle_script(
            keys=[self.key(job_id), *self._status_indexes],
            args=[job_id, *(status.value for status in _STATUSES)],
        )

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Jobs created within the TTL by stored status: five ``ZCOUNT``s, no snapshot read.

        The same on every instance. The stored status is the runner's, written at each
        change; a job whose runner is lost counts as running until the sweeper ends it.
        """
        horizon = self._horizon()
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in self._status_indexes:
                pipe.zcount(index, horizon, "+inf")
            counts = await pipe.execute()
        return {status: int(n) for status, n in zip(_STATUSES, counts, strict=True)}

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
