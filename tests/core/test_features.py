"""Feature vectors: the prototype's definition, value for value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oo_serving.core.features import (
    FEATURE_NAMES,
    D,
    TaskFeatures,
    feature_matrix,
    feature_vector,
)

SQRT2 = math.sqrt(2.0)
SQRT6 = math.sqrt(6.0)


def prototype_vector(hour: int, overdue: bool, age: float, priority: int) -> list[float]:
    """The prototype's formula, written out independently of the module under test."""
    return [
        math.sin(2 * math.pi * hour / 24),
        math.cos(2 * math.pi * hour / 24),
        float(overdue),
        min(age, 30) / 30,
        (priority - 1) / 3,
    ]


def test_five_named_features() -> None:
    assert D == 5
    assert FEATURE_NAMES == (
        "hour_sin",
        "hour_cos",
        "is_overdue",
        "task_age_days",
        "priority_norm",
    )


@pytest.mark.parametrize(
    ("hour", "expected_sin", "expected_cos"),
    [
        (0, 0.0, 1.0),
        (6, 1.0, 0.0),
        (12, 0.0, -1.0),
        (18, -1.0, 0.0),
        # 2π·23/24 = 2π − π/12: sin = −sin(π/12), cos = cos(π/12).
        (23, -(SQRT6 - SQRT2) / 4, (SQRT6 + SQRT2) / 4),
    ],
)
def test_hour_encoding(hour: int, expected_sin: float, expected_cos: float) -> None:
    x = feature_vector(
        TaskFeatures(hour_of_day=hour, is_overdue=False, task_age_days=0, priority=1)
    )
    np.testing.assert_allclose(x[:2], [expected_sin, expected_cos], rtol=0, atol=1e-15)
    assert x[0] ** 2 + x[1] ** 2 == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0, 0.0), (15, 0.5), (30, 1.0), (45, 1.0), (1e9, 1.0), (7.5, 0.25)],
)
def test_task_age_is_clipped_at_30_days(age: float, expected: float) -> None:
    x = feature_vector(TaskFeatures(hour_of_day=0, is_overdue=False, task_age_days=age, priority=1))
    assert x[3] == expected


@pytest.mark.parametrize(
    ("priority", "expected"),
    [(1, 0.0), (2, 1 / 3), (3, 2 / 3), (4, 1.0)],
)
def test_priority_normalised_to_unit_interval(priority: int, expected: float) -> None:
    x = feature_vector(
        TaskFeatures(hour_of_day=0, is_overdue=False, task_age_days=0, priority=priority)
    )
    assert x[4] == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("overdue", "expected"), [(False, 0.0), (True, 1.0)])
def test_overdue_flag(overdue: bool, expected: float) -> None:
    x = feature_vector(TaskFeatures(hour_of_day=0, is_overdue=overdue, task_age_days=0, priority=1))
    assert x[2] == expected


def test_full_vector_hand_picked() -> None:
    x = feature_vector(TaskFeatures(hour_of_day=6, is_overdue=True, task_age_days=45, priority=4))
    np.testing.assert_allclose(x, [1.0, 0.0, 1.0, 1.0, 1.0], rtol=0, atol=1e-15)
    x = feature_vector(TaskFeatures(hour_of_day=12, is_overdue=False, task_age_days=15, priority=1))
    np.testing.assert_allclose(x, [0.0, -1.0, 0.0, 0.5, 0.0], rtol=0, atol=1e-15)


def test_vector_dtype_and_shape() -> None:
    x = feature_vector(TaskFeatures(hour_of_day=3, is_overdue=True, task_age_days=2.5, priority=2))
    assert x.shape == (D,)
    assert x.dtype == np.float64


task_features = st.builds(
    TaskFeatures,
    hour_of_day=st.integers(min_value=0, max_value=23),
    is_overdue=st.booleans(),
    task_age_days=st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    priority=st.integers(min_value=1, max_value=4),
)


@given(task_features)
def test_vector_matches_prototype_formula(f: TaskFeatures) -> None:
    x = feature_vector(f)
    expected = prototype_vector(f.hour_of_day, f.is_overdue, f.task_age_days, f.priority)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-15)
    # Every value lies in the feature box the learning core assumes.
    assert np.all(np.abs(x[:2]) <= 1.0)
    assert x[2] in (0.0, 1.0)
    assert 0.0 <= x[3] <= 1.0
    assert 0.0 <= x[4] <= 1.0


@given(st.lists(task_features, max_size=20))
def test_matrix_stacks_rows_in_order(features: list[TaskFeatures]) -> None:
    X = feature_matrix(features)
    assert X.shape == (len(features), D)
    assert X.dtype == np.float64
    for i, f in enumerate(features):
        np.testing.assert_array_equal(X[i], feature_vector(f))


def test_matrix_of_no_candidates_has_d_columns() -> None:
    assert feature_matrix([]).shape == (0, D)


def test_matrix_row_order_is_the_given_order() -> None:
    a = TaskFeatures(hour_of_day=0, is_overdue=False, task_age_days=0, priority=1)
    b = TaskFeatures(hour_of_day=12, is_overdue=True, task_age_days=30, priority=4)
    np.testing.assert_array_equal(
        feature_matrix([a, b, a]),
        np.array([feature_vector(a), feature_vector(b), feature_vector(a)]),
    )
    np.testing.assert_allclose(
        feature_matrix([b, a]),
        [[0.0, -1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]],
        rtol=0,
        atol=1e-15,
    )
