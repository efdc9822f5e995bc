"""Jobs written straight into Redis as a runner would leave them, for tests and benchmarks.

Finished jobs by the thousand, in pipelines of 500 (the layout of ``RedisEventBus`` and
``RedisJobStore``: the snapshot, the stream with its open marker, ``job_started``, ``done``
and the ``closed`` end marker): seconds, where running them through the API would take
minutes.
"""

from __future__ import annotations

import time
import uuid

from redis.asyncio import Redis

from app.bus.redis import RedisEventBus
from app.bus.redis_writer import F_END, F_OPEN, OPEN_ID, entry_fields
from app.core.events import DoneEvent, JobStartedEvent, encode_event
from app.jobs.redis_store import RedisJobStore, snapshot_to_json
from app.jobs.store import JobSnapshot, JobStatus, StepState

__all__ = ["seed_finished_jobs"]

#: How long the seeded keys live.
SEED_TTL_MS = 600_000


async def seed_finished_jobs(redis: Redis, count: int, prefix: str = "flushline:") -> list[str]:
    """Write ``count`` finished jobs (snapshot, ``job_started``, ``done``) as a runner would."""
    store = RedisJobStore(redis, prefix=prefix)
    bus = RedisEventBus(redis, prefix=prefix)
    ids = [uuid.uuid4().hex for _ in range(count)]
    for start in range(0, count, 500):
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids[start : start + 500]:
                now = time.time()
                events = [
                    encode_event(job_id, 1, JobStartedEvent(("only",), "none")),
                    encode_event(job_id, 2, DoneEvent("succeeded", 100.0, result={"text": "x"})),
                ]
                job = JobSnapshot(
                    id=job_id,
                    pipeline="demo",
                    strategy="none",
                    steps=(StepState("only"),),
                    created_at=now,
                    status=JobStatus.SUCCEEDED,
                    progress=100.0,
                    result={"text": "x"},
                    started_at=now,
                    finished_at=now,
                    last_event_id=2,
                )
                pipe.set(store.key(job_id), snapshot_to_json(job), px=SEED_TTL_MS)
                key = bus.key(job_id)
                pipe.xadd(key, {F_OPEN: b"1"}, id=OPEN_ID)
                for event in events:
                    pipe.xadd(key, entry_fields(event), id=f"{event.seq}-0")  # type: ignore[arg-type]
                pipe.xadd(key, {F_END: b"closed"}, id="2-1")
                pipe.pexpire(key, SEED_TTL_MS)
            await pipe.execute()
    return ids
