"""Run policies side by side on common random numbers, in-process.

For each seed the runner draws the users once, then visits (user, round) pairs in the
arrival order; for each pair it draws the round once and lets every policy, in turn,
choose from the same candidates, observe its own reward (the same one for the same task)
and learn from it. Each policy keeps one state per user, and a user's rounds always come
in order 0, 1, 2, …

It plays the service's part too. A policy that learns from the population (linucb-v2)
has one population per (seed, policy), empty when the seed starts: every learned reward
is added to its running sum, and every `refresh_every` learned rewards (counted over all
of the seed's users) the sum is turned into the prior `choose` reads, as the service
does every few seconds. 1 refreshes after every reward; a large value leaves the first
users learning alone for longer.

Ignored tips (setting `ignored`): the app sends no reward for a tip the user ignored, so
by default ("no-reward") the policy learns nothing from such a round: neither the user's
state nor the population changes. "zero" learns it as reward 0 instead, as if the app
reported ignoring as a neutral response (what this simulator did before the setting
existed). Either way the round's regret counts: the tip was shown.

Arrival orders (a setting of the run):
- "round-robin":  round 0 of every user, then round 1 of every user, …
- "user-by-user": all of user 0's rounds, then all of user 1's, …
- "shuffled":     a random interleaving (stream ARRIVAL of the seed), each user's rounds in order.
- "cohorts:K":    users arrive K at a time: users 0..K−1 play all their rounds, interleaved
                  round by round, then users K..2K−1, and so on ("cohorts:1" is
                  user-by-user, "cohorts:<users>" round-robin). The service's target
                  setting is 100 users arriving 8 at a time, "cohorts:8".

For policies without a population (linucb-v1, the baselines) the arrival order changes
no figure, only the order work is done in: users are independent. With a population it
does change the figures, and that is the point of choosing it: what the population has
learned, and what was refreshed into the prior, by the time a user's round is chosen
depends on who came before (under "round-robin" every user's first round comes before
anyone has learned anything; under "cohorts:8" later cohorts start from what earlier
ones taught; "user-by-user" gives the last users the most).

The result keeps every (seed, user, round)'s pseudo-regret per policy, the cumulative
regret per round (summed over users), and the paired summary of `summary.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol, get_args

import numpy as np

from oo_serving.sim.policies import AnyPolicy, Oracle, SimPolicy, settings_of
from oo_serving.sim.scenarios import Scenario
from oo_serving.sim.simulator import Round, Simulator
from oo_serving.sim.streams import Stream, check_seed, generator, salt
from oo_serving.sim.summary import Array, Summary, summarize

Arrival = str
"""One of `ARRIVALS`, or "cohorts:K" with K ≥ 1 (`check_arrival`)."""
ARRIVALS: tuple[str, ...] = ("round-robin", "user-by-user", "shuffled")
COHORTS = "cohorts:"
Ignored = Literal["no-reward", "zero"]
IGNORED: tuple[Ignored, ...] = get_args(Ignored)
COLD_START_ROUNDS = 10
REFRESH_EVERY = 100


@dataclass(frozen=True, slots=True, eq=False)
class RunResult:
    """What a run measured.

    settings:   per policy, its settings by name ({} for the baselines).
    instant:    per policy, shape (seeds, users, rounds): the pseudo-regret of each user's
                round, seeds in `seeds` order.
    cumulative: per policy, shape (seeds, rounds): regret summed over users, cumulated
                over rounds; cumulative[p][:, -1] is the total per seed.
    summary:    totals and paired comparisons against `summary.baseline`.
    """

    scenario: Scenario
    seeds: tuple[int, ...]
    arrival: Arrival
    refresh_every: int
    ignored: Ignored
    policies: tuple[str, ...]
    settings: Mapping[str, Mapping[str, float]]
    instant: Mapping[str, Array]
    cumulative: Mapping[str, Array]
    summary: Summary

    def against(self, baseline: str, cold_start_rounds: int = COLD_START_ROUNDS) -> Summary:
        """The summary against another baseline, from the same regrets."""
        return summarize(self.instant, baseline, cold_start_rounds)


def check_arrival(arrival: str) -> Arrival:
    """`arrival` if it names an arrival order; ValueError, listing them, otherwise."""
    if arrival in ARRIVALS:
        return arrival
    if isinstance(arrival, str) and arrival.startswith(COHORTS):
        size = arrival[len(COHORTS) :]
        if size.isdecimal() and size.isascii() and int(size) >= 1:
            return f"{COHORTS}{int(size)}"
    raise ValueError(
        f"arrival must be one of {', '.join(ARRIVALS)} or cohorts:K (K >= 1 users arriving"
        f" together), got {arrival!r}"
    )


def arrival_order(
    arrival: Arrival, users: int, rounds: int, seed: int
) -> Iterator[tuple[int, int]]:
    """Every (user, round) once, in the order `arrival` says, each user's rounds ascending."""
    arrival = check_arrival(arrival)
    if arrival == "round-robin":
        return ((u, t) for t in range(rounds) for u in range(users))
    if arrival == "user-by-user":
        return ((u, t) for u in range(users) for t in range(rounds))
    if arrival == "shuffled":
        slots = np.repeat(np.arange(users), rounds)
        generator(seed, Stream.ARRIVAL).shuffle(slots)
        return _number_rounds(slots.tolist(), users)
    size = int(arrival[len(COHORTS) :])
    return (
        (u, t)
        for first in range(0, users, size)
        for t in range(rounds)
        for u in range(first, min(first + size, users))
    )


