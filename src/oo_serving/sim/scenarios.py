"""What a simulated world is: the settings of the task-app simulator, and named presets.

A `Scenario` is settings only, frozen and checked at construction; the draws it implies
are the simulator's (`simulator.py` states the model exactly). The presets:

- `linear`: the expected response is θᵤ·x, exactly linear in linucb-v1's five features
  x, with no user offset, no hour × task effect and no ignored tips: LinUCB's model is
  right, so a policy should at least match linucb-v1 here.
- `realistic`: users with hidden preferences over the task attributes and a habitual
  hour, a per-user offset, a shared overdue × morning effect (which no per-user linear
  model in x can represent), and 30% of tips ignored (no reward; see runner.py's
  `ignored` for what a policy learns from them).
- `drift`: `realistic`, and each user's task preferences are replaced, half-way through
  the user's rounds, by an independent draw from the same population.
- `slow-drift`: `realistic`, and the preferences move linearly from the first draw to
  the second over the user's rounds.

Variants are `dataclasses.replace(PRESETS["realistic"], users=30, …)`; the checks run again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, Literal, get_args

Drift = Literal["none", "abrupt", "slow"]
DRIFTS: tuple[Drift, ...] = get_args(Drift)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Scenario:
    """Settings of one simulated world. Probabilities in [0, 1], effects on the reward scale.

    users, rounds:        how many users, and how many rounds (tips shown) each user gets.
    tasks_min, tasks_max: a round offers a uniform number of candidates in [min, max].
    ignore_prob:          P(a tip is ignored), whatever the task: the app then sends no reward.
    noise:                P(the response is ±1 instead of one of the two levels nearest the
                          utility); either way its mean is the utility (see simulator.py).
    preference_mean, preference_sd:
                          a user's weights on (is_overdue, age, priority), as linucb-v1
                          encodes them, are drawn N(mean, sd²) each (then shrunk if too big).
    hour_effect:          a user's responsiveness swings by ± a, a ~ U[0, hour_effect],
                          over the day, peaking at the user's habitual hour.
    habit_first, habit_last:
                          the habitual hour is uniform on these hours (inclusive).
    hour_sd:              a round's hour is the habitual hour plus N(0, hour_sd²), rounded, mod 24.
    user_bias_sd:         a per-user offset on every task's utility, N(0, sd²).
    overdue_morning:      added to an overdue task's utility when the hour is 6–11, for everyone.
    drift:                "none", "abrupt" (new preferences from round rounds // 2),
                          "slow" (linear from the first preferences to the second).
    overdue_prob, mean_age_days, priority_probs:
                          a task is overdue with overdue_prob; its age in days is
                          ⌊Exponential(mean_age_days)⌋; its priority is 1–4 with priority_probs.
    """

    name: str
    users: int = 100
    rounds: int = 100
    tasks_min: int = 5
    tasks_max: int = 20
    ignore_prob: float = 0.0
    noise: float = 0.25
    preference_mean: tuple[float, float, float] = (0.15, -0.05, 0.15)
    preference_sd: float = 0.3
    hour_effect: float = 0.2
    habit_first: int = 7
    habit_last: int = 22
    hour_sd: float = 3.0
    user_bias_sd: float = 0.0
    overdue_morning: float = 0.0
    drift: Drift = "none"
    overdue_prob: float = 0.3
    mean_age_days: float = 10.0
    priority_probs: tuple[float, float, float, float] = (0.4, 0.3, 0.2, 0.1)

    def __post_init__(self) -> None:
        _check(bool(self.name), "name must not be empty")
        for field_name in (
            "users",
            "rounds",
            "tasks_min",
            "tasks_max",
            "habit_first",
            "habit_last",
        ):
            value = getattr(self, field_name)
            _check(
                isinstance(value, int) and not isinstance(value, bool),
                f"{field_name} must be an int, got {value!r}",
            )
        _check(1 <= self.users < 2**32, f"users must be in [1, 2**32), got {self.users}")
        _check(1 <= self.rounds < 2**32, f"rounds must be in [1, 2**32), got {self.rounds}")
        _check(
            1 <= self.tasks_min <= self.tasks_max,
            f"need 1 <= tasks_min <= tasks_max, got {self.tasks_min}, {self.tasks_max}",
        )
        _check(
            0 <= self.habit_first <= self.habit_last <= 23,
            f"need 0 <= habit_first <= habit_last <= 23, got {self.habit_first}, {self.habit_last}",
        )
        for field_name in ("ignore_prob", "noise", "overdue_prob"):
            value = getattr(self, field_name)
            _check(
                _finite(value) and 0.0 <= value <= 1.0,
                f"{field_name} must be in [0, 1], got {value!r}",
            )
        _check(
            _finite(self.hour_effect) and 0.0 <= self.hour_effect < 1.0,
            f"hour_effect must be in [0, 1), got {self.hour_effect!r}",
        )
        for field_name in ("preference_sd", "hour_sd", "user_bias_sd", "mean_age_days"):
            value = getattr(self, field_name)
            _check(_finite(value) and value >= 0.0, f"{field_name} must be >= 0, got {value!r}")
        _check(
            _finite(self.overdue_morning),
            f"overdue_morning must be finite, got {self.overdue_morning!r}",
        )
        _check(
            len(self.preference_mean) == 3 and all(_finite(v) for v in self.preference_mean),
            f"preference_mean must be 3 finite numbers, got {self.preference_mean!r}",
        )
        probs = self.priority_probs
        _check(
            len(probs) == 4
            and all(_finite(p) and p >= 0.0 for p in probs)
            and math.isclose(math.fsum(probs), 1.0, abs_tol=1e-9),
            f"priority_probs must be 4 probabilities summing to 1, got {probs!r}",
        )
        _check(self.drift in DRIFTS, f"drift must be one of {DRIFTS}, got {self.drift!r}")


_LINEAR = Scenario(name="linear")
_REALISTIC = Scenario(name="realistic", ignore_prob=0.3, user_bias_sd=0.15, overdue_morning=0.3)

PRESETS: MappingProxyType[str, Scenario] = MappingProxyType(
    {
        "linear": _LINEAR,
        "realistic": _REALISTIC,
        "drift": replace(_REALISTIC, name="drift", drift="abrupt"),
        "slow-drift": replace(_REALISTIC, name="slow-drift", drift="slow"),
    }
)


def preset(name: str, **changes: Any) -> Scenario:
    """The preset `name`, with any settings changed (checked again); KeyError names the presets."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise KeyError(f"no scenario {name!r}; presets: {', '.join(PRESETS)}") from None
    return replace(base, **changes)


SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(Scenario) if f.name != "name")
"""Every setting a preset's variant may change: all but the name."""


def parse_setting(assignment: str) -> tuple[str, Any]:
    """`KEY=VALUE` as (setting, value), VALUE read as the setting's type: an int, a number,
    comma-separated numbers (`preference_mean=0.1,0,0.2`) or a word (`drift=slow`).

    ValueError names the setting; the value's range is checked when the scenario is made.
    """
    key, equals, text = (part.strip() for part in assignment.partition("="))
    if not (key and equals):
        raise ValueError(f"{assignment.strip()!r} is not KEY=VALUE")
    if key not in SETTINGS:
        raise ValueError(f"no scenario setting {key!r}; settings: {', '.join(SETTINGS)}")
    if not text:
        raise ValueError(f"{key} has no value")
    default = getattr(_LINEAR, key)
    try:
        if isinstance(default, int):
            return key, int(text)
        if isinstance(default, float):
            return key, float(text)
        if isinstance(default, tuple):
            return key, tuple(float(v) for v in text.strip("()[]").split(","))
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(type(default), "comma-separated numbers")
        raise ValueError(f"{key} must be {kind}, got {text!r}") from None
    return key, text
