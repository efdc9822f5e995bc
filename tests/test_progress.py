"""Tests for token-based progress (app/jobs/progress.py).

Expected values are derived from the contract's definition (tokens so far against the
tokens expected, weighted by each step's expected tokens), never copied from a run.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.jobs.progress import ProgressEstimator


class TestStepPct:
    def test_step_pct_is_tokens_over_expected(self) -> None:
        """pct is 100 * tokens / expected tokens while below the cap."""
        est = ProgressEstimator([200])
        est.start_step(0, now=0.0)
        est.add_tokens(50)
        assert est.estimate(1.0).pct == pytest.approx(100 * 50 / 200)
        assert est.tokens == 50

    def test_step_pct_stays_below_100_when_tokens_exceed_expectation(self) -> None:
        """A step that talks longer than expected stays below 100 until it completes."""
        est = ProgressEstimator([100])
        est.start_step(0, now=0.0)
        est.add_tokens(90)
        before = est.estimate(1.0).pct
        for _ in range(5):
            est.add_tokens(100)
            reading = est.estimate(2.0)
            assert reading.pct < 100
            assert reading.overall_pct < 100
            assert reading.pct >= before
        assert reading.tokens == 590

    def test_step_pct_is_exactly_100_after_completion(self) -> None:
        """Completing a step makes its pct exactly 100, however few tokens it produced."""
        est = ProgressEstimator([100, 100])
        est.start_step(0, now=0.0)
        est.add_tokens(3)
        est.complete_step()
        assert est.estimate(1.0).pct == 100.0

    def test_new_step_starts_from_zero(self) -> None:
        """start_step resets the step's pct and token count."""
        est = ProgressEstimator([10, 10])
        est.start_step(0, now=0.0)
        est.add_tokens(10)
        est.complete_step()
        est.start_step(1, now=1.0)
        reading = est.estimate(1.0)
        assert (reading.pct, reading.tokens) == (0.0, 0)


class TestOverallPct:
    def test_overall_is_weighted_by_expected_tokens(self) -> None:
        """A step's share of the overall percentage is its share of expected tokens."""
        est = ProgressEstimator([100, 300])
        est.start_step(0, now=0.0)
        est.add_tokens(50)
        assert est.estimate(1.0).overall_pct == pytest.approx(100 * 50 / 400)
        after_first = est.complete_step()
        assert after_first == pytest.approx(100 * 100 / 400)
        est.start_step(1, now=2.0)
        est.add_tokens(150)
        assert est.estimate(3.0).overall_pct == pytest.approx(100 * (100 + 150) / 400)

    def test_overall_is_100_exactly_after_the_last_step(self) -> None:
        """Completing the last step returns exactly 100."""
        est = ProgressEstimator([10, 20, 30])
        for index in range(3):
            est.start_step(index, now=float(index))
            est.add_tokens(5)
            overall = est.complete_step()
            assert (overall == 100.0) is (index == 2)
        assert est.overall_pct == 100.0

    def test_overall_below_100_when_last_step_weighs_almost_nothing(self) -> None:
        """Even when the other steps are ~all the weight, overall < 100 before the last ends."""
        est = ProgressEstimator([100_000, 1])
        est.start_step(0, now=0.0)
        est.add_tokens(100_000)
        assert est.complete_step() < 100
        est.start_step(1, now=1.0)
        est.add_tokens(50)
        assert est.estimate(2.0).overall_pct < 100
        assert est.complete_step() == 100.0

    def test_zero_expected_tokens_do_not_divide_by_zero(self) -> None:
        """Steps expecting 0 tokens still give finite, capped percentages."""
        est = ProgressEstimator([0, 0])
        est.start_step(0, now=0.0)
        est.add_tokens(3)
        reading = est.estimate(1.0)
        assert 0 <= reading.pct < 100
        assert 0 <= reading.overall_pct < 100


