"""The simulator: the model its docstring states, drawn on keyed streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oo_serving.core.features import feature_matrix
from oo_serving.sim.scenarios import preset
from oo_serving.sim.simulator import (
    MORNING_HOURS,
    Round,
    Simulator,
    response,
    theta_at,
)
from oo_serving.sim.streams import Stream, check_seed, generator, salt

LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
# A fine, evenly spread grid of "uniforms": the mean over it of a step function of one
# uniform is within 1/N of that function's exact expectation.
N = 20_000
GRID = (np.arange(N) + 0.5) / N


def rounds_of(sim: Simulator) -> list[Round]:
    s = sim.scenario
    return [sim.round(u, t) for u in range(s.users) for t in range(s.rounds)]


@pytest.mark.parametrize("utility", [-1.0, -0.8, -0.5, -0.26, 0.0, 0.1, 0.5, 0.75, 0.99, 1.0])
def test_graded_response_has_the_utility_as_mean_on_the_two_nearest_levels(utility: float) -> None:
    u = np.full(N, utility)
    r = response(u, branch=np.ones(N), level=GRID, noise=0.0)  # branch >= noise: graded
    assert abs(r.mean() - utility) <= 1.0 / N
    assert set(np.unique(r)) <= set(LEVELS)
    assert np.all(np.abs(r - utility) <= 0.5)


@pytest.mark.parametrize("utility", [-1.0, -0.3, 0.0, 0.6, 1.0])
def test_extreme_response_is_plus_or_minus_one_with_the_utility_as_mean(utility: float) -> None:
    u = np.full(N, utility)
    r = response(u, branch=np.zeros(N), level=GRID, noise=0.5)  # branch < noise: ±1
    assert abs(r.mean() - utility) <= 2.0 / N
    assert set(np.unique(r)) <= {-1.0, 1.0}


def test_noise_is_the_share_of_extreme_responses() -> None:
    u = np.full(N, 0.25)  # graded: 0 or 0.5; extreme: ±1
    r = response(u, branch=GRID, level=np.full(N, 0.3), noise=0.2)
    assert np.mean(np.abs(r) == 1.0) == pytest.approx(0.2, abs=1.0 / N)


def test_same_seed_same_world_and_another_seed_another() -> None:
    scenario = preset("realistic", users=4, rounds=5)
    a, b, c = (Simulator.create(scenario, s) for s in (3, 3, 4))
    for ra, rb, rc in zip(rounds_of(a), rounds_of(b), rounds_of(c), strict=True):
        assert ra.candidates == rb.candidates
        assert ra.context == rb.context
        np.testing.assert_array_equal(ra.utilities, rb.utilities)
        assert ra.draws == rb.draws
        assert ra.candidates != rc.candidates


def test_a_round_does_not_depend_on_the_order_rounds_are_drawn_in() -> None:
    sim = Simulator.create(preset("realistic", users=3, rounds=4), 11)
    forward = {(r.user, r.index): r for r in rounds_of(sim)}
    for u in reversed(range(3)):
        for t in reversed(range(4)):
            r = sim.round(u, t)
            assert r.candidates == forward[(u, t)].candidates
            assert r.context == forward[(u, t)].context
            assert r.draws == forward[(u, t)].draws


def test_users_do_not_depend_on_how_many_users_there_are() -> None:
    small = Simulator.create(preset("linear", users=2, rounds=3), 5)
    large = Simulator.create(preset("linear", users=7, rounds=3), 5)
    for u in range(2):
        np.testing.assert_array_equal(small.users[u].theta, large.users[u].theta)
        assert small.round(u, 2).candidates == large.round(u, 2).candidates


def test_rounds_are_what_score_receives() -> None:
    scenario = preset("realistic", users=20, rounds=20)
    rounds = rounds_of(Simulator.create(scenario, 1))
    for r in rounds:
        assert scenario.tasks_min <= len(r.candidates) <= scenario.tasks_max
        assert 0 <= r.context.hour_of_day <= 23
        assert 0 <= r.context.day_of_week <= 6
        assert r.utilities.shape == (len(r.candidates),)
        assert np.all(np.abs(r.utilities) <= 1.0)
        for c in r.candidates:
            assert c.hour_of_day == r.context.hour_of_day  # scored at the context's hour
            assert 1 <= c.priority <= 4
            assert c.task_age_days >= 0.0
    sizes = [len(r.candidates) for r in rounds]
    assert min(sizes) == scenario.tasks_min
    assert max(sizes) == scenario.tasks_max


def test_linear_utility_is_exactly_linear_in_linucb_v1_features() -> None:
    sim = Simulator.create(preset("linear", users=20, rounds=10), 2)
    for truth in sim.users:
        # |θ·x| <= a + Σ|w| <= 1 for every x: clipping never acts.
        assert math.hypot(*truth.theta[:2]) + np.abs(truth.theta[2:]).sum() <= 1.0 + 1e-12
    for r in rounds_of(sim):
        expected = feature_matrix(r.candidates) @ sim.users[r.user].theta
        np.testing.assert_allclose(r.utilities, expected, rtol=0, atol=1e-12)


def test_realistic_utility_is_the_documented_model() -> None:
    scenario = preset("realistic", users=20, rounds=10)
    sim = Simulator.create(scenario, 2)
    clipped = 0
    for r in rounds_of(sim):
        truth = sim.users[r.user]
        overdue = np.array([c.is_overdue for c in r.candidates], dtype=float)
        morning = r.context.hour_of_day in MORNING_HOURS
        mu = feature_matrix(r.candidates) @ truth.theta + truth.bias
        mu += scenario.overdue_morning * overdue * morning
        np.testing.assert_allclose(r.utilities, np.clip(mu, -1, 1), rtol=0, atol=1e-12)
        clipped += int(np.sum(np.abs(mu) > 1.0))
    assert clipped < 0.01 * sum(len(r.candidates) for r in rounds_of(sim))


def test_overdue_morning_effect_is_shared_and_only_in_the_morning() -> None:
    """Same seed, same draws: realistic − linear, within a round, is the shared effect."""
    users, rounds = 20, 20
    real = Simulator.create(preset("realistic", users=users, rounds=rounds), 9)
    lin = Simulator.create(preset("linear", users=users, rounds=rounds), 9)
    effect = real.scenario.overdue_morning
    shifts: dict[bool, list[float]] = {True: [], False: []}
    for r_real, r_lin in zip(rounds_of(real), rounds_of(lin), strict=True):
        assert r_real.candidates == r_lin.candidates
        overdue = np.array([c.is_overdue for c in r_real.candidates])
        if overdue.any() and (~overdue).any():
            gap = r_real.utilities - r_lin.utilities  # bias + effect · overdue · morning, clipped
            morning = r_real.context.hour_of_day in MORNING_HOURS
            shifts[morning].append(gap[overdue].mean() - gap[~overdue].mean())
    assert effect > 0
    assert len(shifts[True]) > 20
    assert len(shifts[False]) > 20
    # Clipping at ±1 only ever takes a little of the effect away.
    assert effect - 0.05 < np.mean(shifts[True]) <= effect
    assert abs(np.mean(shifts[False])) < 0.02


def test_ignored_share_is_ignore_prob_and_an_ignored_tip_rewards_zero() -> None:
    sim = Simulator.create(preset("realistic", users=50, rounds=40), 4)
    rounds = rounds_of(sim)
    ignored = np.array([r.draws.ignore < 0.3 for r in rounds])
    se = math.sqrt(0.3 * 0.7 / len(rounds))
    assert abs(ignored.mean() - 0.3) < 4 * se
    for r, was_ignored in zip(rounds, ignored, strict=True):
        rewards = {r.reward(i) for i in range(len(r.candidates))}
        if was_ignored:
            assert rewards == {0.0}
        assert rewards <= set(LEVELS)
    linear = Simulator.create(preset("linear", users=5, rounds=5), 4)
    assert all(r.ignore_prob == 0.0 for r in rounds_of(linear))


def test_reward_is_unbiased_for_the_utility_over_seeds() -> None:
    """Mean observed reward of a fixed candidate ≈ (1 − ignore_prob) · utility."""
    scenario = preset("realistic", users=40, rounds=40)
    residuals = []
    for seed in (1, 2):
        for r in rounds_of(Simulator.create(scenario, seed)):
            residuals.append(r.reward(0) - (1 - scenario.ignore_prob) * r.utilities[0])
    values = np.array(residuals)
    assert abs(values.mean()) < 4 * values.std(ddof=1) / math.sqrt(len(values))


def test_drift_moves_the_task_preferences_only() -> None:
    scenario = preset("drift", users=3, rounds=10)
    truth = Simulator.create(scenario, 1).users[0]
    np.testing.assert_array_equal(truth.theta[:2], truth.theta_next[:2])
    assert not np.array_equal(truth.theta[2:], truth.theta_next[2:])
    assert theta_at(scenario, truth, 4) is truth.theta
    assert theta_at(scenario, truth, 5) is truth.theta_next
    slow = preset("slow-drift", users=3, rounds=11)
    np.testing.assert_allclose(theta_at(slow, truth, 0), truth.theta, rtol=0, atol=1e-15)
    np.testing.assert_allclose(theta_at(slow, truth, 10), truth.theta_next, rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        theta_at(slow, truth, 5), (truth.theta + truth.theta_next) / 2, rtol=0, atol=1e-15
    )
    assert theta_at(preset("realistic", rounds=10), truth, 9) is truth.theta


def test_round_out_of_range_and_bad_seed_are_refused() -> None:
    sim = Simulator.create(preset("linear", users=2, rounds=2), 0)
    with pytest.raises(IndexError):
        sim.round(2, 0)
    with pytest.raises(IndexError):
        sim.round(0, -1)
    for bad in (-1, 2**32, True, 1.0):
        with pytest.raises(ValueError, match="seed"):
            check_seed(bad)  # type: ignore[arg-type]


def test_streams_are_keyed_and_fixed_length() -> None:
    def first(*key: int) -> float:
        return float(generator(*key).random())  # type: ignore[arg-type]

    assert first(1, Stream.ROUND, 2, 3) == first(1, Stream.ROUND, 2, 3, 0)
    assert first(1, Stream.ROUND, 2, 3) != first(1, Stream.RESPONSE, 2, 3)
    assert first(1, Stream.ROUND, 2, 3) != first(1, Stream.ROUND, 3, 2)
    # numpy pads entropy with zeros: every key has KEY_LENGTH words, so keys differing
    # in any word (a trailing 0 included) seed different generators.
    assert first(1, Stream.USER, 0, 0, 1) != first(1, Stream.USER, 0, 1, 0)
    with pytest.raises(ValueError, match="key"):
        generator(1, Stream.USER, -1)
    assert salt("uniform") == salt("uniform") != salt("linucb-v1")


def test_a_keyed_generator_is_numpys_default_generator_of_the_key() -> None:
    for key in [(0, 0, 0, 0, 0), (1, 2, 3, 4, 5), (2**32 - 1, 4, 99, 7, 2**31)]:
        np.testing.assert_array_equal(
            generator(*key).random(8),  # type: ignore[arg-type]
            np.random.default_rng(key).random(8),
        )


def test_a_round_draws_what_the_docstring_says_in_that_order() -> None:
    """Redrawn with numpy's own calls: hour, day, n, overdue, age, priority (choice with p)."""
    scenario = preset("realistic", users=3, rounds=6, priority_probs=(0.1, 0.0, 0.5, 0.4))
    sim = Simulator.create(scenario, 8)
    for u in range(3):
        for t in range(6):
            rng = np.random.default_rng((8, int(Stream.ROUND), u, t, 0))
            habit = sim.users[u].habit_hour
            hour = round(habit + scenario.hour_sd * float(rng.standard_normal())) % 24
            day = int(rng.integers(0, 7))
            n = int(rng.integers(scenario.tasks_min, scenario.tasks_max + 1))
            overdue = rng.random(n) < scenario.overdue_prob
            age = np.floor(rng.exponential(scenario.mean_age_days, n))
            priority = 1 + rng.choice(4, size=n, p=scenario.priority_probs)
            rnd = sim.round(u, t)
            assert rnd.context == (hour, day)
            assert [c.is_overdue for c in rnd.candidates] == overdue.tolist()
            assert [c.task_age_days for c in rnd.candidates] == age.tolist()
            assert [c.priority for c in rnd.candidates] == priority.tolist()
            assert all(
                type(c.priority) is int and type(c.is_overdue) is bool for c in rnd.candidates
            )


def test_the_reward_of_a_shown_tip_is_the_response_function_exactly() -> None:
    sim = Simulator.create(preset("realistic", users=20, rounds=20, noise=0.4), 6)
    checked = 0
    for r in rounds_of(sim):
        expected = response(
            r.utilities, np.full(len(r.candidates), r.draws.branch),
            np.full(len(r.candidates), r.draws.level), r.noise,
        )  # fmt: skip
        for i in range(len(r.candidates)):
            assert r.reward(i) == (0.0 if r.ignored else expected[i])
            checked += not r.ignored
    assert checked > 1000