def _number_rounds(slots: list[int], users: int) -> Iterator[tuple[int, int]]:
    seen = [0] * users
    for u in slots:
        yield u, seen[u]
        seen[u] += 1


class _Player(Protocol):
    """One policy in one seed's run: plays a round, writes its regret."""

    def play(self, rnd: Round) -> None: ...


_NEVER_DRAWN = np.random.default_rng(0)
"""What a policy that declares itself deterministic is handed instead of its generator."""


class _Learner:
    """A `SimPolicy` on one seed: one state per user, the seed's population, a generator
    per round; learns from the rewards the app would send."""

    def __init__(
        self,
        policy: SimPolicy[Any, Any],
        seed: int,
        regret: Array,
        refresh_every: int,
        ignored: Ignored,
    ) -> None:
        self._policy = policy
        self._seed = seed
        self._salt = salt(policy.name)
        self._draws = not getattr(policy, "deterministic", False)
        self._regret = regret  # shape (users, rounds), written in place
        self._states: list[Any] = [policy.initial_state() for _ in range(regret.shape[0])]
        self._population: Any = policy.initial_population()
        self._refresh_every = refresh_every
        self._learn_ignored = ignored == "zero"
        self._learned = 0

    def play(self, rnd: Round) -> None:
        policy = self._policy
        if self._draws:
            rng = generator(self._seed, Stream.POLICY, rnd.user, rnd.index, self._salt)
        else:
            rng = _NEVER_DRAWN
        state = self._states[rnd.user]
        chosen = policy.choose(state, self._population, rnd.candidates, rnd.context, rng)
        if not 0 <= chosen < len(rnd.candidates):
            raise ValueError(f"{policy.name} chose {chosen!r} of {len(rnd.candidates)} candidates")
        self._regret[rnd.user, rnd.index] = rnd.regret(chosen)
        if rnd.ignored and not self._learn_ignored:
            return  # no reward arrives: nothing to learn, for the user or the population
        reward = rnd.reward(chosen)
        shown = rnd.candidates[chosen]
        self._states[rnd.user] = policy.update(state, shown, rnd.context, reward)
        self._population = policy.pool(self._population, shown, rnd.context, reward)
        self._learned += 1
        if self._learned % self._refresh_every == 0:
            self._population = policy.refresh(self._population)


class _Cheat:
    """The oracle: told the round's true utilities, which no `SimPolicy` ever sees."""

    def __init__(self, oracle: Oracle, regret: Array) -> None:
        self._oracle = oracle
        self._regret = regret

    def play(self, rnd: Round) -> None:
        chosen = self._oracle.choose_knowing(rnd.utilities)
        self._regret[rnd.user, rnd.index] = rnd.regret(chosen)


def _player(
    policy: AnyPolicy, seed: int, regret: Array, refresh_every: int, ignored: Ignored
) -> _Player:
    if isinstance(policy, Oracle):
        return _Cheat(policy, regret)
    return _Learner(policy, seed, regret, refresh_every, ignored)


def run(
    scenario: Scenario,
    policies: Sequence[AnyPolicy],
    seeds: Sequence[int],
    *,
    arrival: Arrival = "round-robin",
    baseline: str | None = None,
    cold_start_rounds: int = COLD_START_ROUNDS,
    refresh_every: int = REFRESH_EVERY,
    ignored: Ignored = "no-reward",
) -> RunResult:
    """Every policy on every seed of `scenario`, on the same draws.

    arrival:       the order users play their rounds in (module docstring).
    baseline:      the policy the summary compares every policy with (default: the first).
    refresh_every: learned rewards, over all of a seed's users, between two refreshes of
                   the population's prior (1: after every reward).
    ignored:       "no-reward" (learn nothing from an ignored tip) or "zero" (learn 0).
    """
    names = tuple(p.name for p in policies)
    if not names:
        raise ValueError("no policies to run")
    if len(set(names)) != len(names):
        raise ValueError(f"policy names must be distinct, got {names}")
    seeds = tuple(check_seed(s) for s in seeds)
    if not seeds:
        raise ValueError("no seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (the SEs treat them as independent), got {seeds}")
    arrival = check_arrival(arrival)
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
    if ignored not in IGNORED:
        raise ValueError(f"ignored must be one of {', '.join(IGNORED)}, got {ignored!r}")
    baseline = names[0] if baseline is None else baseline
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")

    shape = (len(seeds), scenario.users, scenario.rounds)
    instant = {name: np.zeros(shape) for name in names}
    for i, seed in enumerate(seeds):
        sim = Simulator.create(scenario, seed)
        # New players, so new per-user states and a new, empty population, every seed.
        players = [_player(p, seed, instant[p.name][i], refresh_every, ignored) for p in policies]
        for user, t in arrival_order(arrival, scenario.users, scenario.rounds, seed):
            rnd = sim.round(user, t)
            for player in players:
                player.play(rnd)

    for regret in instant.values():
        regret.setflags(write=False)
    cumulative = {name: np.cumsum(r.sum(axis=1), axis=1) for name, r in instant.items()}
    for total in cumulative.values():
        total.setflags(write=False)
    return RunResult(
        scenario=scenario,
        seeds=seeds,
        arrival=arrival,
        refresh_every=refresh_every,
        ignored=ignored,
        policies=names,
        settings=MappingProxyType({p.name: MappingProxyType(settings_of(p)) for p in policies}),
        instant=MappingProxyType(instant),
        cumulative=MappingProxyType(cumulative),
        summary=summarize(instant, baseline, cold_start_rounds),
    )
