"""The task-app simulator: hidden users, the tasks they offer, and how they respond.

The model, exactly (x is linucb-v1's feature vector of a task at the round's hour, so
x = (sin 2πh/24, cos 2πh/24, overdue, min(age, 30)/30, (priority − 1)/3)):

User u (stream USER). A habitual hour H ~ U{habit_first..habit_last}; an hour amplitude
a ~ U[0, hour_effect]; task preferences w, w' ~ N(preference_mean, preference_sd² I₃),
each shrunk by the factor (1 − a)/Σ|w| when a + Σ|w| > 1; an offset b ~ N(0, user_bias_sd²).
Then θ = (a sin 2πH/24, a cos 2πH/24, w), so θ·x = a cos(2π(h − H)/24) + w·x₂:₅ and
|θ·x| ≤ 1 for every task: with no offset and no shared effect the utility is never clipped.

Round t of user u (stream ROUND). The hour h = round(H + N(0, hour_sd²)) mod 24, the day
of week ~ U{0..6} (it carries no signal), n ~ U{tasks_min..tasks_max} candidates, each
independently overdue with overdue_prob, ⌊Exponential(mean_age_days)⌋ days old, of
priority 1–4 with priority_probs. Every candidate carries hour_of_day = h, as /score
scores them.

Utility of candidate x in round t: the expected response to it,

    μ = θₜ·x + b + overdue_morning · overdue · [6 ≤ h ≤ 11],    utility = clip(μ, −1, 1),

where θₜ uses w before drift and, for drift "abrupt", w' from round rounds // 2 on, and
for drift "slow", w + (t / (rounds − 1)) (w' − w).

Response to the shown candidate of utility U (stream RESPONSE: three uniforms v₁, v₂, v₃
per round, shared by every candidate, so the same task gets the same response):
ignored when v₁ < ignore_prob; otherwise, when v₂ < noise, +1 if
v₃ < (1 + U)/2 else −1; otherwise one of the two levels of {−1, −½, 0, ½, 1} around U,
lo = −1 + ½·min(⌊2(U + 1)⌋, 3) and lo + ½, the upper one when v₃ < 2(U − lo). Both
branches have mean U, so E[response | seen] = U.

An ignored tip gets no reward from the app, so what a policy learns from it is a setting
of the run, not of the world (runner.py, `ignored`): nothing by default, or a reward of 0
(`Round.reward` is 0 then), in which case E[reward] = (1 − ignore_prob)·U. Whether a
round is ignored depends on v₁ only, never on the task shown, so every policy's tip is
ignored in the same rounds.

Regret of a round is pseudo-regret in utility units: max utility − utility of the shown
candidate. Ignoring scales every candidate's expected reward alike, so it changes which
task is best for no one; regret in observed-reward units is (1 − ignore_prob) times this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from oo_serving.core.features import TaskFeatures, Vector, feature_matrix
from oo_serving.sim.scenarios import Scenario
from oo_serving.sim.streams import Stream, check_seed, generator

LEVEL_STEP = 0.5
MORNING_HOURS = range(6, 12)


class Context(NamedTuple):
    """The request's context, as /score receives it."""

    hour_of_day: int
    day_of_week: int


@dataclass(frozen=True, slots=True, eq=False)
class UserTruth:
    """A user's hidden parameters.

    habit_hour: the hour the user's rounds cluster around.
    theta:      shape (5,), weights on linucb-v1's features before any drift.
    theta_next: shape (5,), the weights drift moves to (same hour part, new task part).
    bias:       offset on every task's utility.
    """

    habit_hour: int
    theta: Vector
    theta_next: Vector
    bias: float


class ResponseDraws(NamedTuple):
    """The round's three uniforms: ignored?, ±1 branch?, which level."""

    ignore: float
    branch: float
    level: float


@dataclass(frozen=True, slots=True, eq=False)
class Round:
    """One round as the simulator knows it: what a policy sees, and the truth behind it.

    candidates: what a policy sees, with `context`.
    utilities:  shape (n,), each candidate's expected response, in [−1, 1].
    best:       the highest of them (kept: every policy's regret needs it).
    """

    user: int
    index: int
    context: Context
    candidates: tuple[TaskFeatures, ...]
    utilities: Vector
    draws: ResponseDraws
    ignore_prob: float
    noise: float
    best: float

    def regret(self, chosen: int) -> float:
        """Pseudo-regret of showing candidate `chosen`: best utility − its utility."""
        return self.best - float(self.utilities[chosen])

    @property
    def ignored(self) -> bool:
        """Whether the user ignores this round's tip, whichever it is."""
        return self.draws.ignore < self.ignore_prob

    def reward(self, chosen: int) -> float:
        """The reward observed when candidate `chosen` is shown; 0 when the tip is ignored."""
        if self.ignored:
            return 0.0
        # `response` for one value, with the same float operations (so the same result),
        # without building five arrays: every policy asks this in every round.
        utility, level = float(self.utilities[chosen]), self.draws.level
        if self.draws.branch < self.noise:
            return 1.0 if level < (1.0 + utility) / 2.0 else -1.0
        lo = -1.0 + LEVEL_STEP * min(math.floor((utility + 1.0) / LEVEL_STEP), 3.0)
        return lo + LEVEL_STEP if level < (utility - lo) / LEVEL_STEP else lo


