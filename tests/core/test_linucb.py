"""LinUCB: the Sherman–Morrison state against the closed-form ridge solution."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tests.oracle import closed_form

from oo_serving.core import linucb
from oo_serving.core.features import D
from oo_serving.core.linucb import LinUCBParams, LinUCBState, choose, initial_state, update
from oo_serving.core.registry import DEFAULTS

LINUCB_V1 = DEFAULTS["linucb-v1"]

PARAMS = LinUCBParams()

bounded = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False, allow_infinity=False)
vectors = arrays(np.float64, (D,), elements=bounded)
rewards = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, allow_infinity=False)
observations = st.lists(st.tuples(vectors, rewards), max_size=40)
candidate_matrices = arrays(np.float64, st.tuples(st.integers(1, 8), st.just(D)), elements=bounded)
alphas = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)


def learn(observed: list[tuple[np.ndarray, float]]) -> LinUCBState:
    state = initial_state(PARAMS)
    for x, r in observed:
        state = update(state, x, r)
    return state


def random_feature_box(rng: np.random.Generator, n: int) -> np.ndarray:
    """n vectors in the feature box: a point on the hour circle, a 0/1 flag, two in [0, 1]."""
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.column_stack(
        [
            np.sin(angle),
            np.cos(angle),
            rng.integers(0, 2, n).astype(np.float64),
            rng.uniform(0.0, 1.0, n),
            rng.uniform(0.0, 1.0, n),
        ]
    )


def random_history(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, float]]:
    """n observations: feature-box vectors with rewards uniform in [-1, 1]."""
    X = random_feature_box(rng, n)
    return [(x, float(r)) for x, r in zip(X, rng.uniform(-1.0, 1.0, n), strict=True)]


# ── the state ────────────────────────────────────────────────────────────────


def test_initial_state_is_identity_and_zero() -> None:
    state = initial_state(PARAMS)
    np.testing.assert_array_equal(state.A_inv, np.identity(D))
    np.testing.assert_array_equal(state.b, np.zeros(D))
    np.testing.assert_array_equal(state.theta, np.zeros(D))


@settings(deadline=None)
@given(observations)
def test_sherman_morrison_equals_closed_form_ridge(
    observed: list[tuple[np.ndarray, float]],
) -> None:
    state = learn(observed)
    truth = closed_form(observed)
    np.testing.assert_allclose(state.A_inv, truth.A_inv, rtol=0, atol=1e-9)
    np.testing.assert_allclose(state.b, truth.b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state.theta, truth.theta, rtol=0, atol=1e-9)
    # A⁻¹ stays symmetric.
    np.testing.assert_allclose(state.A_inv, state.A_inv.T, rtol=0, atol=1e-12)


def test_one_update_by_hand() -> None:
    x = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    state = update(initial_state(PARAMS), x, 0.5)
    # A = diag(2, 1, 1, 1, 1); b = (0.5, 0, 0, 0, 0); θ = (0.25, 0, 0, 0, 0).
    np.testing.assert_allclose(state.A_inv, np.diag([0.5, 1.0, 1.0, 1.0, 1.0]), atol=1e-15)
    np.testing.assert_array_equal(state.b, [0.5, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(state.theta, [0.25, 0.0, 0.0, 0.0, 0.0], atol=1e-15)


def test_update_does_not_mutate_its_input() -> None:
    rng = np.random.default_rng(7)
    state = learn([(x, 0.3) for x in random_feature_box(rng, 5)])
    A_inv_before = state.A_inv.copy()
    b_before = state.b.copy()
    x = random_feature_box(rng, 1)[0]
    x_before = x.copy()

    new = update(state, x, 1.0)

    np.testing.assert_array_equal(state.A_inv, A_inv_before)
    np.testing.assert_array_equal(state.b, b_before)
    np.testing.assert_array_equal(x, x_before)
    assert new.A_inv is not state.A_inv
    assert new.b is not state.b
    assert not np.array_equal(new.A_inv, state.A_inv)
    assert not np.array_equal(new.b, state.b)


def test_state_is_frozen() -> None:
    state = initial_state(PARAMS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.b = np.ones(D)  # type: ignore[misc]


@pytest.mark.parametrize("reward", [math.nan, math.inf, -math.inf])
def test_update_rejects_non_finite_reward(reward: float) -> None:
    state = initial_state(PARAMS)
    with pytest.raises(ValueError, match="finite"):
        update(state, np.ones(D), reward)


# ── scoring ──────────────────────────────────────────────────────────────────


@settings(deadline=None)
@given(observations, candidate_matrices, alphas)
def test_scores_equal_the_naive_formula(
    observed: list[tuple[np.ndarray, float]], X: np.ndarray, alpha: float
) -> None:
    params = LinUCBParams(alpha=alpha)
    state = learn(observed)
    scores = linucb.ucb_scores(params, state, X)
    assert scores.shape == (X.shape[0],)
    expected = closed_form(observed).scores(X, alpha)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)


@settings(deadline=None)
@given(observations, candidate_matrices)
def test_alpha_zero_is_pure_exploitation(
    observed: list[tuple[np.ndarray, float]], X: np.ndarray
) -> None:
    state = learn(observed)
    scores = linucb.ucb_scores(LinUCBParams(alpha=0.0), state, X)
    np.testing.assert_allclose(scores, X @ state.theta, rtol=0, atol=1e-12)


@settings(deadline=None)
@given(
    observations,
    candidate_matrices,
    alphas,
    alphas,
)
def test_larger_alpha_never_lowers_a_score(
    observed: list[tuple[np.ndarray, float]], X: np.ndarray, a1: float, a2: float
) -> None:
    low, high = sorted((a1, a2))
    state = learn(observed)
    low_scores = linucb.ucb_scores(LinUCBParams(alpha=low), state, X)
    high_scores = linucb.ucb_scores(LinUCBParams(alpha=high), state, X)
    assert np.all(high_scores >= low_scores)


def test_choice_reports_the_chosen_score() -> None:
    rng = np.random.default_rng(11)
    state = learn(random_history(rng, 30))
    X = random_feature_box(rng, 6)
    choice = choose(PARAMS, state, X)
    scores = linucb.ucb_scores(PARAMS, state, X)
    np.testing.assert_array_equal(choice.scores, scores)
    assert choice.index == int(np.argmax(scores))
    assert choice.score == float(scores[choice.index])
    assert choice.score == float(np.max(scores))


# ── tie-breaking ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("n", [1, 2, 5, 50])
def test_identical_rows_choose_the_first(n: int) -> None:
    rng = np.random.default_rng(3)
    state = learn(random_history(rng, 20))
    X = np.tile(random_feature_box(rng, 1), (n, 1))
    choice = choose(PARAMS, state, X)
    assert choice.index == 0
    assert np.all(choice.scores == choice.scores[0])


def test_identical_rows_choose_the_first_in_a_fresh_state() -> None:
    X = np.tile([0.0, 1.0, 1.0, 0.5, 1.0], (4, 1))
    assert choose(PARAMS, initial_state(PARAMS), X).index == 0


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("lhh", 1),
        ("llhlh", 2),
        ("hlh", 0),
        ("lllh", 3),
        ("lhlhh", 1),
    ],
)
def test_ties_go_to_the_first_maximal_row(layout: str, expected: int) -> None:
    rng = np.random.default_rng(5)
    state = learn(random_history(rng, 20))
    a, b = random_feature_box(rng, 2)
    sa, sb = linucb.ucb_scores(PARAMS, state, np.stack([a, b]))
    assert sa != sb
    high, low = (a, b) if sa > sb else (b, a)
    X = np.stack([high if c == "h" else low for c in layout])
    choice = choose(PARAMS, state, X)
    assert choice.index == expected


# ── validation ───────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "shape",
    [(0, D), (3, D - 1), (3, D + 1), (D,), (1, 1, D), (0, 0)],
)
def test_choose_rejects_wrong_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        choose(PARAMS, initial_state(PARAMS), np.zeros(shape))


@pytest.mark.parametrize("alpha", [-1e-12, -1.0, math.nan, math.inf, -math.inf])
def test_params_reject_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        LinUCBParams(alpha=alpha)


@pytest.mark.parametrize("d", [0, -1])
def test_params_reject_d_below_one(d: int) -> None:
    with pytest.raises(ValueError, match="d must"):
        LinUCBParams(d=d)


def test_params_accept_the_edges() -> None:
    assert LinUCBParams(alpha=0.0).alpha == 0.0
    assert LinUCBParams(d=1).d == 1
    state = initial_state(LinUCBParams(d=1))
    assert state.A_inv.shape == (1, 1)
    assert state.b.shape == (1,)


# ── learning, statistically ──────────────────────────────────────────────────


def test_recovers_the_true_parameters() -> None:
    """2000 seeded observations of r = θ*·x + N(0, 0.1²) recover θ* to within 0.1.

    Why 0.1 holds with a wide margin. With x drawn as below, the second-moment matrix
    E[x xᵀ] has smallest eigenvalue ≈ 0.083 (the direction x3 − x4), so after n = 2000
    updates λ_min(A) ≈ 1 + 2000·0.083 ≈ 170. The ridge estimate θ̂ = A⁻¹ b splits into
    a bias −A⁻¹ θ* of norm ≤ ‖θ*‖ / λ_min(A) ≈ 1.6/170 < 0.01, and a noise term
    A⁻¹ Σ x ε with E‖·‖² ≤ σ² tr(A⁻¹) ≈ 0.01 · 0.011, i.e. an rms of ≈ 0.011.
    0.1 is more than eight times that rms above the bias. The test also checks the
    bound computed from the realised A, so it does not rest on the estimate alone.
    """
    rng = np.random.default_rng(20240601)
    theta_star = np.array([0.4, -0.3, 0.8, -0.6, 0.9])
    sigma = 0.1
    n = 2000
    X = random_feature_box(rng, n)
    noise = rng.normal(0.0, sigma, n)

    state = initial_state(PARAMS)
    for x, eps in zip(X, noise, strict=True):
        state = update(state, x, float(theta_star @ x + eps))

    error = float(np.linalg.norm(state.theta - theta_star))
    A = np.identity(D) + X.T @ X
    eigenvalues = np.linalg.eigvalsh(A)
    bias_bound = float(np.linalg.norm(theta_star)) / eigenvalues[0]
    noise_rms = sigma * math.sqrt(float(np.sum(1.0 / eigenvalues)))
    derived_bound = bias_bound + 8.0 * noise_rms

    assert derived_bound < 0.1
    assert error < derived_bound
    assert error < 0.1
    # A learner that learned nothing would sit at distance ‖θ*‖ from the truth.
    assert float(np.linalg.norm(theta_star)) > 1.0


# ── the named policy ─────────────────────────────────────────────────────────


def test_linucb_v1_is_the_prototype_policy() -> None:
    assert LINUCB_V1.name == "linucb-v1"
    assert LINUCB_V1.parameters() == {"alpha": 1.0}
    assert len(LINUCB_V1.feature_names) == 5


def test_linucb_v1_is_deterministic_with_propensity_one() -> None:
    X = np.array([[0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]])
    state = LINUCB_V1.initial_state()
    first = LINUCB_V1.choose(state, X, None)
    second = LINUCB_V1.choose(state, X, None)
    assert first.index == second.index == 1
    assert LINUCB_V1.propensity(first) == 1.0


def test_linucb_v1_update_matches_the_core() -> None:
    x = np.array([0.5, -0.5, 1.0, 0.25, 1 / 3])
    via_policy = LINUCB_V1.update(LINUCB_V1.initial_state(), x, 0.7)
    via_core = update(initial_state(PARAMS), x, 0.7)
    np.testing.assert_array_equal(via_policy.A_inv, via_core.A_inv)
    np.testing.assert_array_equal(via_policy.b, via_core.b)
