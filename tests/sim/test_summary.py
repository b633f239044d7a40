"""Paired comparisons over seeds, against closed-form answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oo_serving.core.linucb_v1 import LinUCBV1
from oo_serving.sim.policies import Oracle, PolicySim, Uniform
from oo_serving.sim.runner import run
from oo_serving.sim.scenarios import preset
from oo_serving.sim.summary import Estimate, compare, estimate, summarize


def test_estimate_is_mean_and_standard_error() -> None:
    assert estimate(np.array([1.0, 3.0])) == Estimate(mean=2.0, se=1.0)  # sd √2, n 2
    e = estimate(np.array([2.0, 4.0, 9.0]))
    assert e.mean == pytest.approx(5.0)
    assert e.se == pytest.approx(math.sqrt(13.0 / 3.0))  # sd² = (9 + 1 + 16) / 2
    assert math.isnan(estimate(np.array([4.0])).se)
    with pytest.raises(ValueError, match="no values"):
        estimate(np.array([]))


def test_compare_closed_form() -> None:
    p, b = np.array([2.0, 4.0]), np.array([4.0, 8.0])
    c = compare("p", "b", p, b)
    assert c.difference == Estimate(mean=-3.0, se=1.0)  # d = (−2, −4)
    assert c.relative.mean == -0.5  # R = 3 / 6
    assert c.relative.se == 0.0  # p − R·b = 0 on every seed
    # Delta method by hand: R = 3.5 / 4 = 7/8, p − R·b = (4 − 1.75, 3 − 5.25) = (2.25, −2.25),
    # sd = 2.25 √2, SE = sd / (√2 · B̄) = 2.25 / 4.
    c = compare("p", "b", np.array([4.0, 3.0]), np.array([2.0, 6.0]))
    assert c.relative.mean == pytest.approx(-1.0 / 8.0)
    assert c.relative.se == pytest.approx(9.0 / 16.0)
    zero = compare("p", "oracle", np.array([1.0, 2.0]), np.zeros(2))
    assert math.isnan(zero.relative.mean)
    assert math.isnan(zero.relative.se)
    with pytest.raises(ValueError, match="shape"):
        compare("p", "b", np.ones(2), np.ones(3))


def test_run_summary_has_finite_positive_ses_and_self_comparison_is_exactly_zero() -> None:
    scenario = preset("realistic", users=10, rounds=15)
    result = run(
        scenario, [PolicySim(LinUCBV1()), Uniform(), Oracle()], (1, 2, 3), baseline="uniform"
    )
    summary = result.summary
    assert summary.baseline == "uniform"
    assert (summary.overall.rounds, summary.cold_start.rounds) == (15, 10)
    for window in (summary.overall, summary.cold_start):
        for name in ("linucb-v1", "uniform"):
            assert math.isfinite(window.total[name].se)
            assert window.total[name].se > 0
        versus = window.versus["linucb-v1"]
        for e in (versus.difference, versus.relative):
            assert math.isfinite(e.se)
            assert e.se > 0
        itself = window.versus["uniform"]
        assert itself.difference == Estimate(mean=0.0, se=0.0)
        assert itself.relative == Estimate(mean=0.0, se=0.0)
        assert window.versus["oracle"].relative.mean == -1.0
    # Cold start is each user's first 10 rounds, summed over users, per seed.
    cold = result.instant["linucb-v1"][:, :, :10].sum(axis=(1, 2))
    assert summary.cold_start.total["linucb-v1"].mean == pytest.approx(cold.mean())
    # Another baseline, from the same regrets.
    again = result.against("linucb-v1")
    assert again.overall.versus["linucb-v1"].difference == Estimate(mean=0.0, se=0.0)
    assert again.overall.versus["uniform"].difference.mean == pytest.approx(
        -summary.overall.versus["linucb-v1"].difference.mean
    )


def test_one_seed_gives_nan_ses_and_a_window_longer_than_the_run_is_the_run() -> None:
    result = run(preset("linear", users=3, rounds=5), [Uniform(), PolicySim(LinUCBV1())], (1,))
    assert math.isnan(result.summary.overall.total["uniform"].se)
    assert result.summary.cold_start.rounds == 5
    with pytest.raises(ValueError, match="baseline"):
        summarize(result.instant, "nope", 10)
