"""Core policies in the simulator: exactly what the service runs, population and all.

Each check compares the runner with a loop written out by hand from the core's own
functions, on small worlds (a few users, a few rounds): any difference, however small,
is a difference in what was chosen, so equality is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from oo_serving.core import linucb, registry
from oo_serving.core.features import TaskFeatures, feature_matrix, feature_vector
from oo_serving.core.linucb import LinUCBParams
from oo_serving.core.linucb_v1 import LinUCBV1
from oo_serving.core.linucb_v2 import LinUCBV2
from oo_serving.core.policy import Policy, Pooled
from oo_serving.sim.policies import (
    POLICY_NAMES,
    Oracle,
    PolicySim,
    Uniform,
    parse_policy,
    settings_of,
)
from oo_serving.sim.runner import Ignored, arrival_order, run
from oo_serving.sim.scenarios import Scenario, preset
from oo_serving.sim.simulator import Context, Simulator

SMALL = preset("realistic", users=12, rounds=15)
ARRIVAL = "cohorts:5"


def by_hand_v1(scenario: Scenario, seed: int, ignored: Ignored, arrival: str) -> np.ndarray:
    """The prototype-era path: linucb.choose / linucb.update on linucb-v1's features."""
    params = LinUCBParams(alpha=1.0)
    states = [linucb.initial_state(params) for _ in range(scenario.users)]
    regret = np.zeros((scenario.users, scenario.rounds))
    sim = Simulator.create(scenario, seed)
    for u, t in arrival_order(arrival, scenario.users, scenario.rounds, seed):
        rnd = sim.round(u, t)
        at_hour = [c._replace(hour_of_day=rnd.context.hour_of_day) for c in rnd.candidates]
        chosen = linucb.choose(params, states[u], feature_matrix(at_hour)).index
        regret[u, t] = rnd.regret(chosen)
        if ignored == "no-reward" and rnd.draws.ignore < rnd.ignore_prob:
            continue
        states[u] = linucb.update(states[u], feature_vector(at_hour[chosen]), rnd.reward(chosen))
    return regret


def by_hand(
    policy: Policy,
    scenario: Scenario,
    seed: int,
    *,
    refresh_every: int,
    ignored: Ignored = "no-reward",
    arrival: str = ARRIVAL,
) -> np.ndarray:
    """What the service does with any core policy: per-user states, the pooled sum of
    every learned reward, and the prior recomputed from it every `refresh_every` rewards."""
    states = [policy.initial_state() for _ in range(scenario.users)]
    count, stats, prior = 0, np.zeros(policy.pooled_size), policy.prior(None)
    regret = np.zeros((scenario.users, scenario.rounds))
    sim = Simulator.create(scenario, seed)
    for u, t in arrival_order(arrival, scenario.users, scenario.rounds, seed):
        rnd = sim.round(u, t)
        X = policy.features(rnd.candidates)
        chosen = policy.choose(states[u], X, prior).index
        regret[u, t] = rnd.regret(chosen)
        if ignored == "no-reward" and rnd.draws.ignore < rnd.ignore_prob:
            continue
        reward = rnd.reward(chosen)
        states[u] = policy.update(states[u], X[chosen], reward)
        count, stats = count + 1, stats + policy.pool(X[chosen], reward)
        if count % refresh_every == 0:
            prior = policy.prior(Pooled(count, stats))
    return regret


@pytest.mark.parametrize("ignored", ["no-reward", "zero"])
def test_linucb_v1_through_the_adapter_is_the_old_direct_path_exactly(ignored: Ignored) -> None:
    seeds = (4, 5)
    result = run(SMALL, [parse_policy("linucb-v1")], seeds, arrival=ARRIVAL, ignored=ignored)
    for i, seed in enumerate(seeds):
        expected = by_hand_v1(SMALL, seed, ignored, ARRIVAL)
        np.testing.assert_array_equal(result.instant["linucb-v1"][i], expected)
    assert result.instant["linucb-v1"].sum() > 0