def response(utility: Vector, branch: Vector, level: Vector, noise: float) -> Vector:
    """The response to tasks of `utility` (in [−1, 1]) given uniforms `branch`, `level`.

    Elementwise, all shapes alike: ±1 with mean `utility` when branch < noise, otherwise
    one of the two levels of the ½-grid around `utility`, again with mean `utility`.
    """
    lo = -1.0 + LEVEL_STEP * np.minimum(np.floor((utility + 1.0) / LEVEL_STEP), 3.0)
    graded = np.where(level < (utility - lo) / LEVEL_STEP, lo + LEVEL_STEP, lo)
    extreme = np.where(level < (1.0 + utility) / 2.0, 1.0, -1.0)
    result: Vector = np.where(branch < noise, extreme, graded)
    return result


def draw_user(scenario: Scenario, seed: int, user: int) -> UserTruth:
    """User `user`'s hidden parameters; always the same draws in the same order."""
    rng = generator(seed, Stream.USER, user)
    habit = int(rng.integers(scenario.habit_first, scenario.habit_last + 1))
    amplitude = float(rng.uniform(0.0, scenario.hour_effect))
    mean = np.asarray(scenario.preference_mean, dtype=np.float64)
    w = mean + scenario.preference_sd * rng.standard_normal(3)
    w_next = mean + scenario.preference_sd * rng.standard_normal(3)
    bias = scenario.user_bias_sd * float(rng.standard_normal())
    angle = 2.0 * math.pi * habit / 24.0
    hour_part = amplitude * np.array([math.sin(angle), math.cos(angle)])
    return UserTruth(
        habit_hour=habit,
        theta=np.concatenate([hour_part, _shrink(w, 1.0 - amplitude)]),
        theta_next=np.concatenate([hour_part, _shrink(w_next, 1.0 - amplitude)]),
        bias=bias,
    )


def _shrink(w: Vector, budget: float) -> Vector:
    total = float(np.abs(w).sum())
    return w * (budget / total) if total > budget else w


def theta_at(scenario: Scenario, user: UserTruth, t: int) -> Vector:
    """The user's weights in round t, shape (5,)."""
    if scenario.drift == "abrupt":
        return user.theta_next if t >= scenario.rounds // 2 else user.theta
    if scenario.drift == "slow" and scenario.rounds > 1:
        share = t / (scenario.rounds - 1)
        return user.theta + share * (user.theta_next - user.theta)
    return user.theta


@dataclass(frozen=True, slots=True, eq=False)
class Simulator:
    """One (scenario, seed): its users drawn once, each round drawn on demand."""

    scenario: Scenario
    seed: int
    users: tuple[UserTruth, ...]
    priority_cdf: Vector  # shape (4,): cumulated priority_probs, normalised as numpy does

    @classmethod
    def create(cls, scenario: Scenario, seed: int) -> Simulator:
        check_seed(seed)
        users = tuple(draw_user(scenario, seed, u) for u in range(scenario.users))
        cdf = np.asarray(scenario.priority_probs, dtype=np.float64).cumsum()
        cdf /= cdf[-1]
        return cls(scenario=scenario, seed=seed, users=users, priority_cdf=cdf)

    def round(self, user: int, t: int) -> Round:
        """Round t of `user`: the same for any policy, in any processing order."""
        s = self.scenario
        if not (0 <= user < s.users and 0 <= t < s.rounds):
            raise IndexError(f"no round ({user}, {t}) in {s.users} users × {s.rounds} rounds")
        truth = self.users[user]
        rng = generator(self.seed, Stream.ROUND, user, t)
        hour = round(truth.habit_hour + s.hour_sd * float(rng.standard_normal())) % 24
        day = int(rng.integers(0, 7))
        n = int(rng.integers(s.tasks_min, s.tasks_max + 1))
        overdue = rng.random(n) < s.overdue_prob
        age = np.floor(rng.exponential(s.mean_age_days, n))
        # rng.choice(4, size=n, p=priority_probs) exactly (numpy draws it so), without
        # checking and summing p again every round.
        priority = 1 + np.searchsorted(self.priority_cdf, rng.random(n), side="right")
        candidates = tuple(  # tolist: Python bool, float and int, as a request's
            TaskFeatures(hour, o, a, p)
            for o, a, p in zip(overdue.tolist(), age.tolist(), priority.tolist(), strict=True)
        )
        mu = feature_matrix(candidates) @ theta_at(s, truth, t) + truth.bias
        if hour in MORNING_HOURS:
            mu = mu + s.overdue_morning * overdue
        v = generator(self.seed, Stream.RESPONSE, user, t).random(3)
        utilities = np.clip(mu, -1.0, 1.0)
        return Round(
            user=user,
            index=t,
            context=Context(hour_of_day=hour, day_of_week=day),
            candidates=candidates,
            utilities=utilities,
            draws=ResponseDraws(float(v[0]), float(v[1]), float(v[2])),
            ignore_prob=s.ignore_prob,
            noise=s.noise,
            best=float(utilities.max()),
        )
