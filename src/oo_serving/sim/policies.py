"""What the runner drives: `SimPolicy`, the core's LinUCB behind it, and two baselines.

A `SimPolicy` sees what /score and /reward see (the candidates' raw features and the
context) and builds its own vectors; its per-user state is a value it returns, never
mutates in place (the core's habit). Randomness is an argument: the runner hands `choose`
a generator keyed by (seed, user, round, the policy's name), so a randomised policy's
draws are common random numbers too, and a deterministic one ignores it.

Baselines: `Uniform` picks uniformly from that generator. `Oracle` is not a `SimPolicy`:
it is told the true utilities through its own method, which only the runner calls, and
picks the best, so its regret is 0 by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from oo_serving.core.features import TaskFeatures, Vector, feature_matrix, feature_vector
from oo_serving.core.linucb import LinUCBState
from oo_serving.core.policy import LINUCB_V1, LinUCBPolicy
from oo_serving.sim.simulator import Context

S = TypeVar("S")


class SimPolicy(Protocol[S]):
    """A policy as the simulator runs it, with a per-user state of type S."""

    @property
    def name(self) -> str: ...

    def initial_state(self) -> S:
        """A new user's state."""
        ...

    def choose(
        self,
        state: S,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        """The index in `candidates` (n ≥ 1) of the tip to show."""
        ...

    def update(self, state: S, chosen: TaskFeatures, context: Context, reward: float) -> S:
        """The state after `reward` was observed for the shown candidate `chosen`."""
        ...


def _at_hour(candidates: Sequence[TaskFeatures], hour: int) -> list[TaskFeatures]:
    """Every candidate at the context's hour, as /score scores them."""
    return [c._replace(hour_of_day=hour) for c in candidates]


@dataclass(frozen=True, slots=True)
class LinUCBSim:
    """A core LinUCB policy (linucb-v1 by default) exactly as the service runs it."""

    policy: LinUCBPolicy = LINUCB_V1

    @property
    def name(self) -> str:
        return self.policy.name

    def initial_state(self) -> LinUCBState:
        return self.policy.initial_state()

    def choose(
        self,
        state: LinUCBState,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        X = feature_matrix(_at_hour(candidates, context.hour_of_day))
        return self.policy.choose(state, X).index

    def update(
        self, state: LinUCBState, chosen: TaskFeatures, context: Context, reward: float
    ) -> LinUCBState:
        x = feature_vector(chosen._replace(hour_of_day=context.hour_of_day))
        return self.policy.update(state, x, reward)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Each candidate with probability 1/n, from the runner's per-round generator."""

    name: str = "uniform"

    def initial_state(self) -> None:
        return None

    def choose(
        self,
        state: None,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        return int(rng.integers(len(candidates)))

    def update(self, state: None, chosen: TaskFeatures, context: Context, reward: float) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Oracle:
    """Shows the candidate of highest true utility (the first such): zero regret."""

    name: str = "oracle"

    def choose_knowing(self, utilities: Vector) -> int:
        """The best index of `utilities` (shape (n,)), which only the simulator knows."""
        return int(np.argmax(utilities))
