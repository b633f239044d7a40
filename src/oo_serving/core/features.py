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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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


class TaskFeatures(NamedTuple):
    """The raw features of one candidate as scored: what the decision log keeps.

    A named tuple: a request builds one per candidate, and a tuple is the cheapest value.
    """

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


def logged_features(features: Mapping[str, Any]) -> TaskFeatures:
    """Raw features as the decision log keeps them (a JSON object, `TaskFeatures.as_dict`)
    as the TaskFeatures they were scored as."""
    return TaskFeatures(
        int(features["hour_of_day"]),
        bool(features["is_overdue"]),
        float(features["task_age_days"]),
        int(features["priority"]),
    )


def feature_matrix(features: Sequence[TaskFeatures]) -> Matrix:
    """X, shape (n, d): one row per candidate, in the order given, in `FEATURE_NAMES` order."""
    raw = np.array(features, dtype=np.float64).reshape(-1, 4)  # hour, overdue, age, priority
    X = np.empty((raw.shape[0], D), dtype=np.float64)
    angle = 2.0 * np.pi * raw[:, 0] / 24.0  # the prototype's order of operations
    np.sin(angle, out=X[:, 0])
    np.cos(angle, out=X[:, 1])
    X[:, 2] = raw[:, 1]
    np.minimum(raw[:, 2], MAX_TASK_AGE_DAYS, out=X[:, 3])
    X[:, 3] /= MAX_TASK_AGE_DAYS
    X[:, 4] = (raw[:, 3] - 1.0) / 3.0
    return X


def feature_vector(f: TaskFeatures) -> Vector:
    """x, shape (d,): the row feature_matrix gives `f`, so a vector is the same either way."""
    x: Vector = feature_matrix([f])[0]
    return x
