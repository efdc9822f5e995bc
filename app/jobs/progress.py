"""Token-based progress: per-step and overall percentages, and time estimates.

A step's percentage is its tokens so far against the tokens it is expected to produce,
capped below 100 until the step really ends (a model may talk longer than expected).
The overall percentage weights each step by its expected tokens. Both only ever go up.
The ETA divides the tokens still expected by the token rate observed in this step.
"""

from __future__ import annotations

from collections.abc import Sequence

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


@attrs.define
class ProgressEstimator:
    """Tracks a job's progress through its steps, weighted by expected tokens."""

    expected_tokens: Sequence[int]
    _index: int = -1
    _tokens: int = 0
    _started_at: float = 0.0
    _pct: float = 0.0
    _overall: float = 0.0
    _done_weight: float = 0.0

    @property
    def _total(self) -> int:
        return max(sum(max(e, 1) for e in self.expected_tokens), 1)

    def _expected(self, index: int) -> int:
        return max(self.expected_tokens[index], 1)

    @property
    def overall_pct(self) -> float:
        """The overall percentage as last reported."""
        return self._overall

    def start_step(self, index: int, now: float) -> None:
        """Begin step ``index`` (0-based) at loop time ``now``."""
        self._index, self._tokens, self._started_at, self._pct = index, 0, now, 0.0
        self._done_weight = sum(self._expected(i) for i in range(index)) / self._total

    def add_tokens(self, count: int) -> None:
        """Count ``count`` more tokens in the current step."""
        self._tokens += count

    def set_tokens(self, count: int) -> None:
        """Replace the current step's count with the source's own (a provider's ``usage``).

        The percentages still never decrease, even if ``count`` is below the pieces seen.
        """
        self._tokens = max(count, 0)

    @property
    def tokens(self) -> int:
        """Tokens counted in the current step."""
        return self._tokens

    def estimate(self, now: float) -> ProgressEstimate:
        """The current estimate; percentages never decrease between calls."""
        expected = self._expected(self._index)
        raw = 100.0 * self._tokens / expected
        self._pct = max(self._pct, round(min(raw, STEP_CAP_PCT), 1))
        overall = 100.0 * (self._done_weight + self._pct / 100.0 * expected / self._total)
        self._overall = max(self._overall, round(min(overall, JOB_CAP_PCT), 1))
        elapsed = now - self._started_at
        rate = self._tokens / elapsed if elapsed > 0 and self._tokens else 0.0
        eta_s = job_eta_s = None
        if rate > 0:
            left = max(expected - self._tokens, 0)
            later = sum(
                self._expected(i) for i in range(self._index + 1, len(self.expected_tokens))
            )
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
