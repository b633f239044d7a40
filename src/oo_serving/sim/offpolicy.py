"""The whole evaluation pipeline on the simulator, where every true value is known.

The service itself (its Service, a real store, exploration and shadow policies, exactly
as configured in production) serves the simulator's users; rewards are the simulator's
responses. Then `oo-serving evaluate`'s own code reads the log back. Because the
simulator knows each candidate's expected reward (its utility), the true value of every
policy evaluate reports is known *for the decisions it evaluated*: the mean over those
decisions of Σₐ π(a|x) · utility(a), π being what that policy chose there (the logged
greedy choice, each shadow's logged choice) or the logged probabilities for `logging`.
That is exactly the estimand, so each estimate's error and each interval's coverage can
be checked, seed by seed, on a log written by the real service.

An ignored tip gets no reward (nothing is posted), and whether a tip is ignored does not
depend on the tip (simulator.py), so evaluate's skipping of unrewarded decisions is
unbiased here; E[reward | not ignored] = utility.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from oo_serving.assignment import Assignment
from oo_serving.core import registry
from oo_serving.core.exploration import Exploration
from oo_serving.evaluation import log as evaluation
from oo_serving.evaluation.result import EvaluationResult
from oo_serving.service import Candidate, Service
from oo_serving.sim.scenarios import Scenario
from oo_serving.sim.simulator import Simulator
from oo_serving.store.base import Store


@dataclass(frozen=True, slots=True)
class OffPolicyRun:
    """What evaluate said, and the true value of each policy on the same decisions."""

    result: EvaluationResult
    truth: dict[str, float]


async def serve_and_evaluate(
    store: Store,
    scenario: Scenario,
    seed: int,
    *,
    policy: str = "linucb-v1",
    epsilon: float = 0.1,
    shadows: Sequence[str] = ("linucb-v2",),
    cohort: int = 8,
    evaluator_options: dict[str, float] | None = None,
) -> OffPolicyRun:
    """Serve every round of the scenario (users arriving `cohort` at a time, each
    cohort round by round) through the service on `store` (empty), post each non-ignored
    response as the reward, then evaluate the log."""
    sim = Simulator.create(scenario, seed)
    shadow_policies = [registry.make(name) for name in shadows]
    service = Service(
        store,
        Assignment.single(registry.make(policy)),
        exploration=Exploration(epsilon),
        shadows=shadow_policies,
        decision_log_per_user=max(scenario.rounds, 1),
        reward_wait_ms=None,
    )
    utilities: dict[str, np.ndarray] = {}
    for first in range(0, scenario.users, cohort):
        members = range(first, min(first + cohort, scenario.users))
        for t in range(scenario.rounds):
            for user in members:
                r = sim.round(user, t)
                offered = [Candidate(f"t{i}", c) for i, c in enumerate(r.candidates)]
                context = {"hour_of_day": r.context.hour_of_day, "day_of_week": 0}
                answer = await service.score(f"u{user}", offered, context)
                utilities[answer.event_id] = r.utilities
                if not r.ignored:
                    shown = int(answer.tip_id[1:])
                    await service.reward(f"u{user}", None, r.reward(shown), None, answer.event_id)
        await service.population.refresh()
    names = ("logging", "uniform", evaluation.GREEDY, *shadows)
    sums = dict.fromkeys(names, 0.0)
    count = 0
    async with store.decision_log(0, 2**62) as pages:
        async for page in pages:
            for d in page:
                if d.reward is None:
                    continue
                u = utilities[d.event_id]
                assert d.candidate_p is not None
                assert d.greedy is not None
                sums["logging"] += float(d.candidate_p @ u)
                sums["uniform"] += float(u.mean())
                sums[evaluation.GREEDY] += float(u[d.greedy])
                for name in shadows:
                    sums[name] += float(u[d.shadow[name]])
                count += 1
        truth = {name: total / max(count, 1) for name, total in sums.items()}
    async with store.decision_log(0, 2**62) as pages:
        result = await evaluation.evaluate(
            pages,
            now_ms=service.now_ms(),
            rewards=evaluation.Rewards(wait_ms=None),
            shadows=tuple(shadows),
            evaluator_options=evaluator_options,
        )
    return OffPolicyRun(result=dataclasses.replace(result), truth=truth)
