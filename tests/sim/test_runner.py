"""The runner: common random numbers, baselines with known regret, and a learner that learns.

Sizes are small (30 users × 40 rounds); every bound is one a broken learner, a broken
simulator or a broken pairing of draws would miss by far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from oo_serving.core.features import TaskFeatures
from oo_serving.core.linucb_v1 import LinUCBV1
from oo_serving.sim.policies import AnyPolicy, Oracle, PolicySim, Uniform
from oo_serving.sim.runner import ARRIVALS, RunResult, arrival_order, check_arrival, run
from oo_serving.sim.scenarios import Scenario, preset
from oo_serving.sim.simulator import Context, Simulator

USERS, ROUNDS = 30, 40
SEEDS = (1, 2, 3, 4, 5)
FRESH_SEEDS = (101, 102, 103, 104, 105)  # not looked at while the simulator was written

History = tuple[tuple[Context, tuple[TaskFeatures, ...]], ...]  # a user's rounds, as seen


@dataclass(frozen=True)
class Recorder:
    """Shows candidate 0, or the last one when `alternate` and the round has odd n.

    Its state is a list (one per user) it appends to: per round [context, candidates,
    chosen], and then the reward when one is learned.
    """

    name: str
    alternate: bool = False
    states: list[list[Any]] = field(default_factory=list)

    def initial_state(self) -> list[Any]:
        state: list[Any] = []
        self.states.append(state)
        return state

    def initial_population(self) -> None:
        return None

    def choose(
        self,
        state: list[Any],
        population: None,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        chosen = len(candidates) - 1 if self.alternate and len(candidates) % 2 else 0
        state.append([context, tuple(candidates), chosen])
        return chosen

    def update(
        self, state: list[Any], chosen: TaskFeatures, context: Context, reward: float
    ) -> list[Any]:
        state[-1].append(reward)
        return state

    def pool(self, population: None, chosen: TaskFeatures, context: Context, reward: float) -> None:
        return None

    def refresh(self, population: None) -> None:
        return None


def small(name: str, **changes: Any) -> Scenario:
    return preset(name, **{"users": USERS, "rounds": ROUNDS, **changes})


@pytest.fixture(scope="module")
def linear_run() -> RunResult:
    return run(
        small("linear"), [Uniform(), PolicySim(LinUCBV1()), Oracle()], SEEDS, baseline="uniform"
    )


@pytest.fixture(scope="module")
def drift_runs() -> tuple[RunResult, RunResult]:
    policies: list[AnyPolicy] = [PolicySim(LinUCBV1())]
    return run(small("drift"), policies, SEEDS), run(small("realistic"), policies, SEEDS)


def test_result_shapes_and_cumulative(linear_run: RunResult) -> None:
    assert linear_run.policies == ("uniform", "linucb-v1", "oracle")
    assert linear_run.seeds == SEEDS
    for name in linear_run.policies:
        assert linear_run.instant[name].shape == (len(SEEDS), USERS, ROUNDS)
        assert linear_run.cumulative[name].shape == (len(SEEDS), ROUNDS)
        assert np.all(linear_run.instant[name] >= 0.0)
        assert np.all(np.diff(linear_run.cumulative[name], axis=1) >= 0.0)
        np.testing.assert_allclose(
            linear_run.cumulative[name][:, -1], linear_run.instant[name].sum(axis=(1, 2))
        )


def test_same_seed_same_regret_other_seed_other() -> None:
    scenario = small("realistic", users=10)
    policies: list[AnyPolicy] = [Uniform(), PolicySim(LinUCBV1())]
    a, b = run(scenario, policies, (7, 8)), run(scenario, policies, (7, 8))
    c = run(scenario, policies, (9,))
    for name in ("uniform", "linucb-v1"):
        np.testing.assert_array_equal(a.instant[name], b.instant[name])
        np.testing.assert_array_equal(a.cumulative[name], b.cumulative[name])
        assert not np.array_equal(a.instant[name][0], c.instant[name][0])
        assert not np.array_equal(a.instant[name][0], a.instant[name][1])


def test_a_policy_measures_the_same_whatever_runs_beside_it(linear_run: RunResult) -> None:
    # Seeds are independent runs, so two of the five are enough to compare.
    alone = run(small("linear"), [PolicySim(LinUCBV1())], SEEDS[:2])
    np.testing.assert_array_equal(alone.instant["linucb-v1"], linear_run.instant["linucb-v1"][:2])
    alone = run(small("linear"), [Uniform()], SEEDS[:2])
    np.testing.assert_array_equal(alone.instant["uniform"], linear_run.instant["uniform"][:2])


def test_what_a_user_sees_does_not_depend_on_the_policy_or_the_arrival_order() -> None:
    scenario = small("realistic", users=8, rounds=12)
    seeds = (3,)
    sim = Simulator.create(scenario, 3)
    expected = sorted(
        (
            tuple((sim.round(u, t).context, sim.round(u, t).candidates) for t in range(12))
            for u in range(8)
        ),
        key=repr,
    )
    seen: list[list[History]] = []
    for arrival in ARRIVALS:
        for alternate in (False, True):
            recorder = Recorder(name="recorder", alternate=alternate)
            policies: list[AnyPolicy] = [Uniform(), recorder]
            run(scenario, policies, seeds, arrival=arrival)
            histories: list[History] = [
                tuple((h[0], h[1]) for h in history) for history in recorder.states
            ]
            seen.append(sorted(histories, key=repr))
    assert all(s == expected for s in seen)


def test_the_same_task_gets_the_same_reward_whatever_was_chosen_before() -> None:
    scenario = small("realistic", users=8, rounds=30)
    first, alternating = Recorder(name="first"), Recorder(name="alternating", alternate=True)
    run(scenario, [first, alternating], (5,), arrival="shuffled")
    same = differ = ignored = 0
    for a, b in zip(first.states, alternating.states, strict=True):
        for seen_a, seen_b in zip(a, b, strict=True):
            assert seen_a[:2] == seen_b[:2]
            # Ignored in the same rounds, whatever was shown: then no reward is learned.
            assert len(seen_a) == len(seen_b)
            if len(seen_a) == 3:
                ignored += 1
            elif seen_a[2] == seen_b[2]:
                assert seen_a[3] == seen_b[3]
                same += 1
            else:
                differ += 1
    assert same > 50
    assert differ > 50
    assert ignored > 20  # 30% of 240 rounds


def test_arrival_order_changes_no_figure_without_a_population() -> None:
    """Per-user states only: users are independent, whatever order they come in.
    (With a population it does change the figures: test_policies.py.)"""
    scenario = small("realistic", users=10, rounds=20)
    policies: list[AnyPolicy] = [Uniform(), PolicySim(LinUCBV1()), Oracle()]
    arrivals = [*ARRIVALS, "cohorts:3"]
    results = [run(scenario, policies, (2, 3), arrival=a) for a in arrivals]
    for r in results[1:]:
        for name in ("uniform", "linucb-v1", "oracle"):
            np.testing.assert_array_equal(r.instant[name], results[0].instant[name])


@pytest.mark.parametrize("arrival", [*ARRIVALS, "cohorts:1", "cohorts:3", "cohorts:4", "cohorts:9"])
def test_arrival_orders_visit_every_round_once_in_each_users_order(arrival: Any) -> None:
    order = list(arrival_order(arrival, 4, 6, seed=1))
    assert sorted(order) == [(u, t) for u in range(4) for t in range(6)]
    for u in range(4):
        assert [t for v, t in order if v == u] == list(range(6))
    if arrival == "shuffled":
        assert order == list(arrival_order(arrival, 4, 6, seed=1))
        assert order != list(arrival_order(arrival, 4, 6, seed=2))
        assert order != list(arrival_order("round-robin", 4, 6, seed=1))


def test_cohorts_arrive_k_at_a_time_each_cohort_round_by_round() -> None:
    order = list(arrival_order("cohorts:2", users=5, rounds=3, seed=1))
    assert order == [
        (0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2),
        (2, 0), (3, 0), (2, 1), (3, 1), (2, 2), (3, 2),
        (4, 0), (4, 1), (4, 2),
    ]  # fmt: skip
    # The service's setting: 100 users, 8 at a time; users 8..15 start when 0..7 are done.
    order = list(arrival_order("cohorts:8", users=100, rounds=10, seed=1))
    assert order[:9] == [*((u, 0) for u in range(8)), (0, 1)]
    assert order[80:82] == [(8, 0), (9, 0)]
    assert order[-4:] == [(96, 9), (97, 9), (98, 9), (99, 9)]
    assert order[-40:-36] == [(96, 0), (97, 0), (98, 0), (99, 0)]  # a last cohort of 4
    # One at a time is user by user; all at once (or more) is round-robin.
    for k, same_as in ((1, "user-by-user"), (5, "round-robin"), (50, "round-robin")):
        assert list(arrival_order(f"cohorts:{k}", 5, 3, seed=1)) == list(
            arrival_order(same_as, 5, 3, seed=1)
        )


@pytest.mark.parametrize(
    "arrival", ["cohorts:0", "cohorts:", "cohorts:x", "cohorts:-1", "cohorts:1.5", "cohorts", "8"]
)
def test_bad_arrivals_are_refused_naming_the_choices(arrival: str) -> None:
    with pytest.raises(ValueError, match="round-robin, user-by-user, shuffled or cohorts:K"):
        check_arrival(arrival)


def test_cohorts_are_spelled_one_way() -> None:
    assert check_arrival("cohorts:08") == "cohorts:8"
    result = run(small("linear", users=3, rounds=2), [Uniform()], (1,), arrival="cohorts:02")
    assert result.arrival == "cohorts:2"
    assert (result.refresh_every, result.ignored) == (100, "no-reward")
    assert dict(result.settings["uniform"]) == {}


def test_oracle_regret_is_exactly_zero(linear_run: RunResult) -> None:
    assert np.all(linear_run.instant["oracle"] == 0.0)
    assert linear_run.summary.overall.total["oracle"].mean == 0.0


def test_uniform_regret_is_linear_at_its_analytic_rate(linear_run: RunResult) -> None:
    """Per round, E[regret | candidates] = max utility − mean utility; in every quarter."""
    realised = linear_run.instant["uniform"]
    expected = np.zeros_like(realised)
    for i, seed in enumerate(SEEDS):
        sim = Simulator.create(linear_run.scenario, seed)
        for u in range(USERS):
            for t in range(ROUNDS):
                utilities = sim.round(u, t).utilities
                expected[i, u, t] = utilities.max() - utilities.mean()
    for quarter in np.split(np.arange(ROUNDS), 4):
        # Given the candidates, the uniform's choices are independent draws.
        deviation = (realised - expected)[:, :, quarter].ravel()
        se = deviation.std(ddof=1) / math.sqrt(deviation.size)
        assert abs(deviation.mean()) < 4 * se
        assert expected[:, :, quarter].mean() > 0.1  # every quarter adds regret
        # Linear growth: no quarter's rate departs from the run's rate. Paired by user,
        # (seed, user) the independent unit, so users' differences cancel.
        unit = realised[:, :, quarter].mean(axis=2) - realised.mean(axis=2)
        se = unit.std(ddof=1) / math.sqrt(unit.size)
        assert abs(unit.mean()) < 4 * se


@pytest.mark.parametrize("seeds", [SEEDS, FRESH_SEEDS], ids=["seeds 1-5", "seeds 101-105"])
def test_linucb_v1_beats_uniform_widely_on_linear(
    seeds: tuple[int, ...], linear_run: RunResult
) -> None:
    if seeds == SEEDS:
        result = linear_run  # exactly this run, already made
    else:
        result = run(small("linear"), [Uniform(), PolicySim(LinUCBV1())], seeds, baseline="uniform")
    totals = {name: result.cumulative[name][:, -1] for name in result.policies}
    assert np.all(totals["linucb-v1"] < 0.6 * totals["uniform"])  # on every seed
    versus = result.summary.overall.versus["linucb-v1"]
    assert versus.relative.mean + 4 * versus.relative.se < -0.4
    # And it is learning: its last quarter is far better than its first.
    per_round = result.instant["linucb-v1"].sum(axis=1)
    assert per_round[:, -ROUNDS // 4 :].mean() < 0.6 * per_round[:, : ROUNDS // 4].mean()


def test_drift_hurts_linucb_v1_and_no_drift_does_not(
    drift_runs: tuple[RunResult, RunResult],
) -> None:
    """Regret per round after the change exceeds that just before it; without drift, not."""
    half, eighth = ROUNDS // 2, ROUNDS // 8
    slopes = {}
    for result in drift_runs:
        per_round = result.instant["linucb-v1"].sum(axis=1)  # (seeds, rounds)
        before = per_round[:, half - eighth : half].mean(axis=1)  # first half's last quarter
        after = per_round[:, half:].mean(axis=1)  # second half
        slopes[result.scenario.name] = (before, after)
    before, after = slopes["drift"]
    assert after.mean() > 1.2 * before.mean()
    before, after = slopes["realistic"]
    assert np.all(after < before)  # still learning: regret per round keeps falling
    # Before the change both scenarios are the same world, so the same regret.
    np.testing.assert_array_equal(
        drift_runs[0].instant["linucb-v1"][:, :, :half],
        drift_runs[1].instant["linucb-v1"][:, :, :half],
    )


def test_a_policy_that_chooses_outside_the_candidates_is_refused() -> None:
    @dataclass(frozen=True)
    class OutOfRange(Uniform):
        name: str = "out-of-range"

        def choose(
            self,
            state: None,
            population: None,
            candidates: Sequence[TaskFeatures],
            context: Context,
            rng: np.random.Generator,
        ) -> int:
            return len(candidates)

    with pytest.raises(ValueError, match="out-of-range chose"):
        run(small("linear", users=2, rounds=2), [OutOfRange()], (1,))


@pytest.mark.parametrize(
    ("policies", "seeds", "changes", "message"),
    [
        ([], (1,), {}, "no policies"),
        ([Uniform(), Uniform()], (1,), {}, "distinct"),
        ([Uniform()], (), {}, "no seeds"),
        ([Uniform()], (1, 1), {}, "distinct"),
        ([Uniform()], (-1,), {}, "seed"),
        ([Uniform()], (1,), {"arrival": "eight-at-a-time"}, "arrival"),
        ([Uniform()], (1,), {"baseline": "linucb-v1"}, "baseline"),
        ([Uniform()], (1,), {"cold_start_rounds": 0}, "cold_start_rounds"),
        ([Uniform()], (1,), {"refresh_every": 0}, "refresh_every"),
        ([Uniform()], (1,), {"refresh_every": 1.5}, "refresh_every"),
        ([Uniform()], (1,), {"ignored": "skip"}, "ignored"),
    ],
)
def test_bad_runs_are_refused(
    policies: list[AnyPolicy], seeds: tuple[int, ...], changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run(small("linear", users=2, rounds=2), policies, seeds, **changes)
