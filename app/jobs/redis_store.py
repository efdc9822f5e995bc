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

Costs: creating a job is one transaction (``SET``, ``ZADD``, trim); each later write is
one ``SET ... XX``. The instance that runs a job keeps its snapshot in memory until it
finishes, so the manager's read-modify-write per event costs no read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import attrs
import orjson
from redis.asyncio import Redis

from app.core.errors import JobNotFound
from app.jobs.store import JobSnapshot, JobStatus, StepState, StepStatus

__all__ = ["RedisJobStore", "snapshot_from_json", "snapshot_to_json"]

#: Ids read per page while listing.
LIST_PAGE = 200


def snapshot_to_json(job: JobSnapshot) -> bytes:
    """The snapshot as stored: every field, times as Unix seconds."""
    return orjson.dumps(
        {
            "id": job.id,
            "pipeline": job.pipeline,
            "strategy": job.strategy,
            "steps": [[s.name, s.status.value, s.pct, s.tokens] for s in job.steps],
            "created_at": job.created_at,
            "status": job.status.value,
            "progress": job.progress,
            "result": job.result,
            "error": job.error,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "last_event_id": job.last_event_id,
            "input": dict(job.input),
            "options": dict(job.options),
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
    #: Unfinished jobs this instance writes: their newest snapshot, read without Redis.
    _writing: dict[str, JobSnapshot] = attrs.Factory(dict)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.job_ttl_s * 1000))

    @property
    def _index(self) -> str:
        return f"{self.prefix}jobs"

    def key(self, job_id: str) -> str:
        """The Redis key of the job's snapshot."""
        return f"{self.prefix}job:{job_id}"

    def _remember(self, job: JobSnapshot) -> None:
        if job.status.finished:
            self._writing.pop(job.id, None)
        else:
            self._writing[job.id] = job

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
        return snapshot_from_json(cast(bytes, raw))

    async def put(self, job: JobSnapshot) -> None:
        # XX: like the memory store, a job that is not (or no longer) stored stays away.
        stored = await self.redis.set(
            self.key(job.id), snapshot_to_json(job), px=self._ttl_ms, xx=True
        )
        if stored:
            self._remember(job)
        else:
            self._writing.pop(job.id, None)

    async def newest(self, *, limit: int, status: JobStatus | None = None) -> list[JobSnapshot]:
        out: list[JobSnapshot] = []
        start = 0
        page = max(limit, LIST_PAGE) if status is not None else limit
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
            for raw in raws:
                if raw is None:
                    continue
                job = snapshot_from_json(raw)
                if job.id in self._writing:
                    job = self._writing[job.id]
                if status is None or job.status is status:
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
        self._writing.pop(job_id, None)

    async def finished_before(self, ts: float) -> list[str]:
        # Redis expires finished jobs by itself (the snapshot key's TTL): none to sweep.
        return []

    async def count(self) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self._index, "-inf", f"({time.time() - self.job_ttl_s}")
            pipe.zcard(self._index)
            _, count = await pipe.execute()
        return int(count)
