"""The loops an instance sharing jobs with others runs while it serves (Redis).

It watches cancel requests made on any instance, renews the leases of the jobs it runs
(a runner that stops renewing is taken for lost), and sweeps the jobs whose runner was
lost: the sweep ends them ``failed``, so that none of their streams waits forever.
One instance alone runs none of this (``JobManager.control`` is ``None``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import attrs
import structlog

from app.jobs.control import JobControl

__all__ = ["MAINTENANCE_RETRY_S", "LeaseMaintenance"]

# The manager's logger: its lines keep their ``logger`` field since they moved here.
log = structlog.get_logger("app.jobs.manager")

#: Pause after a failed renew or sweep before the next attempt.
MAINTENANCE_RETRY_S = 1.0


@attrs.frozen
class LeaseMaintenance:
    """Watches cancels, renews this instance's leases and sweeps lost runners."""

    control: JobControl
    #: The ids of the jobs this instance runs now (whose leases it holds).
    running_jobs: Callable[[], list[str]]
    #: Cancels a job this instance runs (once; nothing if it does not run it).
    cancel: Callable[[str], None]

    async def run(self) -> None:
        """Run the three loops until cancelled (the app owns the task)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.control.watch_cancels(self.cancel), name="cancel-watcher")
            group.create_task(self._renew_forever(), name="lease-renewer")
            group.create_task(self._sweep_forever(), name="lease-sweeper")

    async def _renew_forever(self) -> None:
        every_s = self.control.lease_s / 3
        delay_s = every_s
        while True:
            await asyncio.sleep(delay_s)
            delay_s = every_s
            job_ids = self.running_jobs()
            if not job_ids:
                continue
            try:
                cancels = await self.control.renew(job_ids)
            except Exception as exc:
                # Soon again: a Redis that comes back must see the lease before the sweeper.
                log.warning("lease renewal failed", error=str(exc))
                delay_s = min(MAINTENANCE_RETRY_S, every_s)
                continue
            for job_id in cancels:  # a request whose message this instance missed
                self.cancel(job_id)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.control.lease_s / 4, 0.5))
            try:
                ended = await self.control.sweep()
            except Exception as exc:
                log.warning("lease sweep failed", error=str(exc))
                await asyncio.sleep(MAINTENANCE_RETRY_S)
                continue
            for job_id in ended:
                log.warning("job failed: runner lost", job_id=job_id)
