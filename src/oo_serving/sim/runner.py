"""Run policies side by side on common random numbers, in-process.

For each seed the runner draws the users once, then visits (user, round) pairs in the
arrival order; for each pair it draws the round once and lets every policy, in turn,
choose from the same candidates, observe its own reward (the same one for the same task)
and update that user's state. Users are independent: each policy keeps one state per
user, and a user's rounds always come in order 0, 1, 2, …

Arrival orders (a setting of the run; with per-user states they change no figure, only
the order work is done in, which the tests check):
- "round-robin":  round 0 of every user, then round 1 of every user, …
- "user-by-user": all of user 0's rounds, then all of user 1's, …
- "shuffled":     a random interleaving (stream ARRIVAL of the seed), each user's rounds in order.

The result keeps every (seed, user, round)'s pseudo-regret per policy, the cumulative
regret per round (summed over users), and the paired summary of `summary.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol, get_args

import numpy as np

from oo_serving.sim.policies import Oracle, SimPolicy
from oo_serving.sim.scenarios import Scenario
from oo_serving.sim.simulator import Round, Simulator
from oo_serving.sim.streams import Stream, check_seed, generator, salt
from oo_serving.sim.summary import Array, Summary, summarize

Arrival = Literal["round-robin", "user-by-user", "shuffled"]
ARRIVALS: tuple[Arrival, ...] = get_args(Arrival)
COLD_START_ROUNDS = 10


@dataclass(frozen=True, slots=True, eq=False)
class RunResult:
    """What a run measured.

    instant:    per policy, shape (seeds, users, rounds): the pseudo-regret of each user's
                round, seeds in `seeds` order.
    cumulative: per policy, shape (seeds, rounds): regret summed over users, cumulated
                over rounds; cumulative[p][:, -1] is the total per seed.
    summary:    totals and paired comparisons against `summary.baseline`.
    """

    scenario: Scenario
    seeds: tuple[int, ...]
    arrival: Arrival
    policies: tuple[str, ...]
    instant: Mapping[str, Array]
    cumulative: Mapping[str, Array]
    summary: Summary

    def against(self, baseline: str, cold_start_rounds: int = COLD_START_ROUNDS) -> Summary:
        """The summary against another baseline, from the same regrets."""
        return summarize(self.instant, baseline, cold_start_rounds)


def arrival_order(
    arrival: Arrival, users: int, rounds: int, seed: int
) -> Iterator[tuple[int, int]]:
    """Every (user, round) once, in the order `arrival` says, each user's rounds ascending."""
    if arrival == "round-robin":
        return ((u, t) for t in range(rounds) for u in range(users))
    if arrival == "user-by-user":
        return ((u, t) for u in range(users) for t in range(rounds))
    if arrival == "shuffled":
        slots = np.repeat(np.arange(users), rounds)
        generator(seed, Stream.ARRIVAL).shuffle(slots)
        return _number_rounds(slots.tolist(), users)
    raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")


def _number_rounds(slots: list[int], users: int) -> Iterator[tuple[int, int]]:
    seen = [0] * users
    for u in slots:
        yield u, seen[u]
        seen[u] += 1


class _Player(Protocol):
    """One policy in one seed's run: plays a round, writes its regret."""

    def play(self, rnd: Round) -> None: ...


class _Learner:
    """A `SimPolicy`: one state per user, a generator per round, learns from its reward."""

    def __init__(self, policy: SimPolicy[Any], seed: int, regret: Array) -> None:
        self._policy = policy
        self._seed = seed
        self._salt = salt(policy.name)
        self._regret = regret  # shape (users, rounds), written in place
        self._states: list[Any] = [policy.initial_state() for _ in range(regret.shape[0])]

    def play(self, rnd: Round) -> None:
        policy = self._policy
        rng = generator(self._seed, Stream.POLICY, rnd.user, rnd.index, self._salt)
        state = self._states[rnd.user]
        chosen = policy.choose(state, rnd.candidates, rnd.context, rng)
        if not 0 <= chosen < len(rnd.candidates):
            raise ValueError(f"{policy.name} chose {chosen!r} of {len(rnd.candidates)} candidates")
        reward = rnd.reward(chosen)
        self._states[rnd.user] = policy.update(state, rnd.candidates[chosen], rnd.context, reward)
        self._regret[rnd.user, rnd.index] = rnd.regret(chosen)


class _Cheat:
    """The oracle: told the round's true utilities, which no `SimPolicy` ever sees."""

    def __init__(self, oracle: Oracle, regret: Array) -> None:
        self._oracle = oracle
        self._regret = regret

    def play(self, rnd: Round) -> None:
        chosen = self._oracle.choose_knowing(rnd.utilities)
        self._regret[rnd.user, rnd.index] = rnd.regret(chosen)


def _player(policy: SimPolicy[Any] | Oracle, seed: int, regret: Array) -> _Player:
    if isinstance(policy, Oracle):
        return _Cheat(policy, regret)
    return _Learner(policy, seed, regret)


def run(
    scenario: Scenario,
    policies: Sequence[SimPolicy[Any] | Oracle],
    seeds: Sequence[int],
    *,
    arrival: Arrival = "round-robin",
    baseline: str | None = None,
    cold_start_rounds: int = COLD_START_ROUNDS,
) -> RunResult:
    """Every policy on every seed of `scenario`, on the same draws.

    baseline: the policy the summary compares every policy with (default: the first).
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
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    baseline = names[0] if baseline is None else baseline
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")

    shape = (len(seeds), scenario.users, scenario.rounds)
    instant = {name: np.zeros(shape) for name in names}
    for i, seed in enumerate(seeds):
        sim = Simulator.create(scenario, seed)
        players = [_player(p, seed, instant[p.name][i]) for p in policies]
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
        policies=names,
        instant=MappingProxyType(instant),
        cumulative=MappingProxyType(cumulative),
        summary=summarize(instant, baseline, cold_start_rounds),
    )
