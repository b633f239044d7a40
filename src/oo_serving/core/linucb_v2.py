"""`linucb-v2`: LinUCB that starts from the population, sees the hour, and forgets.

Features (d = 11): linucb-v1's five, then each task attribute crossed with the hour,

    is_overdue·hour_sin, is_overdue·hour_cos, task_age_days·hour_sin, …, priority_norm·hour_cos,

so that "overdue tasks in the morning" can change which candidate wins (the hour alone is
the same for every candidate of a request and only shifts all scores alike).

Per user u the model is a ridge regression shrunk toward the population's weights θₚ,
with a per-feature prior weight Λ = diag(λ) (λ = prior_weight on the five base features,
interaction_prior_weight on the six interactions, so that the population, not each
user, learns the interactions), and per-user forgetting γ:

    Dₜ = γ·Dₜ₋₁ + x xᵀ,     bₜ = γ·bₜ₋₁ + r x           (the state: data statistics)
    A  = Λ + D,              θᵤ = A⁻¹ (Λ θₚ + b)
    score(x) = θᵤ·x + α · sqrt(xᵀ A⁻¹ x)

This is exactly the posterior mean of θᵤ under the prior N(θₚ, Λ⁻¹) with each past
observation's weight discounted by γ per later reward: as a user's old evidence fades,
the prior takes its place again ("stabilised forgetting"), so a user whose habits
changed is pulled back toward the population rather than left with nothing. γ = 1
forgets nothing.

The state keeps the data statistics (D, b), never A⁻¹, because θₚ and so A's prior part
change under every user when the population is refreshed; A⁻¹ is computed per request
(an 11 × 11 inverse of a matrix ⪰ Λ, so well conditioned): exact, with no drift.

The population's weights are the ridge regression of every learned reward of every
user, θₚ = (ρ I + Σ x xᵀ)⁻¹ Σ r x (ρ = population_ridge), from the pooled sums that
`pool` increments; the service keeps those sums (see population.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from oo_serving.core import linucb
from oo_serving.core.features import FEATURE_NAMES, Matrix, TaskFeatures, Vector, feature_matrix
from oo_serving.core.linucb import LinUCBParams, LinUCBState
from oo_serving.core.policy import Choice, Explanation, Pooled

_BASE = len(FEATURE_NAMES)
_TASK = slice(2, 5)  # is_overdue, task_age_days, priority_norm
_HOUR = slice(0, 2)  # hour_sin, hour_cos
INTERACTION_NAMES: tuple[str, ...] = tuple(
    f"{task}_x_{hour}" for task in FEATURE_NAMES[_TASK] for hour in FEATURE_NAMES[_HOUR]
)
V2_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES + INTERACTION_NAMES
V2_D = len(V2_FEATURE_NAMES)


@dataclass(frozen=True, slots=True, eq=False)
class LinUCBV2State:
    """A user's discounted data statistics. D: shape (d, d), Σ γᵏ x xᵀ; b: shape (d,), Σ γᵏ r x."""

    D: Matrix
    b: Vector


@dataclass(frozen=True, slots=True, eq=False)
class Prior:
    """The population's weights θₚ (shape (d,)) and Λθₚ, computed once per refresh."""

    theta: Vector
    weighted: Vector


