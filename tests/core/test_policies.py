"""The same checks on every registered policy (as river's test_policies.py does), then
what is particular to each.

A policy added to the registry is picked up here without a line changed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oo_serving.core import linucb, registry
from oo_serving.core.features import TaskFeatures, feature_matrix
from oo_serving.core.linucb_v2 import INTERACTION_NAMES, LinUCBV2
from oo_serving.core.policy import Policy, Pooled

POLICIES = [registry.make(name) for name in registry.NAMES]
IDS = [p.name for p in POLICIES]

tasks = st.builds(
    TaskFeatures,
    st.integers(0, 23),
    st.booleans(),
    st.floats(0, 400, allow_nan=False, allow_infinity=False),
    st.integers(1, 4),
)
rounds = st.lists(
    st.tuples(
        st.lists(tasks, min_size=1, max_size=12), st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0])
    ),
    min_size=0,
    max_size=25,
)


def _play(policy: Policy, history: list[tuple[list[TaskFeatures], float]]) -> object:
    """The state after choosing in each round and learning its reward."""
    state = policy.initial_state()
    prior = policy.prior(None)
    for candidates, reward in history:
        X = policy.features(candidates)
        choice = policy.choose(state, X, prior)
        state = policy.update(state, X[choice.index], reward)
    return state


# ── every policy ─────────────────────────────────────────────────────────────


def test_the_registry_lists_both_policies() -> None:
    assert set(registry.NAMES) >= {"linucb-v1", "linucb-v2"}


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_a_policy_states_its_fixed_shape(policy: Policy) -> None:
    assert policy.name in registry.NAMES
    assert len(policy.feature_names) == len(set(policy.feature_names)) >= 1
    assert policy.state_version >= 1
    assert policy.pooled_size >= 0
    assert registry.DEFAULTS[policy.name].feature_names == policy.feature_names
    assert set(policy.parameters()) == set(registry.parameters(policy.name))


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@settings(max_examples=30, deadline=None)
@given(history=rounds, candidates=st.lists(tasks, min_size=1, max_size=12))
def test_choose_update_encode_on_any_history(
    policy: Policy, history: list[tuple[list[TaskFeatures], float]], candidates: list[TaskFeatures]
) -> None:
    d = len(policy.feature_names)
    state = _play(policy, history)
    prior = policy.prior(None)
    X = policy.features(candidates)
    assert X.shape == (len(candidates), d)
    assert np.isfinite(X).all()

    choice = policy.choose(state, X, prior)
    assert 0 <= choice.index < len(candidates)
    assert choice.scores.shape == (len(candidates),)
    assert choice.score == choice.scores[choice.index] == choice.scores.max()
    assert 0.0 < policy.propensity(choice) <= 1.0

    # The stored bytes give back the same state, exactly: the same choice, bit for bit.
    raw = policy.encode(state)
    again = policy.decode(raw, policy.state_version)
    assert policy.encode(again) == raw
    assert np.array_equal(policy.choose(again, X, prior).scores, choice.scores)
    assert policy.problems(again) == []

    # The explanation adds up to the score, and names every feature.
    explained = policy.explain(state, X[choice.index], prior)
    assert list(explained.contributions) == list(policy.feature_names)
    assert explained.exploration_bonus >= 0.0
    assert math.isclose(explained.score, choice.score, rel_tol=1e-9, abs_tol=1e-9)
    total = sum(explained.contributions.values()) + explained.exploration_bonus
    assert math.isclose(total, choice.score, rel_tol=1e-9, abs_tol=1e-9)
    assert policy.theta(state, prior).shape == (d,)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_update_returns_a_new_state_and_leaves_the_old_one(policy: Policy) -> None:
    state = policy.initial_state()
    before = policy.encode(state)
    x = policy.features([TaskFeatures(9, True, 3.0, 4)])[0]
    after = policy.update(state, x, 1.0)
    assert policy.encode(state) == before
    assert policy.encode(after) != before


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_learning_a_good_task_makes_it_win(policy: Policy) -> None:
    """After rewards of +1 on overdue tasks and −1 on others, an overdue task is chosen:
    a policy that learned nothing, or the sign wrong, fails."""
    good, bad = TaskFeatures(10, True, 5.0, 2), TaskFeatures(10, False, 5.0, 2)
    state = policy.initial_state()
    X = policy.features([good, bad])
    for _ in range(30):
        state = policy.update(state, X[0], 1.0)
        state = policy.update(state, X[1], -1.0)
    prior = policy.prior(None)
    assert policy.choose(state, policy.features([bad, good]), prior).index == 1
    assert policy.theta(state, prior)[policy.feature_names.index("is_overdue")] > 0.3


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_decode_refuses_what_it_did_not_write(policy: Policy) -> None:
    raw = policy.encode(policy.initial_state())
    with pytest.raises(ValueError, match="bytes"):
        policy.decode(raw[:-8], policy.state_version)
    with pytest.raises(ValueError, match="version"):
        policy.decode(raw, policy.state_version + 1)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_a_damaged_state_is_reported(policy: Policy) -> None:
    state = _play(policy, [([TaskFeatures(9, True, 3.0, 4)], 1.0)])
    raw = bytearray(policy.encode(state))
    raw[8:16] = np.float64(np.nan).tobytes()  # the matrix's entry (0, 1)
    rules = {rule for rule, _ in policy.problems(policy.decode(bytes(raw), policy.state_version))}
    assert "model_not_finite" in rules
    raw = bytearray(policy.encode(state))
    raw[8:16] = np.float64(123.0).tobytes()  # (0, 1) no longer equals (1, 0)
    rules = {rule for rule, _ in policy.problems(policy.decode(bytes(raw), policy.state_version))}
    assert "model_not_symmetric" in rules


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_pool_matches_its_declared_size(policy: Policy) -> None:
    x = policy.features([TaskFeatures(9, True, 3.0, 4)])[0]
    assert policy.pool(x, 0.5).shape == (policy.pooled_size,)


@pytest.mark.parametrize("name", registry.NAMES)
def test_settings_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="no setting"):
        registry.make(name, not_a_setting=1.0)
    with pytest.raises(ValueError, match="alpha"):
        registry.make(name, alpha=-1.0)
    with pytest.raises(ValueError, match="no policy"):
        registry.make("linucb-v9")


# ── linucb-v1: the prototype's maths ──────────────────────────────────────────


def test_v1_is_the_core_linucb_with_alpha_1() -> None:
    v1 = registry.make("linucb-v1")
    candidates = [TaskFeatures(9, True, 3.0, 4), TaskFeatures(9, False, 40.0, 1)]
    X = v1.features(candidates)
    assert np.array_equal(X, feature_matrix(candidates))
    params = linucb.LinUCBParams(alpha=1.0)
    reference = linucb.initial_state(params)
    state = v1.initial_state()
    for reward in (1.0, -0.5, 0.5):
        expected = linucb.choose(params, reference, X)
        got = v1.choose(state, X, None)
        assert got.index == expected.index
        assert np.array_equal(got.scores, expected.scores)
        reference = linucb.update(reference, X[expected.index], reward)
        state = v1.update(state, X[got.index], reward)
    assert v1.pooled_size == 0
    assert v1.prior(None) is None
    # Its stored state is A⁻¹ then b, the bytes the prototype-era columns held.
    assert (
        v1.encode(state)
        == reference.A_inv.astype("<f8").tobytes() + reference.b.astype("<f8").tobytes()
    )


# ── linucb-v2 ─────────────────────────────────────────────────────────────────


def _closed_form(v2: LinUCBV2, X: np.ndarray, r: np.ndarray, theta_pop: np.ndarray) -> np.ndarray:
    """θᵤ = (Λ + Σ γᵏ x xᵀ)⁻¹ (Λ θₚ + Σ γᵏ r x), the k-th newest reward weighted γᵏ."""
    weights = v2.discount ** np.arange(len(r))[::-1]
    Lam = np.diag(v2.lambdas)
    A = Lam + (X * weights[:, None]).T @ X
    return np.linalg.solve(A, Lam @ theta_pop + (X * (weights * r)[:, None]).sum(axis=0))


def _population(v2: LinUCBV2, X: np.ndarray, r: np.ndarray) -> Pooled:
    stats = sum(
        (v2.pool(x, float(ri)) for x, ri in zip(X, r, strict=True)), np.zeros(v2.pooled_size)
    )
    return Pooled(count=len(r), stats=stats)


def test_v2_features_are_v1s_then_each_task_attribute_times_the_hour() -> None:
    v2 = LinUCBV2()
    candidates = [TaskFeatures(7, True, 12.0, 3), TaskFeatures(7, False, 0.0, 1)]
    X, base = v2.features(candidates), feature_matrix(candidates)
    assert X.shape == (2, 11)
    assert np.array_equal(X[:, :5], base)
    names = v2.feature_names
    for i, name in enumerate(INTERACTION_NAMES):
        task, hour = name.split("_x_")
        expected = base[:, names.index(task)] * base[:, names.index(hour)]
        assert np.array_equal(X[:, 5 + i], expected), name


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_v2_weights_are_the_discounted_ridge_toward_the_population(discount: float) -> None:
    rng = np.random.default_rng(7)
    v2 = LinUCBV2(prior_weight=2.0, interaction_prior_weight=20.0, discount=discount)
    X_pop = rng.normal(size=(200, 11))
    r_pop = X_pop @ rng.normal(size=11) * 0.1
    pooled = _population(v2, X_pop, r_pop)
    prior = v2.prior(pooled)
    ridge = np.linalg.solve(np.identity(11) + X_pop.T @ X_pop, X_pop.T @ r_pop)
    assert np.allclose(prior.theta, ridge, rtol=1e-9, atol=1e-12)

    X = rng.normal(size=(15, 11))
    r = rng.choice([-1.0, 0.0, 1.0], size=15)
    state = v2.initial_state()
    for x, ri in zip(X, r, strict=True):
        state = v2.update(state, x, float(ri))
    assert np.allclose(v2.theta(state, prior), _closed_form(v2, X, r, prior.theta), atol=1e-10)


def test_a_new_v2_user_starts_from_the_population() -> None:
    v2 = LinUCBV2()
    rng = np.random.default_rng(3)
    X = rng.normal(size=(500, 11))
    truth = rng.normal(size=11)
    prior = v2.prior(_population(v2, X, X @ truth))
    assert np.allclose(v2.theta(v2.initial_state(), prior), truth, atol=0.05)
    # ... and without a population, from zero.
    assert np.array_equal(v2.theta(v2.initial_state(), v2.prior(None)), np.zeros(11))


def test_v2_forgets_old_evidence_and_v1_does_not() -> None:
    """200 rewards saying overdue is good, then 100 saying it is bad: with γ = 0.99 the
    user's weight on overdue has turned negative; with γ = 1 it has not."""
    task = TaskFeatures(15, True, 3.0, 2)
    forgetting, keeping = LinUCBV2(discount=0.99), LinUCBV2(discount=1.0)
    x = forgetting.features([task])[0]
    states = [forgetting.initial_state(), keeping.initial_state()]
    for reward in [1.0] * 200 + [-1.0] * 100:
        states = [forgetting.update(states[0], x, reward), keeping.update(states[1], x, reward)]
    overdue = forgetting.feature_names.index("is_overdue")
    assert forgetting.theta(states[0], None) @ x < 0.0
    assert keeping.theta(states[1], None) @ x > 0.0
    assert forgetting.theta(states[0], None)[overdue] < keeping.theta(states[1], None)[overdue]


def test_v2_settings_are_checked() -> None:
    for bad in ({"discount": 0.0}, {"discount": 1.5}, {"prior_weight": 0.0},
                {"interaction_prior_weight": -1.0}, {"population_ridge": math.inf}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            LinUCBV2(**bad)
