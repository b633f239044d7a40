"""Policies by name. A policy is settings plus the pure functions that use them.

`linucb-v1` is the prototype's policy, kept exactly: d = 5, α = 1, A₀ = I, b₀ = 0,
deterministic (propensity 1.0), ties to the first candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oo_serving.core import linucb
from oo_serving.core.features import Matrix, Vector
from oo_serving.core.linucb import Choice, LinUCBParams, LinUCBState


@dataclass(frozen=True, slots=True)
class LinUCBPolicy:
    """A deterministic LinUCB policy under a stable name.

    The name is what decisions are logged under: change the parameters, change the name.
    """

    name: str
    params: LinUCBParams = field(default_factory=LinUCBParams)

    @property
    def d(self) -> int:
        return self.params.d

    def initial_state(self) -> LinUCBState:
        return linucb.initial_state(self.params)

    def choose(self, state: LinUCBState, X: Matrix) -> Choice:
        return linucb.choose(self.params, state, X)

    def propensity(self, choice: Choice) -> float:
        """P(policy picks `choice.index` | X): 1.0, LinUCB is deterministic."""
        return 1.0

    def update(self, state: LinUCBState, x: Vector, reward: float) -> LinUCBState:
        return linucb.update(state, x, reward)


LINUCB_V1 = LinUCBPolicy(name="linucb-v1", params=LinUCBParams(alpha=1.0))

POLICIES: dict[str, LinUCBPolicy] = {LINUCB_V1.name: LINUCB_V1}
