"""Scenarios: settings checked at construction, and presets that are what they say."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from oo_serving.sim.scenarios import PRESETS, Scenario, preset


def test_presets_are_named_as_documented() -> None:
    assert set(PRESETS) == {"linear", "realistic", "drift", "slow-drift"}
    for name, scenario in PRESETS.items():
        assert scenario.name == name
        assert (scenario.tasks_min, scenario.tasks_max) == (5, 20)


def test_linear_has_no_hidden_effect_and_no_ignored_tips() -> None:
    linear = PRESETS["linear"]
    assert linear.ignore_prob == 0.0
    assert linear.user_bias_sd == 0.0
    assert linear.overdue_morning == 0.0
    assert linear.drift == "none"


def test_realistic_and_its_drifts_differ_only_where_named() -> None:
    realistic = PRESETS["realistic"]
    assert realistic.ignore_prob == 0.3
    assert realistic.overdue_morning > 0.0
    assert realistic.user_bias_sd > 0.0
    assert realistic.drift == "none"
    assert PRESETS["drift"] == dataclasses.replace(realistic, name="drift", drift="abrupt")
    assert PRESETS["slow-drift"] == dataclasses.replace(realistic, name="slow-drift", drift="slow")
    # linear is realistic without the hidden effects and the ignored tips.
    assert PRESETS["linear"] == dataclasses.replace(
        realistic, name="linear", ignore_prob=0.0, user_bias_sd=0.0, overdue_morning=0.0
    )


def test_preset_with_changes_and_unknown_name() -> None:
    small = preset("realistic", users=3, rounds=4)
    assert (small.users, small.rounds, small.ignore_prob) == (3, 4, 0.3)
    with pytest.raises(KeyError, match="linear"):
        preset("nope")
    with pytest.raises(ValueError, match="users"):
        preset("linear", users=0)


def test_scenario_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["linear"].users = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": ""},
        {"users": 0},
        {"users": 2.0},
        {"users": True},
        {"rounds": 0},
        {"tasks_min": 0},
        {"tasks_min": 6, "tasks_max": 5},
        {"ignore_prob": -0.1},
        {"ignore_prob": 1.5},
        {"noise": math.nan},
        {"overdue_prob": 2.0},
        {"hour_effect": 1.0},
        {"preference_sd": -1.0},
        {"hour_sd": math.inf},
        {"user_bias_sd": -0.1},
        {"mean_age_days": -1.0},
        {"overdue_morning": math.nan},
        {"preference_mean": (0.1, 0.2)},
        {"preference_mean": (0.1, 0.2, math.nan)},
        {"priority_probs": (0.5, 0.5, 0.5, 0.5)},
        {"priority_probs": (1.0, 0.0, 0.0)},
        {"priority_probs": (1.5, -0.5, 0.0, 0.0)},
        {"habit_first": 10, "habit_last": 9},
        {"habit_last": 24},
        {"drift": "sideways"},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case names a different setting
        Scenario(**{"name": "x", **changes})
