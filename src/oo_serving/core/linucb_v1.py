"""`linucb-v1`: the prototype's policy, kept exactly.

d = 5 (features.py), α = 1, A₀ = I, b₀ = 0, deterministic (propensity 1.0), ties to the
first candidate; the maths is linucb.py's. The state is (A⁻¹, b), stored as A⁻¹ then b,
float64 little-endian, row-major: the bytes the prototype-era schema kept in its two
columns, concatenated. It learns nothing from the population.

α is a parameter only so that the simulator can show what tuning it alone does; the
service always runs α = 1, the prototype's value.
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

_NOTHING = np.zeros(0)


@dataclass(frozen=True, slots=True)
class LinUCBV1:
    """Disjoint LinUCB with one shared arm per user (Li et al., 2010, Algorithm 1)."""

    alpha: float = 1.0

    name: ClassVar[str] = "linucb-v1"
    feature_names: ClassVar[tuple[str, ...]] = FEATURE_NAMES
    state_version: ClassVar[int] = 1
    pooled_size: ClassVar[int] = 0

    def __post_init__(self) -> None:
        LinUCBParams(alpha=self.alpha)  # checks α

    @property
    def params(self) -> LinUCBParams:
        return LinUCBParams(alpha=self.alpha, d=len(self.feature_names))

    def parameters(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    def features(self, tasks: Sequence[TaskFeatures]) -> Matrix:
        return feature_matrix(tasks)

    def initial_state(self) -> LinUCBState:
        return linucb.initial_state(self.params)

    def encode(self, state: LinUCBState) -> bytes:
        return linucb.join_arrays(state.A_inv, state.b)

    def decode(self, raw: bytes, version: int) -> LinUCBState:
        if version != self.state_version:
            raise ValueError(f"{self.name} knows state version 1, not {version!r}")
        A_inv, b = linucb.split_arrays(raw, len(self.feature_names), f"a {self.name} state")
        return LinUCBState(A_inv=A_inv, b=b)

    def prior(self, pooled: Pooled | None) -> None:
        return None

    def choose(self, state: LinUCBState, X: Matrix, prior: object = None) -> Choice:
        return linucb.choose(self.params, state, X)

    def propensity(self, choice: Choice) -> float:
        """1.0: LinUCB is deterministic."""
        return 1.0

    def update(self, state: LinUCBState, x: Vector, reward: float) -> LinUCBState:
        return linucb.update(state, x, reward)

    def correct(self, state: LinUCBState, x: Vector, delta: float, age: int) -> LinUCBState:
        """b + δ·x: the reward enters b alone (A counts the observation, not its value);
        nothing is forgotten, so `age` does not matter."""
        if not math.isfinite(delta):
            raise ValueError(f"a reward correction must be finite, got {delta!r}")
        return LinUCBState(A_inv=state.A_inv, b=state.b + delta * x)

    def theta(self, state: LinUCBState, prior: object = None) -> Vector:
        return state.theta

    def explain(self, state: LinUCBState, x: Vector, prior: object = None) -> Explanation:
        return linucb.explain(self.feature_names, state.theta, state.A_inv, self.alpha, x)

    def arrays(self, state: LinUCBState) -> dict[str, Matrix | Vector]:
        return {"A_inv": state.A_inv, "b": state.b}

    def pool(self, x: Vector, reward: float) -> Vector:
        return _NOTHING

    def problems(self, state: LinUCBState) -> list[tuple[str, str]]:
        return linucb.vector_problems("b", state.b) + linucb.matrix_problems(
            "A_inv", state.A_inv, definite=True
        )
