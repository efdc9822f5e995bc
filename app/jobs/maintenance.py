"""The loops an instance sharing jobs with others runs while it serves (Redis).

It watches cancel requests made on any instance, renews the leases of the jobs it runs
(a runner that stops renewing is taken for lost), and sweeps the jobs whose runner was
lost: the sweep ends them ``failed``, so that none of their streams waits forever.
One instance alone runs none of this (``JobManager.control`` is ``None``).

The loops are supervised: should one of their steps fail, for whatever reason, the
failure is logged (a lost Redis in one line, anything else with its traceback) and the
loop goes on. A loop that died would let this instance's leases lapse, and its peers
would then end every job it runs as runner lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import attrs
import structlog

from app.core.errors import backend_outage
from app.jobs.control import JobControl

__all__ = ["MAINTENANCE_RETRY_S", "LeaseMaintenance"]

# The manager's logger: its lines keep their ``logger`` field since they moved here.
log = structlog.get_logger("app.jobs.manager")

#: Pause after a failed renew, sweep or cancel watch before the next attempt.
MAINTENANCE_RETRY_S = 1.0


def _log_failure(what: str, exc: Exception) -> None:
    outage = backend_outage(exc)
    if outage is not None:
        log.warning(f"{what} failed: redis unreachable", error=outage.message)
    else:
        log.exception(f"{what} failed")


@attrs.frozen
class LeaseMaintenance:
    """Watches cancels, renews this instance's leases and sweeps lost runners."""

    control: JobControl
    #: The ids of the jobs this instance runs now (whose leases it holds).
    running_jobs: Callable[[], list[str]]
    #: Stops a job this instance runs (once; nothing if it does not run it): a cancel
    #: was asked for, or another instance ended the job.
    cancel: Callable[[str], None]

    async def run(self) -> None:
        """Run the three loops until cancelled (the app owns the task)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_forever(), name="cancel-watcher")
            group.create_task(self._renew_forever(), name="lease-renewer")
            group.create_task(self._sweep_forever(), name="lease-sweeper")

    def _stop(self, job_id: str) -> None:
        try:
            self.cancel(job_id)
        except Exception as exc:  # one job's failure must not stop the loop for the others
            _log_failure("stopping a job", exc)

    async def _watch_forever(self) -> None:
        while True:
            try:
                await self.control.watch_cancels(self._stop)
            except Exception as exc:
                _log_failure("cancel watcher", exc)
            await asyncio.sleep(MAINTENANCE_RETRY_S)

    async def _renew_forever(self) -> None:
        every_s = self.control.lease_s / 3
        delay_s = every_s
        while True:
            await asyncio.sleep(delay_s)
            delay_s = every_s
            try:
                job_ids = self.running_jobs()
                if not job_ids:
                    continue
                stop = await self.control.renew(job_ids)
            except Exception as exc:
                _log_failure("lease renewal", exc)
                # Soon again: a Redis that comes back must see the lease before the sweeper.
                delay_s = min(MAINTENANCE_RETRY_S, every_s)
                continue
            for job_id in stop:  # a cancel this instance missed, or a job ended elsewhere
                self._stop(job_id)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.control.lease_s / 4, 0.5))
            try:
                ended = await self.control.sweep()
            except Exception as exc:
                _log_failure("lease sweep", exc)
                await asyncio.sleep(MAINTENANCE_RETRY_S)
                continue
            for job_id in ended:
                log.warning("job failed: runner lost", job_id=job_id)
