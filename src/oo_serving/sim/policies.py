"""What the runner drives: `SimPolicy`, any registered core policy behind it, two baselines.

A `SimPolicy` sees what /score and /reward see (the candidates' raw features and the
context) and builds its own vectors; its per-user state is a value it returns, never
mutates in place (the core's habit). Randomness is an argument: the runner hands `choose`
a generator keyed by (seed, user, round, the policy's name), so a randomised policy's
draws are common random numbers too, and a deterministic one ignores it (one that says
so with a true class attribute `deterministic` is handed a generator that is never
keyed: building one per round costs more than a LinUCB choice).

The population. A policy may also learn from everyone (`Policy.pooled_size > 0`); the
service adds each learned reward's `pool` increment into a running sum and, every few
seconds, turns the sum into the prior every request then uses. A `SimPolicy` therefore
has a second value, its population, of which the runner keeps one per (seed, policy):
`pool` adds a learned reward to it, `refresh` does what the service's periodic refresh
does, and `choose` reads it. A new seed starts with nobody learned (the service's first
start), so the population is never shared across seeds or between policies.

`PolicySim` runs any `core.policy.Policy` exactly as the service does; `parse_policy`
makes one from a spec such as `linucb-v2:alpha=0.2,discount=1.0`, which is also its name,
so that two settings of one policy run side by side.

Baselines: `Uniform` picks uniformly from that generator. `Oracle` is not a `SimPolicy`:
it is told the true utilities through its own method, which only the runner calls, and
picks the best, so its regret is 0 by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from oo_serving.core import registry
from oo_serving.core.features import Matrix, TaskFeatures, Vector
from oo_serving.core.policy import Policy, Pooled
from oo_serving.sim.simulator import Context

S = TypeVar("S")
P = TypeVar("P")


class SimPolicy(Protocol[S, P]):
    """A policy as the simulator runs it: a per-user state of type S, and a population
    of type P (one per seed, shared by that seed's users)."""

    @property
    def name(self) -> str: ...

    def initial_state(self) -> S:
        """A new user's state."""
        ...

    def initial_population(self) -> P:
        """A new seed's population: no reward learned from anyone yet."""
        ...

    def choose(
        self,
        state: S,
        population: P,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        """The index in `candidates` (n ≥ 1) of the tip to show."""
        ...

    def update(self, state: S, chosen: TaskFeatures, context: Context, reward: float) -> S:
        """The user's state after `reward` was observed for the shown candidate `chosen`."""
        ...

    def pool(self, population: P, chosen: TaskFeatures, context: Context, reward: float) -> P:
        """The population with this learned reward added to its running sum only:
        `choose` sees it after the next `refresh`, as in the service."""
        ...

    def refresh(self, population: P) -> P:
        """The population with what `choose` reads recomputed from the running sum."""
        ...


def _at_hour(candidates: Sequence[TaskFeatures], hour: int) -> Sequence[TaskFeatures]:
    """Every candidate at the context's hour, as /score scores them (the simulator's
    candidates already are: then they are returned as they are)."""
    if all(c.hour_of_day == hour for c in candidates):
        return candidates
    return [c._replace(hour_of_day=hour) for c in candidates]


@dataclass(frozen=True, slots=True, eq=False)
class Population:
    """A seed's population as the service keeps it.

    pooled: the sum of every learned reward's `pool` increment so far.
    prior:  `policy.prior(...)` of the sum as of the last refresh: what `choose` reads.
    """

    pooled: Pooled
    prior: Any


@dataclass(frozen=True, slots=True)
class PolicySim:
    """A core policy (any of `registry.NAMES`) exactly as the service runs it.

    label: the name it runs under (default: the policy's own name), e.g. the spec
           `linucb-v2:alpha=0.2` it was made from.
    """

    policy: Policy
    label: str = ""

    deterministic: ClassVar[bool] = True  # a core policy's choose takes no generator

    @property
    def name(self) -> str:
        return self.label or self.policy.name

    def settings(self) -> dict[str, float]:
        """The policy's settings, by name."""
        return self.policy.parameters()

    def initial_state(self) -> Any:
        return self.policy.initial_state()

    def initial_population(self) -> Population:
        empty = Pooled(count=0, stats=np.zeros(self.policy.pooled_size))
        return Population(pooled=empty, prior=self.policy.prior(None))

    def choose(
        self,
        state: Any,
        population: Population,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        X = self.policy.features(_at_hour(candidates, context.hour_of_day))
        return self.policy.choose(state, X, population.prior).index

    def _vector(self, chosen: TaskFeatures, context: Context) -> Vector:
        X: Matrix = self.policy.features([chosen._replace(hour_of_day=context.hour_of_day)])
        x: Vector = X[0]
        return x

    def update(self, state: Any, chosen: TaskFeatures, context: Context, reward: float) -> Any:
        return self.policy.update(state, self._vector(chosen, context), reward)

    def pool(
        self, population: Population, chosen: TaskFeatures, context: Context, reward: float
    ) -> Population:
        if self.policy.pooled_size == 0:  # learns nothing from the population
            return population
        increment = self.policy.pool(self._vector(chosen, context), reward)
        pooled = Pooled(
            count=population.pooled.count + 1, stats=population.pooled.stats + increment
        )
        return Population(pooled=pooled, prior=population.prior)

    def refresh(self, population: Population) -> Population:
        if self.policy.pooled_size == 0:
            return population
        return Population(pooled=population.pooled, prior=self.policy.prior(population.pooled))


@dataclass(frozen=True, slots=True)
class Uniform:
    """Each candidate with probability 1/n, from the runner's per-round generator."""

    name: str = "uniform"

    def settings(self) -> dict[str, float]:
        return {}

    def initial_state(self) -> None:
        return None

    def initial_population(self) -> None:
        return None

    def choose(
        self,
        state: None,
        population: None,
        candidates: Sequence[TaskFeatures],
        context: Context,
        rng: np.random.Generator,
    ) -> int:
        return int(rng.integers(len(candidates)))

    def update(self, state: None, chosen: TaskFeatures, context: Context, reward: float) -> None:
        return None

    def pool(self, population: None, chosen: TaskFeatures, context: Context, reward: float) -> None:
        return None

    def refresh(self, population: None) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Oracle:
    """Shows the candidate of highest true utility (the first such): zero regret."""

    name: str = "oracle"

    def settings(self) -> dict[str, float]:
        return {}

    def choose_knowing(self, utilities: Vector) -> int:
        """The best index of `utilities` (shape (n,)), which only the simulator knows."""
        return int(np.argmax(utilities))


AnyPolicy = SimPolicy[Any, Any] | Oracle
"""What the runner takes: a `SimPolicy` or the oracle."""

BASELINES: Mapping[str, type[Uniform] | type[Oracle]] = MappingProxyType(
    {"uniform": Uniform, "oracle": Oracle}
)
POLICY_NAMES: tuple[str, ...] = (*registry.NAMES, *BASELINES)
"""Every name `parse_policy` takes: the registered policies, then the baselines."""


def settings_of(policy: AnyPolicy) -> dict[str, float]:
    """A policy's settings by name ({} for the baselines and for policies that have none)."""
    settings = getattr(policy, "settings", None)
    return dict(settings()) if callable(settings) else {}


def parse_policy(spec: str) -> AnyPolicy:
    """The policy a spec names: `NAME` or `NAME:KEY=VALUE,KEY=VALUE,...`.

    NAME is a registered policy (made by `registry.make` with the settings given, the
    rest default, and named by the spec, spaces removed) or a baseline (`uniform`,
    `oracle`, which take no settings). ValueError, quoting the spec, says what is wrong.
    """
    text = spec.strip()
    name, colon, rest = (part.strip() for part in text.partition(":"))
    if not name:
        raise ValueError(f"policy {spec!r}: no policy name; policies: {', '.join(POLICY_NAMES)}")
    if name in BASELINES:
        if colon:
            raise ValueError(f"policy {spec!r}: {name} takes no settings")
        return BASELINES[name]()
    if name not in registry.NAMES:
        raise ValueError(
            f"policy {spec!r}: no policy {name!r}; policies: {', '.join(POLICY_NAMES)}"
        )
    settings: dict[str, float] = {}
    given: list[str] = []  # KEY=VALUE as written, for the label
    if colon:
        if not rest:
            raise ValueError(f"policy {spec!r}: no settings after ':'; write {name}:KEY=VALUE,...")
        for item in rest.split(","):
            key, equals, value = (part.strip() for part in item.partition("="))
            if not (key and equals and value):
                raise ValueError(f"policy {spec!r}: {item.strip()!r} is not KEY=VALUE")
            if key in settings:
                raise ValueError(f"policy {spec!r}: {key} is given twice")
            try:
                settings[key] = float(value)
            except ValueError:
                raise ValueError(f"policy {spec!r}: {key}={value} is not a number") from None
            given.append(f"{key}={value}")
    try:
        policy = registry.make(name, **settings)
    except ValueError as exc:
        raise ValueError(f"policy {spec!r}: {exc}") from None
    return PolicySim(policy=policy, label=f"{name}:{','.join(given)}" if given else name)
