"""Feature vectors (d = 5), exactly as the prototype defines them.

| index | name          | value                                                   |
|-------|---------------|---------------------------------------------------------|
| 0     | hour_sin      | sin(2π · hour / 24)                                     |
| 1     | hour_cos      | cos(2π · hour / 24)                                     |
| 2     | is_overdue    | 0.0 or 1.0                                              |
| 3     | task_age_days | min(days, 30) / 30, so in [0, 1]                        |
| 4     | priority_norm | (priority − 1) / 3, priority 1–4 (Todoist), so in [0, 1] |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FEATURE_NAMES: tuple[str, ...] = (
    "hour_sin",
    "hour_cos",
    "is_overdue",
    "task_age_days",
    "priority_norm",
)
D = len(FEATURE_NAMES)
MAX_TASK_AGE_DAYS = 30.0

Vector = npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class TaskFeatures:
    """The raw features of one candidate as scored: what the decision log keeps."""

    hour_of_day: int
    is_overdue: bool
    task_age_days: float
    priority: int

    def as_dict(self) -> dict[str, int | bool | float]:
        return {
            "hour_of_day": self.hour_of_day,
            "is_overdue": self.is_overdue,
            "task_age_days": self.task_age_days,
            "priority": self.priority,
        }


def feature_row(f: TaskFeatures) -> tuple[float, float, float, float, float]:
    """The five feature values of one candidate, in `FEATURE_NAMES` order."""
    angle = 2.0 * math.pi * f.hour_of_day / 24.0
    return (
        math.sin(angle),
        math.cos(angle),
        1.0 if f.is_overdue else 0.0,
        min(float(f.task_age_days), MAX_TASK_AGE_DAYS) / MAX_TASK_AGE_DAYS,
        (float(f.priority) - 1.0) / 3.0,
    )


def feature_vector(f: TaskFeatures) -> Vector:
    """x, shape (d,)."""
    return np.array(feature_row(f), dtype=np.float64)


def feature_matrix(features: list[TaskFeatures]) -> Matrix:
    """X, shape (n, d): one row per candidate, in the order given."""
    return np.array([feature_row(f) for f in features], dtype=np.float64).reshape(-1, D)
