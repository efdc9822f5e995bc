"""Token-based progress: per-step and overall percentages, and time estimates.

A step's percentage is its tokens so far against the tokens it is expected to produce,
capped below 100 until the step really ends (a model may talk longer than expected).
A step may instead report its percentage itself (:meth:`ProgressEstimator.set_pct`, a
worker's ``report.progress(pct)`` or a producer's ``progress`` event): from then on that
figure is the step's percentage, and tokens only feed the counts.

The overall percentage weights each step by its expected tokens; a step whose expected
tokens are unknown (``None``, an external job's step that declared none) weighs as much
as the average known step (all weigh the same when none is known), and its percentage
moves only with reported percentages and its completion. Both percentages only ever go
up. The ETA divides the tokens still expected by the token rate observed in this step,
or, once the step reports percentages, the percentage left by the percentage rate.

The state is a handful of numbers (attrs fields), so it can be saved as JSON with
:meth:`ProgressEstimator.to_json` and restored with :meth:`ProgressEstimator.from_json`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

__all__ = ["ProgressEstimate", "ProgressEstimator"]

STEP_CAP_PCT = 99.0
JOB_CAP_PCT = 99.9


@attrs.frozen
class ProgressEstimate:
    """One reading of the estimator."""

    pct: float
    overall_pct: float
    tokens: int
    eta_s: float | None
    job_eta_s: float | None


def _expected_list(value: Sequence[int | None]) -> tuple[int | None, ...]:
    return tuple(value)


@attrs.define
class ProgressEstimator:
    """Tracks a job's progress through its steps, weighted by expected tokens."""

    expected_tokens: tuple[int | None, ...] = attrs.field(converter=_expected_list)
    _index: int = -1
    _tokens: int = 0
    _started_at: float = 0.0
    _pct: float = 0.0
    _overall: float = 0.0
    _done_weight: float = 0.0
    #: The step's own reported percentage, once it reported one.
    _reported_pct: float | None = None

    @property
    def _default_weight(self) -> int:
        known = [max(e, 1) for e in self.expected_tokens if e is not None]
        return max(round(sum(known) / len(known)), 1) if known else 1

    def _expected(self, index: int) -> int:
        expected = self.expected_tokens[index]
        return self._default_weight if expected is None else max(expected, 1)

    @property
    def _total(self) -> int:
        return max(sum(self._expected(i) for i in range(len(self.expected_tokens))), 1)

    @property
    def overall_pct(self) -> float:
        """The overall percentage as last reported."""
        return self._overall

    @property
    def index(self) -> int:
        """The current step's index (-1 before the first step)."""
        return self._index

    def start_step(self, index: int, now: float) -> None:
        """Begin step ``index`` (0-based) at time ``now`` (seconds, any steady clock)."""
        self._index, self._tokens, self._started_at, self._pct = index, 0, now, 0.0
        self._reported_pct = None
        self._done_weight = sum(self._expected(i) for i in range(index)) / self._total

    def add_tokens(self, count: int) -> None:
        """Count ``count`` more tokens in the current step."""
        self._tokens += count

    def set_tokens(self, count: int) -> None:
        """Replace the current step's count with the source's own (a provider's ``usage``).

        The percentages still never decrease, even if ``count`` is below the pieces seen.
        """
        self._tokens = max(count, 0)

    def set_pct(self, pct: float) -> None:
        """The step reports its own percentage (0-100); it replaces the token estimate.

        A value below one already reported does not lower the step's percentage.
        """
        pct = min(max(pct, 0.0), 100.0)
        self._reported_pct = max(self._reported_pct or 0.0, pct)

    @property
    def reported_pct(self) -> float | None:
        """The step's own reported percentage, if it reported one."""
        return self._reported_pct

    @property
    def tokens(self) -> int:
        """Tokens counted in the current step."""
        return self._tokens

    def step_pct(self) -> float:
        """The current step's percentage now (rounded to 0.1, never below the last one)."""
        if self._reported_pct is not None:
            # A step reporting 100 is not done until it ends: the contract keeps 100 for
            # step_completed.
            raw = min(self._reported_pct, STEP_CAP_PCT)
        elif self.expected_tokens[self._index] is None:
            raw = 0.0
        else:
            raw = min(100.0 * self._tokens / self._expected(self._index), STEP_CAP_PCT)
        return max(self._pct, round(raw, 1))

    def estimate(self, now: float) -> ProgressEstimate:
        """The current estimate; percentages never decrease between calls."""
        expected = self._expected(self._index)
        self._pct = self.step_pct()
        overall = 100.0 * (self._done_weight + self._pct / 100.0 * expected / self._total)
        self._overall = max(self._overall, round(min(overall, JOB_CAP_PCT), 1))
        later = sum(self._expected(i) for i in range(self._index + 1, len(self.expected_tokens)))
        elapsed = now - self._started_at
        eta_s = job_eta_s = None
        if self._reported_pct is not None:
            if elapsed > 0 and self._pct > 0:
                step_s = elapsed * 100.0 / self._pct  # the whole step at this pace
                eta_s = round(max(step_s - elapsed, 0.0), 2)
                job_eta_s = round(eta_s + step_s * later / expected, 2)
        elif self.expected_tokens[self._index] is not None:
            rate = self._tokens / elapsed if elapsed > 0 and self._tokens else 0.0
            if rate > 0:
                left = max(expected - self._tokens, 0)
                eta_s = round(left / rate, 2)
                job_eta_s = round((left + later) / rate, 2)
        return ProgressEstimate(self._pct, self._overall, self._tokens, eta_s, job_eta_s)

    def complete_step(self) -> float:
        """End the current step; returns the overall percentage after it (100 after the last)."""
        done = sum(self._expected(i) for i in range(self._index + 1)) / self._total
        last = self._index == len(self.expected_tokens) - 1
        overall = 100.0 if last else min(round(100.0 * done, 1), JOB_CAP_PCT)
        self._overall = max(self._overall, overall)
        self._pct = 100.0
        return self._overall

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-able dict (see :meth:`from_json`)."""
        data = {a.alias or a.name: getattr(self, a.name) for a in attrs.fields(ProgressEstimator)}
        return data | {"expected_tokens": list(self.expected_tokens)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProgressEstimator:
        """The estimator saved by :meth:`to_json`."""
        return cls(**data)
