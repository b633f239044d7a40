"""`oo-serving evaluate`: the decision log, read once in time order, into the estimators.

What is evaluated, on every decision in the range (each is paired with every other on
the same events):

- `logging`: what ran, exploration included (its own logged probabilities);
- `uniform`: a candidate drawn uniformly;
- `greedy`: the serving policy without its exploration (the logged `greedy` choice);
- each shadow policy (OO_SHADOW_POLICIES): its logged choice on the same request;
- each policy given with `--policy` ("trained"): learned, user by user, from the
  decisions before `train_until` exactly as the service would have learned them (its
  population prior from those decisions too), then frozen and asked to choose on every
  decision from `train_until` on. Only the decisions from `train_until` are evaluated
  then, for every policy, so that all are compared on the same events.

Rewards: a decision's kept reward (late ones included: they are what the user did). A
decision without one is skipped while its reward window is open ("pending"); after it,
it counts as OO_DEFAULT_REWARD when one is set (what the sweep gives it) or as
`unrewarded_as`, and is skipped otherwise ("no_reward").

The reward model of the DR estimator is a ridge regression on linucb-v2's eleven
features of each candidate (hour × task interactions included), fitted progressively on
the decisions before each one.

Memory: the estimators' state is bounded; a trained policy keeps one state per user it
has seen learn, up to `max_trained_users` (users beyond are treated as new users, and
the result says how many).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oo_serving.core import registry
from oo_serving.core.features import Matrix, TaskFeatures, logged_features
from oo_serving.core.policy import Policy, Pooled
from oo_serving.evaluation.estimators import Evaluator, LoggedEvent
from oo_serving.evaluation.result import EvaluationResult
from oo_serving.store.base import DecisionRecord

GREEDY = "greedy"
MAX_TRAINED_USERS = 200_000
_REWARD_FEATURES = registry.DEFAULTS["linucb-v2"]


@dataclass(frozen=True, slots=True)
class Rewards:
    """How a decision without a reward counts (see the module's docstring).

    wait_ms: the reward window; default: OO_DEFAULT_REWARD; unrewarded_as: the value of
    an unrewarded decision past its window when there is no default (None: skip it).
    """

    wait_ms: int | None
    default: float | None = None
    unrewarded_as: float | None = None

    def of(self, d: DecisionRecord, now_ms: int) -> float | str:
        """The reward to evaluate `d` with, or why it is skipped."""
        if d.reward is not None:
            return d.reward
        if self.wait_ms is not None and now_ms - d.ts_ms <= self.wait_ms:
            return "pending"
        if self.default is not None:
            return self.default
        if self.unrewarded_as is not None:
            return self.unrewarded_as
        return "no_reward"


class _Trained:
    """A registered policy learning per user (and for its population prior) from the
    log before `train_until`, frozen after."""

    def __init__(self, policy: Policy, max_users: int) -> None:
        self.policy = policy
        self.max_users = max_users
        self.states: dict[str, Any] = {}
        self.untracked = 0
        self._pooled: np.ndarray | None = None
        self._count = 0
        self._prior: Any = None
        self._frozen = False

    def learn(self, user_id: str, chosen: TaskFeatures, reward: float) -> None:
        p = self.policy
        x = p.features([chosen])[0]
        state = self.states.get(user_id)
        if state is None:
            if len(self.states) >= self.max_users:
                self.untracked += 1
                return
            state = p.initial_state()
        self.states[user_id] = p.update(state, x, reward)
        if p.pooled_size:
            increment = p.pool(x, reward)
            self._pooled = increment if self._pooled is None else self._pooled + increment
            self._count += 1

    def choose(self, user_id: str, tasks: Sequence[TaskFeatures]) -> int:
        p = self.policy
        if not self._frozen:
            pooled = None if self._pooled is None else Pooled(self._count, self._pooled)
            self._prior = p.prior(pooled)
            self._frozen = True
        state = self.states.get(user_id)
        if state is None:
            state = p.initial_state()
        return p.choose(state, p.features(tasks), self._prior).index


def _tasks(d: DecisionRecord) -> list[TaskFeatures]:
    assert d.candidate_features is not None
    return [
        TaskFeatures(int(row[0]), bool(row[1]), float(row[2]), int(row[3]))
        for row in d.candidate_features
    ]


def _one_hot(n: int, index: int) -> np.ndarray:
    p = np.zeros(n)
    p[index] = 1.0
    return p


async def evaluate(
    pages: AsyncIterator[list[DecisionRecord]],
    *,
    now_ms: int,
    rewards: Rewards,
    shadows: Sequence[str] = (),
    trained: Mapping[str, Policy] | None = None,
    train_until_ms: int | None = None,
    max_trained_users: int = MAX_TRAINED_USERS,
    alpha: float = 0.05,
    evaluator_options: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Read the decision log (pages in time order) once and estimate every policy.

    trained: name → policy to train before train_until_ms and evaluate after it
    (required together). A shadow named in `shadows` must have its choice logged: a
    decision without it is skipped ("no_shadow_choice").
    """
    trained = dict(trained or {})
    if trained and train_until_ms is None:
        raise ValueError("a trained policy needs train_until_ms")
    overlap = set(trained) & ({GREEDY, *shadows})
    if overlap:
        raise ValueError(f"named twice, as shadow and as trained: {', '.join(sorted(overlap))}")
    learners = {name: _Trained(p, max_trained_users) for name, p in trained.items()}
    names = (GREEDY, *shadows, *trained)
    evaluator = Evaluator(names, alpha=alpha, **dict(evaluator_options or {}))
    skipped: Counter[str] = Counter()
    async for page in pages:
        for d in page:
            reward = rewards.of(d, now_ms)
            training = train_until_ms is not None and d.ts_ms < train_until_ms
            if training:
                if d.reward is not None and d.learned:  # what the service learned
                    chosen = logged_features(d.features)
                    for learner in learners.values():
                        learner.learn(d.user_id, chosen, d.reward)
                skipped["training"] += 1
                continue
            if isinstance(reward, str):
                skipped[reward] += 1
                continue
            if d.candidate_features is None:
                skipped["no_candidate_features"] += 1
                continue
            missing = [s for s in shadows if s not in d.shadow]
            if missing:
                skipped["no_shadow_choice"] += 1
                continue
            n = len(d.candidate_ids)
            chosen_index = d.candidate_ids.index(d.tip_id)
            logging_p = d.candidate_p if d.candidate_p is not None else _one_hot(n, chosen_index)
            greedy = d.greedy if d.greedy is not None else chosen_index
            tasks = _tasks(d)
            targets = {GREEDY: _one_hot(n, greedy)}
            for s in shadows:
                targets[s] = _one_hot(n, d.shadow[s])
            for name, learner in learners.items():
                targets[name] = _one_hot(n, learner.choose(d.user_id, tasks))
            features: Matrix = _REWARD_FEATURES.features(tasks)
            evaluator.add(
                LoggedEvent(
                    user_id=d.user_id,
                    ts_ms=d.ts_ms,
                    chosen=chosen_index,
                    reward=float(reward),
                    logging_p=logging_p,
                    features=features,
                    targets=targets,
                )
            )
    for name, learner in learners.items():
        if learner.untracked:
            skipped[f"untrained_user_rewards:{name}"] = learner.untracked
    return dataclasses.replace(evaluator.result(), skipped=dict(skipped))
