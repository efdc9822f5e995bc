"""Jobs as the API shows them: statuses, snapshots, and the store that keeps them.

A snapshot is derived from the job's events by :func:`apply_event`, so any process that
reads a job's event log can rebuild its state. ``app/jobs/redis_store.py`` keeps the
snapshots in Redis for several instances; ``tests/test_store.py`` runs against both.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs

from app.core.errors import JobNotFound
from app.core.events import (
    DoneEvent,
    EncodedEvent,
    ErrorEvent,
    JobStartedEvent,
    StepCompletedEvent,
    StepProgressEvent,
    StepStartedEvent,
)

__all__ = [
    "JobSnapshot",
    "JobStatus",
    "JobStore",
    "MemoryJobStore",
    "StepState",
    "StepStatus",
    "apply_event",
    "iso_utc",
]


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the three final statuses."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class StepStatus(enum.StrEnum):
    """Where a step is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@attrs.frozen
class StepState:
    """One step as the snapshot shows it."""

    name: str
    status: StepStatus = StepStatus.PENDING
    pct: float = 0.0
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "pct": self.pct,
            "tokens": self.tokens,
        }


def iso_utc(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (``2026-11-24T10:00:00.123456Z``), None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@attrs.frozen(kw_only=True)
class JobSnapshot:
    """The state of one job at one moment."""

    id: str
    pipeline: str
    strategy: str
    steps: tuple[StepState, ...]
    created_at: float
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    result: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_event_id: int = 0
    input: Mapping[str, Any] = attrs.field(factory=dict)
    options: Mapping[str, Any] = attrs.field(factory=dict)
    #: Who created the job when auth is on: a fingerprint of the caller's API token (never
    #: the token). Not part of :meth:`to_json`.
    owner: str | None = None

    def listed(self, status: JobStatus | None, owner: str | None) -> bool:
        """Whether a listing filtered by ``status`` and ``owner`` (``None``: any) shows it."""
        return (status is None or self.status is status) and (owner is None or self.owner == owner)

    def to_json(self) -> dict[str, Any]:
        """The contract's snapshot object."""
        base = f"/api/jobs/{self.id}"
        return {
            "id": self.id,
            "status": self.status.value,
            "pipeline": self.pipeline,
            "strategy": self.strategy,
            "progress": self.progress,
            "steps": [step.to_json() for step in self.steps],
            "result": self.result,
            "error": self.error,
            "created_at": iso_utc(self.created_at),
            "started_at": iso_utc(self.started_at),
            "finished_at": iso_utc(self.finished_at),
            "last_event_id": self.last_event_id,
            "options": dict(self.options),
            "links": {
                "self": base,
                "stream": f"{base}/stream",
                "events": f"{base}/events",
                "cancel": f"{base}/cancel",
            },
        }


def _replace_step(
    steps: tuple[StepState, ...], index: int, **changes: Any
) -> tuple[StepState, ...]:
    if not 0 <= index < len(steps):
        return steps
    return (*steps[:index], attrs.evolve(steps[index], **changes), *steps[index + 1 :])


def _running_index(steps: tuple[StepState, ...]) -> int:
    for i, step in enumerate(steps):
        if step.status is StepStatus.RUNNING:
            return i
    return -1


def apply_event(job: JobSnapshot, event: EncodedEvent) -> JobSnapshot:
    """The snapshot after ``event``, a pure function of the two."""
    job = attrs.evolve(job, last_event_id=max(job.last_event_id, event.seq))
    steps = job.steps
    running = _running_index(steps)
    match event.event:
        case JobStartedEvent():
            return attrs.evolve(job, status=JobStatus.RUNNING, started_at=event.ts)
        case StepStartedEvent(index=index):
            return attrs.evolve(job, steps=_replace_step(steps, index, status=StepStatus.RUNNING))
        case StepProgressEvent(pct=pct, tokens=tokens, overall_pct=overall):
            steps = _replace_step(steps, running, pct=pct, tokens=tokens)
            return attrs.evolve(job, steps=steps, progress=overall)
        case StepCompletedEvent(index=index, tokens=tokens, overall_pct=overall):
            steps = _replace_step(
                steps, index, status=StepStatus.SUCCEEDED, pct=100.0, tokens=tokens
            )
            return attrs.evolve(job, steps=steps, progress=overall)
        case ErrorEvent(message=message):
            steps = _replace_step(steps, running, status=StepStatus.FAILED)
            return attrs.evolve(job, steps=steps, error=message)
        case DoneEvent() as done:
            status = JobStatus(done.status)
            if status is JobStatus.CANCELLED:
                steps = tuple(
                    attrs.evolve(s, status=StepStatus.CANCELLED)
                    if s.status in (StepStatus.RUNNING, StepStatus.PENDING)
                    else s
                    for s in steps
                )
            return attrs.evolve(
                job,
                status=status,
                steps=steps,
                progress=done.overall_pct,
                result=done.result,
                error=done.error or job.error,
                finished_at=event.ts,
            )
    return job


class JobStore(Protocol):
    """Where snapshots live: in this process, or in Redis (``RedisJobStore``)."""

    async def add(self, job: JobSnapshot) -> None:
        """Store a new job."""
        ...

    async def get(self, job_id: str) -> JobSnapshot:
        """The job's snapshot; ``JobNotFound`` if unknown."""
        ...

    async def put(self, job: JobSnapshot) -> None:
        """Replace the job's snapshot."""
        ...

    async def newest(
        self, *, limit: int, status: JobStatus | None = None, owner: str | None = None
    ) -> list[JobSnapshot]:
        """Newest first, at most ``limit``; only those with ``status`` / ``owner`` if given."""
        ...

    async def discard(self, job_id: str) -> None:
        """Forget the job."""
        ...

    async def finished_before(self, ts: float) -> list[str]:
        """Ids of jobs that finished before ``ts``, for the manager to expire.

        A store whose entries expire by themselves (Redis key TTLs) returns none.
        """
        ...

    async def count(self) -> int:
        """How many jobs are stored."""
        ...

    async def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs are stored with each status (every status listed).

        Kept up to date as jobs change status, not counted by reading their snapshots:
        a scrape of ``/metrics`` costs the same with 10 jobs kept or 10,000.
        """
        ...


@attrs.define
class MemoryJobStore:
    """In-process :class:`JobStore`; insertion order is creation order.

    Each status, and each owner, has its own index, the jobs' places in creation order:
    a listing filtered by owner walks that owner's jobs only, one filtered by status that
    status's jobs only, and the counts per status are the indexes' lengths.
    """

    _jobs: dict[str, JobSnapshot] = attrs.Factory(dict)
    #: Each job's place in creation order, and the job at each place.
    _places: dict[str, int] = attrs.field(factory=dict, init=False)
    _at: dict[int, str] = attrs.field(factory=dict, init=False)
    _next_place: int = attrs.field(default=0, init=False)
    #: Per status: the places of its jobs, ascending (the newest last).
    _by_status: dict[JobStatus, list[int]] = attrs.field(
        factory=lambda: {status: [] for status in JobStatus}, init=False
    )
    #: Per owner: the places of their jobs, ascending.
    _by_owner: dict[str, list[int]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        for job in self._jobs.values():
            self._index(job)

    def _index(self, job: JobSnapshot) -> None:
        place = self._next_place
        self._next_place += 1
        self._places[job.id] = place
        self._at[place] = job.id
        self._by_status[job.status].append(place)  # the newest: at the end
        if job.owner is not None:
            self._by_owner.setdefault(job.owner, []).append(place)

    def _unindex(self, job: JobSnapshot) -> None:
        place = self._places.pop(job.id)
        del self._at[place]
        _remove(self._by_status[job.status], place)
        if job.owner is not None:
            owned = self._by_owner[job.owner]
            _remove(owned, place)
            if not owned:
                del self._by_owner[job.owner]

    async def add(self, job: JobSnapshot) -> None:
        old = self._jobs.pop(job.id, None)
        if old is not None:
            self._unindex(old)
        self._jobs[job.id] = job
        self._index(job)

    async def get(self, job_id: str) -> JobSnapshot:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None

    async def put(self, job: JobSnapshot) -> None:
        old = self._jobs.get(job.id)
        if old is None:
            return
        self._jobs[job.id] = job
        if old.status is not job.status:
            place = self._places[job.id]
            _remove(self._by_status[old.status], place)
            bisect.insort(self._by_status[job.status], place)

    async def newest(
        self, *, limit: int, status: JobStatus | None = None, owner: str | None = None
    ) -> list[JobSnapshot]:
        # The narrowest index that holds every job the filters let through.
        if owner is not None:
            places = self._by_owner.get(owner, [])
        elif status is not None:
            places = self._by_status[status]
        else:
            places = None
        if places is None:
            candidates = reversed(self._jobs.values())
        else:
            candidates = (self._jobs[self._at[p]] for p in reversed(places))
        out: list[JobSnapshot] = []
        for job in candidates:
            if job.listed(status, owner):
                out.append(job)
                if len(out) >= limit:
                    break
        return out

    async def discard(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._unindex(job)

    async def finished_before(self, ts: float) -> list[str]:
        return [
            job.id
            for job in self._jobs.values()
            if job.finished_at is not None and job.finished_at < ts
        ]

    async def count(self) -> int:
        return len(self._jobs)

    async def count_by_status(self) -> dict[JobStatus, int]:
        return {status: len(places) for status, places in self._by_status.items()}


def _remove(places: list[int], place: int) -> None:
    """Take ``place`` out of the ascending ``places``."""
    del places[bisect.bisect_left(places, place)]