class TestEta:
    def test_eta_uses_the_observed_token_rate(self) -> None:
        """eta_s = tokens still expected / observed rate; job_eta_s adds later steps."""
        est = ProgressEstimator([100, 300])
        est.start_step(0, now=10.0)
        est.add_tokens(20)
        reading = est.estimate(12.0)  # 20 tokens in 2 s: 10 tokens/s
        assert reading.eta_s == pytest.approx((100 - 20) / 10)
        assert reading.job_eta_s == pytest.approx((100 - 20 + 300) / 10)

    def test_eta_follows_a_changing_rate(self) -> None:
        """A faster observed rate gives a proportionally shorter eta."""
        est = ProgressEstimator([1000])
        est.start_step(0, now=0.0)
        est.add_tokens(100)
        slow = est.estimate(10.0).eta_s  # 10 tokens/s
        est.add_tokens(400)
        fast = est.estimate(10.0).eta_s  # 50 tokens/s
        assert slow == pytest.approx(900 / 10)
        assert fast == pytest.approx(500 / 50)

    def test_eta_unknown_before_any_rate_is_observed(self) -> None:
        """Without tokens, or with no elapsed time, there is no rate and eta_s is None."""
        est = ProgressEstimator([100])
        est.start_step(0, now=5.0)
        assert est.estimate(6.0).eta_s is None
        est.add_tokens(10)
        assert est.estimate(5.0).eta_s is None

    def test_eta_is_zero_not_negative_past_expectation(self) -> None:
        """Once tokens exceed the expectation, the step eta is 0, never negative."""
        est = ProgressEstimator([10])
        est.start_step(0, now=0.0)
        est.add_tokens(30)
        assert est.estimate(1.0).eta_s == 0


# --- property ----------------------------------------------------------------------

TICK = st.tuples(
    st.integers(min_value=0, max_value=60),  # tokens this tick
    st.floats(min_value=0.0, max_value=3.0, allow_nan=False),  # seconds since last tick
)
STEP = st.tuples(
    st.integers(min_value=0, max_value=400),  # expected tokens
    st.lists(TICK, max_size=25),  # the token stream
)


@settings(max_examples=300, deadline=None)
@given(plan=st.lists(STEP, min_size=1, max_size=6), start=st.floats(0, 1e6))
def test_property_progress_is_monotonic_and_100_only_at_the_end(
    plan: list[tuple[int, list[tuple[int, float]]]], start: float
) -> None:
    """For random plans and token streams, percentages never drop and hit 100 only at the end."""
    est = ProgressEstimator([expected for expected, _ in plan])
    now = start
    overall = 0.0
    last = len(plan) - 1
    for index, (_, ticks) in enumerate(plan):
        est.start_step(index, now)
        pct = 0.0
        for count, dt in ticks:
            now += dt
            est.add_tokens(count)
            reading = est.estimate(now)
            assert reading.pct >= pct
            assert reading.overall_pct >= overall
            assert reading.pct < 100
            assert reading.overall_pct < 100
            assert reading.eta_s is None or reading.eta_s >= 0
            assert reading.job_eta_s is None or reading.job_eta_s >= (reading.eta_s or 0)
            pct, overall = reading.pct, reading.overall_pct
        completed = est.complete_step()
        assert completed >= overall
        assert (completed == 100.0) is (index == last)
        assert completed <= 100
        assert est.estimate(now).pct == 100.0
        overall = completed
        assert est.overall_pct == completed


class TestReportedPercentages:
    def test_a_reported_100_stays_below_100_until_the_step_completes(self) -> None:
        """A step reporting 100% shows 99 until it ends; step_completed then gives 100."""
        estimator = ProgressEstimator([100, 100])
        estimator.start_step(0, 0.0)
        estimator.set_pct(100.0)
        estimate = estimator.estimate(1.0)
        assert estimate.pct < 100.0
        assert estimate.overall_pct < 100.0
        estimator.complete_step()
        estimator.start_step(1, 1.0)
        estimator.set_pct(100.0)
        assert estimator.estimate(2.0).pct < 100.0
        assert estimator.complete_step() == 100.0
