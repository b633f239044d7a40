"""What a policy is: the protocol every policy implements, and the values it trades in.

The shape follows river's `bandit/base.py`: a policy owns everything that is its own
(how a candidate's raw features become its vector, its per-user state and how that state
is stored, how it chooses, learns, explains and summarises) and the rest of the service
knows none of it. The service hands a policy raw `TaskFeatures`, gets back a matrix it
never reads, and stores a user's state as the opaque bytes `encode` returns.

A policy is a frozen dataclass whose fields are its parameters (checked at construction);
`name`, `feature_names` (so d), `state_version` and `pooled_size` belong to the class and
never depend on the parameters, so a stored state decodes whatever the settings.

Population statistics. A policy may learn from everyone as well as from each user: for
each learned reward `pool(x, r)` returns an increment (a flat vector of `pooled_size`
floats); the service adds increments up across users, processes and replicas into a
`Pooled` sum, and `prior(pooled)` turns that sum into the value `choose` and `update`
receive (linucb-v2's population weights). A policy with `pooled_size` 0 ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from oo_serving.core.features import Matrix, TaskFeatures, Vector


@dataclass(frozen=True, slots=True, eq=False)
class Choice:
    """Which row of X the policy picked, its score, and every row's score (shape (n,))."""

    index: int
    score: float
    scores: Vector


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a candidate scored what it did: score = Σ contributions + exploration_bonus.

    contributions: per feature name, θᵢ·xᵢ (the estimated reward, split by feature).
    """

    contributions: dict[str, float]
    exploration_bonus: float
    score: float


@dataclass(frozen=True, slots=True, eq=False)
class Pooled:
    """The sum of a policy's `pool` increments over every reward counted so far.

    count: how many rewards; stats: shape (pooled_size,), in the policy's own layout.
    """

    count: int
    stats: Vector


class Policy(Protocol):
    """A contextual-bandit policy with one state per user (of a type the policy owns)."""

    name: str
    feature_names: tuple[str, ...]
    state_version: int
    pooled_size: int

    def parameters(self) -> dict[str, float]:
        """The settings this instance was made with, by name."""
        ...

    def features(self, tasks: Sequence[TaskFeatures]) -> Matrix:
        """X, shape (n, d): one row per candidate, in order, d = len(feature_names)."""
        ...

    def initial_state(self) -> Any:
        """A new user's state."""
        ...

    def encode(self, state: Any) -> bytes:
        """The state as stored; `decode(encode(s), state_version)` equals s exactly."""
        ...

    def decode(self, raw: bytes, version: int) -> Any:
        """A stored state; ValueError if `raw` is not one of this policy's states."""
        ...

    def prior(self, pooled: Pooled | None) -> Any:
        """What the population tells this policy (None: nothing yet), passed to choose,
        theta and explain. Computed once per refresh, not per request."""
        ...

    def choose(self, state: Any, X: Matrix, prior: Any) -> Choice:
        """The candidate to show: a row of X (shape (n >= 1, d))."""
        ...

    def propensity(self, choice: Choice) -> float:
        """P(the policy picks choice.index | its state and X): 1.0, because `choose`
        must be deterministic. The service does not log this value: it logs the
        probabilities of its exploration (OO_EXPLORATION, core/exploration.py) around
        the policy's choice, which are exact only for a deterministic `choose`."""
        ...

    def update(self, state: Any, x: Vector, reward: float) -> Any:
        """The state after observing `reward` (finite) for the shown vector x (shape (d,))."""
        ...

    def correct(self, state: Any, x: Vector, delta: float, age: int) -> Any:
        """The state as if the reward learned for x, `age` updates ago (0: the latest),
        had been `delta` larger: what re-learning from scratch with the corrected reward
        would give, forgetting included. For a reward kept under an aggregation rule
        (OO_REWARD_AGGREGATION) that changes after it was learned."""
        ...

    def theta(self, state: Any, prior: Any) -> Vector:
        """The weights the policy currently estimates, shape (d,), in feature_names order."""
        ...

    def explain(self, state: Any, x: Vector, prior: Any) -> Explanation:
        """The score of x (shape (d,)), split by feature, and its exploration bonus."""
        ...

    def arrays(self, state: Any) -> dict[str, Matrix | Vector]:
        """The state as named arrays, for exports and people."""
        ...

    def pool(self, x: Vector, reward: float) -> Vector:
        """This reward's increment to the population statistics, shape (pooled_size,)."""
        ...

    def problems(self, state: Any) -> list[tuple[str, str]]:
        """Broken invariants of a decoded state, as (rule, detail); [] when sound."""
        ...