@pytest.mark.parametrize(
    ("refresh_every", "ignored"), [(1, "no-reward"), (7, "zero"), (25, "no-reward")]
)
def test_linucb_v2_learns_from_the_population_as_the_service_does(
    refresh_every: int, ignored: Ignored
) -> None:
    result = run(
        SMALL,
        [parse_policy("linucb-v2")],
        (6,),
        arrival=ARRIVAL,
        refresh_every=refresh_every,
        ignored=ignored,
    )
    expected = by_hand(LinUCBV2(), SMALL, 6, refresh_every=refresh_every, ignored=ignored)
    np.testing.assert_array_equal(result.instant["linucb-v2"][0], expected)


def test_a_seed_starts_with_no_population() -> None:
    """Refreshed never: every choice uses prior(None), the service's first start."""
    never = SMALL.users * SMALL.rounds + 1
    result = run(SMALL, [parse_policy("linucb-v2")], (6,), arrival=ARRIVAL, refresh_every=never)
    expected = by_hand(LinUCBV2(), SMALL, 6, refresh_every=never)
    np.testing.assert_array_equal(result.instant["linucb-v2"][0], expected)


def test_refresh_every_changes_linucb_v2_and_not_linucb_v1() -> None:
    policies = [parse_policy("linucb-v1"), parse_policy("linucb-v2")]
    runs = [run(SMALL, policies, (6,), arrival=ARRIVAL, refresh_every=k) for k in (1, 10, 10_000)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.instant["linucb-v1"], runs[0].instant["linucb-v1"])
        assert not np.array_equal(other.instant["linucb-v2"], runs[0].instant["linucb-v2"])


def test_each_seed_and_each_policy_has_its_own_population() -> None:
    twin = PolicySim(LinUCBV2(), label="twin")  # the same policy, run beside it
    together = run(SMALL, [parse_policy("linucb-v2"), twin], (6, 7), refresh_every=5)
    alone = run(SMALL, [parse_policy("linucb-v2")], (7,), refresh_every=5)
    # Seed 7 measures the same after seed 6 as on its own: a new population per seed.
    np.testing.assert_array_equal(together.instant["linucb-v2"][1], alone.instant["linucb-v2"][0])
    # And a twin learning beside it shares nothing with it: the same regret.
    np.testing.assert_array_equal(together.instant["twin"], together.instant["linucb-v2"])


def test_arrival_order_changes_linucb_v2_only() -> None:
    policies = [parse_policy("linucb-v1"), parse_policy("linucb-v2")]
    results = [
        run(SMALL, policies, (6,), arrival=a, refresh_every=5)
        for a in ("round-robin", "cohorts:3", "user-by-user")
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.instant["linucb-v1"], results[0].instant["linucb-v1"])
        assert not np.array_equal(other.instant["linucb-v2"], results[0].instant["linucb-v2"])


