"""The retained-bytes budget: what each job this process keeps counts, and who goes first.

Every job this process created and still keeps counts against ``max_bytes``
(``FLUSHLINE_MAX_RETAINED_BYTES``): its input and options, a fixed part for its snapshot
and steps, and, while it runs, a reservation of ``history_bytes`` (the most its history
can hold, ``FLUSHLINE_MAX_HISTORY_BYTES``) and of the text its plan's tokens make
(gathered into its result), replaced when it ends by what it keeps (its history, capped
as the bus caps it, and its result). Finished jobs are forgotten in the order they ended.

The budget only counts; :class:`~app.jobs.retention.Retention` decides, forgets (in the
store and the bus) and refuses.
"""

from __future__ import annotations

import time

import attrs

from app.bus.local import event_cost
from app.core.events import DoneEvent, EncodedEvent

__all__ = ["JOB_BASE_BYTES", "RESULT_BYTES_PER_TOKEN", "STEP_BYTES", "KeptJob", "RetainedBudget"]

#: What a kept job costs beyond its input, options, history and result: its snapshots,
#: ids and stamps, its bus log and the manager's records of it.
JOB_BASE_BYTES = 2_048
#: What each step adds to a kept job (a ``StepState`` in every snapshot).
STEP_BYTES = 160
#: What a running job reserves per token its plan expects, for the text it gathers into
#: its result (the demo's words average under 7 bytes with their space).
RESULT_BYTES_PER_TOKEN = 8


@attrs.define(eq=False)
class KeptJob:
    """What one job this process created counts against the budget."""

    #: The snapshot, steps, input and options: known when the job is created.
    fixed: int
    #: What its result may hold, from the tokens its plan expects (reserved while it runs).
    expected_result: int = 0
    running: bool = True
    #: The cost of every event published (the bus keeps the newest within its budget).
    published: int = 0
    last_event: int = 0
    result: int = 0
    #: When it ended (Unix seconds), for expiry.
    finished_at: float | None = None

    def size(self, history_bytes: int) -> int:
        """Its bytes now; while running, a reservation: a full history, the expected result."""
        if self.running:
            return self.fixed + history_bytes + self.expected_result
        # The bus keeps the newest events within the budget, and always the newest one.
        history = min(self.published, history_bytes + self.last_event)
        return self.fixed + history + self.result


@attrs.define(eq=False)
class RetainedBudget:
    """The kept jobs' bytes against ``max_bytes``, and the order finished ones go in."""

    max_bytes: int
    history_bytes: int
    #: Every job counted, and its bytes together.
    _kept: dict[str, KeptJob] = attrs.Factory(dict)
    #: The ids of those that have ended, in the order they ended (the eviction order).
    _finished: dict[str, None] = attrs.Factory(dict)
    retained: int = 0
    #: The part of ``retained`` that running jobs reserve (no eviction can free it).
    reserved: int = 0

    def fits(self, kept: KeptJob) -> bool:
        """Whether ``kept`` fits now (a job alone may pass the budget: nothing could help)."""
        return not self._kept or self.retained + kept.size(self.history_bytes) <= self.max_bytes

    def running_fill(self, kept: KeptJob) -> bool:
        """Whether running jobs alone leave no room for ``kept`` (forgetting cannot help)."""
        needed = kept.size(self.history_bytes)
        return self.reserved > 0 and self.reserved + needed > self.max_bytes

    def over(self) -> bool:
        """Whether what is kept passes the budget (a result larger than its reservation)."""
        return self.retained > self.max_bytes

    def oldest_finished(self, keep: str | None = None) -> str | None:
        """The job that ended first (but ``keep``), or None."""
        return next((job_id for job_id in self._finished if job_id != keep), None)

    def add(self, job_id: str, kept: KeptJob) -> None:
        """Count a new (running) job."""
        needed = kept.size(self.history_bytes)
        self._kept[job_id] = kept
        self.retained += needed
        self.reserved += needed

    def published(self, job_id: str, encoded: EncodedEvent) -> None:
        """A running job published ``encoded`` (what it will keep once it ends)."""
        kept = self._kept.get(job_id)
        if kept is None or not kept.running:  # once settled, its size must not move
            return
        kept.last_event = event_cost(encoded)
        kept.published += kept.last_event
        if isinstance(encoded.event, DoneEvent):
            kept.result = len(encoded.frame)  # the result's JSON, and a little more

    def settle(self, job_id: str) -> None:
        """The job has ended: it counts what it keeps instead of its reservation."""
        kept = self._kept.get(job_id)
        if kept is None or not kept.running:
            return
        before = kept.size(self.history_bytes)
        kept.running = False
        kept.finished_at = time.time()
        self._finished[job_id] = None
        self.retained += kept.size(self.history_bytes) - before
        self.reserved -= before

    def remove(self, job_id: str) -> None:
        """Stop counting the job (forgotten, or never started)."""
        kept = self._kept.pop(job_id, None)
        self._finished.pop(job_id, None)
        if kept is not None:
            size = kept.size(self.history_bytes)
            self.retained -= size
            if kept.running:
                self.reserved -= size

    def finished_before(self, cutoff: float) -> list[str]:
        """The counted jobs that ended before ``cutoff`` (Unix seconds), oldest first."""
        out = []
        for job_id in self._finished:
            finished_at = self._kept[job_id].finished_at
            if finished_at is None or finished_at >= cutoff:
                break  # in the order they ended: the rest ended later
            out.append(job_id)
        return out
