"""The one reference for LinUCB's numbers in tests, written plainly.

The service keeps A⁻¹ by rank-one (Sherman–Morrison) updates and scores every candidate
at once; this module does neither. It builds the prototype's feature vector from its
formula, sums A = I + Σ x xᵀ and b = Σ r x directly, inverts A, and scores one row at a
time, so every test that checks a learned or scored number checks it against the same
independent closed form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

D = 5  # linucb-v1's feature vector: hour sin, hour cos, overdue, age, priority


def feature_vector(
    hour: int = 12, overdue: bool = False, age: float = 0.0, priority: int = 1
) -> np.ndarray:
    """The prototype's feature vector (d = 5)."""
    angle = 2.0 * math.pi * hour / 24.0
    return np.array(
        [
            math.sin(angle),
            math.cos(angle),
            1.0 if overdue else 0.0,
            min(float(age), 30.0) / 30.0,
            (float(priority) - 1.0) / 3.0,
        ]
    )


def vector_of(features: Mapping[str, Any]) -> np.ndarray:
    """`feature_vector` of a request's features object, with the API's defaults."""
    return feature_vector(
        features.get("hour_of_day", 12),
        bool(features.get("is_overdue", False)),
        features.get("task_age_days", 0.0),
        features.get("priority", 1),
    )


@dataclass(frozen=True)
class ClosedForm:
    """Ridge regression with λ = 1 after some observations: A, A⁻¹, b and θ = A⁻¹b."""

    A: np.ndarray
    A_inv: np.ndarray
    b: np.ndarray
    theta: np.ndarray

    def score(self, x: np.ndarray, alpha: float = 1.0) -> float:
        """LinUCB's upper bound for one row: θ·x + α·sqrt(xᵀA⁻¹x)."""
        return float(self.theta @ x) + alpha * math.sqrt(float(x @ self.A_inv @ x))

    def scores(self, X: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        return np.array([self.score(x, alpha) for x in X])


def closed_form(observations: Iterable[tuple[np.ndarray, float]], d: int = D) -> ClosedForm:
    """A = I + Σ x xᵀ and b = Σ r x, summed directly; A inverted once."""
    A = np.identity(d)
    b = np.zeros(d)
    for x, r in observations:
        A += np.outer(x, x)
        b += r * x
    A_inv = np.linalg.inv(A)
    return ClosedForm(A, A_inv, b, np.linalg.solve(A, b))