@dataclass(frozen=True)
class Counter:
    """Shows candidate 0; records every reward it learns, per user and for the population."""

    name: str = "counter"
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (user's index, reward)
    pooled: list[float] = field(default_factory=list)
    refreshes: list[int] = field(default_factory=list)  # pooled count at each refresh

    def initial_state(self) -> int:
        return 0  # rounds learned from

    def initial_population(self) -> int:
        return 0

    def choose(
        self,
        state: int,
        population: int,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        return 0

    def update(self, state: int, chosen: TaskFeatures, context: Context, reward: float) -> int:
        self.rewards.append((state, reward))
        return state + 1

    def pool(self, population: int, chosen: TaskFeatures, context: Context, reward: float) -> int:
        self.pooled.append(reward)
        return population + 1

    def refresh(self, population: int) -> int:
        self.refreshes.append(population)
        return population


@pytest.mark.parametrize("ignored", ["no-reward", "zero"])
def test_an_ignored_tip_teaches_nothing_unless_learned_as_zero(ignored: Ignored) -> None:
    scenario = preset("realistic", users=6, rounds=20)
    counter = Counter()
    result = run(scenario, [counter], (3,), refresh_every=4, ignored=ignored)
    sim = Simulator.create(scenario, 3)
    rounds = [sim.round(u, t) for t in range(20) for u in range(6)]  # round-robin
    seen = [r for r in rounds if not r.ignored]
    assert 0 < len(seen) < len(rounds)
    learned = seen if ignored == "no-reward" else rounds
    assert [reward for _, reward in counter.rewards] == [r.reward(0) for r in learned]
    assert counter.pooled == [r.reward(0) for r in learned]
    assert counter.refreshes == list(range(4, len(learned) + 1, 4))
    assert all(r.reward(0) == 0.0 for r in rounds if r.ignored)
    # Regret counts every round shown, ignored or not.
    expected = np.array([[sim.round(u, t).regret(0) for t in range(20)] for u in range(6)])
    np.testing.assert_array_equal(result.instant["counter"][0], expected)


def test_with_every_tip_ignored_linucb_v2_never_moves_from_its_first_choices() -> None:
    scenario = preset("realistic", users=4, rounds=10, ignore_prob=1.0)
    result = run(scenario, [parse_policy("linucb-v2")], (2,), refresh_every=1)
    policy, sim = LinUCBV2(), Simulator.create(scenario, 2)
    state, prior = policy.initial_state(), policy.prior(None)
    for u in range(4):
        for t in range(10):
            rnd = sim.round(u, t)
            chosen = policy.choose(state, policy.features(rnd.candidates), prior).index
            assert result.instant["linucb-v2"][0, u, t] == rnd.regret(chosen)


# ── specs ──────────────────────────────────────────────────────────────────────


def test_parse_policy_makes_registered_policies_with_their_settings() -> None:
    plain = parse_policy("linucb-v1")
    assert isinstance(plain, PolicySim)
    assert plain.name == "linucb-v1"
    assert plain.settings() == {"alpha": 1.0}
    tuned = parse_policy(" linucb-v2 : alpha = 0.2 , discount=1.0 ")
    assert isinstance(tuned, PolicySim)
    assert tuned.name == "linucb-v2:alpha=0.2,discount=1.0"
    assert tuned.policy.parameters() == {
        **registry.parameters("linucb-v2"),
        "alpha": 0.2,
        "discount": 1.0,
    }
    assert isinstance(parse_policy("uniform"), Uniform)
    assert isinstance(parse_policy("oracle"), Oracle)
    assert set(POLICY_NAMES) == {*registry.NAMES, "uniform", "oracle"}
    assert settings_of(parse_policy("uniform")) == {}
    assert settings_of(parse_policy("linucb-v1:alpha=0.5")) == {"alpha": 0.5}
    assert isinstance(parse_policy("linucb-v1").policy, LinUCBV1)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("linucb-v9", "no policy 'linucb-v9'; policies: linucb-v1, linucb-v2, uniform, oracle"),
        ("", "no policy name"),
        ("linucb-v2:", "no settings after ':'"),
        ("linucb-v2:alpha", "'alpha' is not KEY=VALUE"),
        ("linucb-v2:alpha=", "'alpha=' is not KEY=VALUE"),
        ("linucb-v2:alpha=high", "alpha=high is not a number"),
        ("linucb-v2:alpha=0.1,alpha=0.2", "alpha is given twice"),
        ("linucb-v2:gamma=0.9", "linucb-v2 has no setting gamma"),
        ("linucb-v2:discount=1.5", "discount must be in"),
        ("linucb-v1:alpha=-1", "alpha must be finite and >= 0"),
        ("uniform:alpha=1", "uniform takes no settings"),
    ],
)
def test_parse_policy_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="policy ") as error:
        parse_policy(spec)
    assert message in str(error.value)
    assert repr(spec) in str(error.value)


def test_policies_are_independent_values() -> None:
    """Two adapters over one core policy object share no state: states are returned."""
    sim = PolicySim(LinUCBV2())
    state = sim.initial_state()
    rnd = Simulator.create(SMALL, 1).round(0, 0)
    after = sim.update(state, rnd.candidates[0], rnd.context, 1.0)
    assert after is not state
    assert not np.any(state.D)  # the first state is untouched
    population = sim.initial_population()
    pooled = sim.pool(population, rnd.candidates[0], rnd.context, 1.0)
    assert population.pooled.count == 0
    assert pooled.pooled.count == 1
    assert not np.any(population.pooled.stats)
    refreshed = sim.refresh(pooled)
    assert np.any(refreshed.prior.theta)
    assert not np.any(pooled.prior.theta)  # refreshing makes a new value too