def _positive(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class LinUCBV2:
    """Settings (defaults chosen by simulation, docs/simulation.md):

    alpha:                     exploration, α ≥ 0.
    prior_weight:              λ on the five base features, > 0: how many rewards' worth
                               of evidence the population's weights count for.
    interaction_prior_weight:  λ on the six hour × task interactions, > 0.
    discount:                  γ in (0, 1]: each reward multiplies a user's earlier
                               evidence by γ (0.99: a reward's weight halves after ~69).
    population_ridge:          ρ > 0, the population regression's own ridge.
    """

    alpha: float = 0.3
    prior_weight: float = 3.0
    interaction_prior_weight: float = 30.0
    discount: float = 0.99
    population_ridge: float = 1.0

    name: ClassVar[str] = "linucb-v2"
    feature_names: ClassVar[tuple[str, ...]] = V2_FEATURE_NAMES
    state_version: ClassVar[int] = 1
    pooled_size: ClassVar[int] = V2_D * V2_D + V2_D

    def __post_init__(self) -> None:
        LinUCBParams(alpha=self.alpha)  # checks α
        _positive(self.prior_weight, "prior_weight")
        _positive(self.interaction_prior_weight, "interaction_prior_weight")
        _positive(self.population_ridge, "population_ridge")
        if not (isinstance(self.discount, int | float) and 0.0 < self.discount <= 1.0):
            raise ValueError(f"discount must be in (0, 1], got {self.discount!r}")

    def parameters(self) -> dict[str, float]:
        return {
            "alpha": self.alpha,
            "prior_weight": self.prior_weight,
            "interaction_prior_weight": self.interaction_prior_weight,
            "discount": self.discount,
            "population_ridge": self.population_ridge,
        }

    @property
    def lambdas(self) -> Vector:
        """diag(Λ), shape (d,)."""
        weights = np.full(V2_D, float(self.interaction_prior_weight))
        weights[:_BASE] = self.prior_weight
        return weights

    def features(self, tasks: Sequence[TaskFeatures]) -> Matrix:
        base = feature_matrix(tasks)
        n = base.shape[0]
        X = np.empty((n, V2_D))
        X[:, :_BASE] = base
        X[:, _BASE:] = (base[:, _TASK, None] * base[:, None, _HOUR]).reshape(n, -1)
        return X

    def initial_state(self) -> LinUCBV2State:
        return LinUCBV2State(D=np.zeros((V2_D, V2_D)), b=np.zeros(V2_D))

    def encode(self, state: LinUCBV2State) -> bytes:
        return linucb.join_arrays(state.D, state.b)

    def decode(self, raw: bytes, version: int) -> LinUCBV2State:
        if version != self.state_version:
            raise ValueError(f"{self.name} knows state version 1, not {version!r}")
        D, b = linucb.split_arrays(raw, V2_D, f"a {self.name} state")
        return LinUCBV2State(D=D, b=b)

    def prior(self, pooled: Pooled | None) -> Prior:
        theta: Vector = np.zeros(V2_D)
        if pooled is not None and pooled.count > 0:
            S = pooled.stats
            if S.shape != (self.pooled_size,):
                raise ValueError(f"pooled stats must have shape ({self.pooled_size},)")
            xx = S[: V2_D * V2_D].reshape(V2_D, V2_D)
            ridge = self.population_ridge * np.identity(V2_D)
            theta = np.linalg.solve(ridge + xx, S[V2_D * V2_D :]).astype(np.float64)
        return Prior(theta=theta, weighted=self.lambdas * theta)

    def _posterior(self, state: LinUCBV2State, prior: Prior | None) -> LinUCBState:
        """(A⁻¹, Λθₚ + b): a linucb state whose θ = A⁻¹(Λθₚ + b) is this user's."""
        A = state.D + np.diag(self.lambdas)
        A_inv = np.linalg.inv(A)
        A_inv = (A_inv + A_inv.T) * 0.5
        weighted = prior.weighted if prior is not None else 0.0
        return LinUCBState(A_inv=A_inv, b=state.b + weighted)

    def choose(self, state: LinUCBV2State, X: Matrix, prior: Prior | None) -> Choice:
        params = LinUCBParams(alpha=self.alpha, d=V2_D)
        return linucb.choose(params, self._posterior(state, prior), X)

    def propensity(self, choice: Choice) -> float:
        """1.0: deterministic given the state and the population's weights."""
        return 1.0

    def update(self, state: LinUCBV2State, x: Vector, reward: float) -> LinUCBV2State:
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        g = self.discount
        return LinUCBV2State(D=g * state.D + np.multiply.outer(x, x), b=g * state.b + reward * x)

    def correct(self, state: LinUCBV2State, x: Vector, delta: float, age: int) -> LinUCBV2State:
        """b + γᵃᵍᵉ·δ·x: that reward's term in b has been multiplied by γ once per later
        update, and D does not depend on the reward's value."""
        if not math.isfinite(delta):
            raise ValueError(f"a reward correction must be finite, got {delta!r}")
        if age < 0:
            raise ValueError(f"age must be >= 0, got {age!r}")
        return LinUCBV2State(D=state.D, b=state.b + (self.discount**age) * delta * x)

    def theta(self, state: LinUCBV2State, prior: Prior | None) -> Vector:
        return self._posterior(state, prior).theta

    def explain(self, state: LinUCBV2State, x: Vector, prior: Prior | None) -> Explanation:
        post = self._posterior(state, prior)
        return linucb.explain(self.feature_names, post.theta, post.A_inv, self.alpha, x)

    def arrays(self, state: LinUCBV2State) -> dict[str, Matrix | Vector]:
        return {"D": state.D, "b": state.b}

    def pool(self, x: Vector, reward: float) -> Vector:
        return np.concatenate([np.multiply.outer(x, x).ravel(), reward * x])

    def problems(self, state: LinUCBV2State) -> list[tuple[str, str]]:
        return linucb.vector_problems("b", state.b) + linucb.matrix_problems(
            "D", state.D, definite=False
        )
