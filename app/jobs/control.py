"""The seam between instances that share jobs: runner leases and cancels from anywhere.

One instance alone needs none (``JobManager.control`` is ``None``); on Redis,
:class:`~app.jobs.redis_control.RedisJobControl` implements it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

__all__ = ["JobControl"]


class JobControl(Protocol):
    """How the instances sharing jobs coordinate (``RedisJobControl``); none for one instance.

    The instance that runs a job holds its lease and renews it; any instance may ask for
    a job to be cancelled, and one sweeps the jobs whose runner stopped renewing.
    """

    @property
    def lease_s(self) -> float:
        """How long a lease lasts without renewal."""
        ...

    async def acquire(self, job_id: str) -> None:
        """This instance runs the job: take its lease."""
        ...

    async def renew(self, job_ids: Collection[str]) -> set[str]:
        """Renew the leases (and key TTLs) of these jobs; returns those asked to cancel."""
        ...

    async def release(self, job_id: str) -> None:
        """The job has ended here: drop its lease."""
        ...

    async def claim_cancel(self, job_id: str) -> bool:
        """Record a cancel request; False if one was already recorded (atomic)."""
        ...

    async def request_cancel(self, job_id: str) -> None:
        """Tell every instance (the runner among them) that the job is to be cancelled."""
        ...

    async def watch_cancels(self, on_cancel: Callable[[str], None]) -> None:
        """Call ``on_cancel(job_id)`` for every cancel request, until cancelled."""
        ...

    async def sweep(self) -> list[str]:
        """End the jobs whose lease expired (``error`` then ``done`` failed); their ids."""
        ...

    async def ping(self) -> None:
        """Raise if the shared store cannot be reached right now."""
        ...
