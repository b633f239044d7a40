"""Where a request becomes one transaction.

Each public method takes plain values (already validated by the API), builds the pure
function that turns the user's stored row into what must be written, and hands it to
the store, which runs it inside one transaction with the user's row locked. The learning
maths is the core's; time and ids come from here, never from the core.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from oo_serving.assignment import Assignment
from oo_serving.core import registry
from oo_serving.core.features import TaskFeatures, Vector
from oo_serving.core.policy import Explanation, Policy
from oo_serving.errors import TipMismatch, UnknownEvent
from oo_serving.population import Population
from oo_serving.store.base import (
    DecisionLookup,
    DecisionRecord,
    DecisionRef,
    HistoryEntry,
    Replay,
    ReplayNeeded,
    RewardWrite,
    ScoreWrite,
    Store,
    UserExport,
    UserRecord,
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class EventIds:
    """Event ids: UUIDs in the version-7 layout, 48 bits of Unix ms then 74 random bits.

    Time-ordered, so the decision log's event index grows at its end. The random bits are
    the OS's (`os.urandom`), read in blocks of BLOCK bytes because one read per id cost
    more than the rest of the id: unpredictable from earlier ids, unlike a seeded
    Mersenne Twister, whose state 624 outputs reveal. A forked child drops its parent's
    block, so two processes never share bits.
    """

    BLOCK = 4096  # 409 ids a read
    _BYTES = 10  # 80 bits a id, of which the layout keeps 74

    def __init__(self) -> None:
        self._pid = -1
        self._block = b""
        self._offset = 0

    def __call__(self) -> str:
        if self._pid != os.getpid() or self._offset + self._BYTES > len(self._block):
            self._pid = os.getpid()
            self._block = os.urandom(self.BLOCK)
            self._offset = 0
        rand = int.from_bytes(self._block[self._offset : self._offset + self._BYTES], "big")
        self._offset += self._BYTES
        value = (now_ms() & (2**48 - 1)) << 80 | rand
        value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
        value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
        return str(uuid.UUID(int=value))


class Candidate(NamedTuple):
    """One tip offered to /score, with the features it is scored on."""

    id: str
    features: TaskFeatures


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """explanation: the chosen candidate's, when asked for."""

    tip_id: str
    score: float
    policy: str
    event_id: str
    explanation: Explanation | None = None


@dataclass(frozen=True, slots=True)
class RewardResult:
    """learned: False when the reward repeats one already learned for event_id.

    event_id: the decision the reward was joined to; None when it was learned on the
    features in the request because no logged decision matched.
    """

    learned: bool
    event_id: str | None


@dataclass(frozen=True, slots=True)
class Stats:
    """policy: the policy whose weights `theta` are (feature_names order): the one that
    learned the stored model, or for an unknown user the one that would serve it."""

    user_id: str
    pulls: int
    reward_count: int
    cumulative_reward: float
    estimated_mean: float
    policy: str
    feature_names: tuple[str, ...]
    theta: list[float]
    last_updated_ms: int | None


class Service:
    """The operations of the API, each one transaction on one user.

    Which policy serves a user is the assignment's; the policy owns its features and the
    state it stores. A user whose stored model was learned by another policy (the split
    changed, or OO_POLICY did) has its model rebuilt under the serving policy from its
    logged decisions and rewards, in the same transaction: a switch loses no learning
    that the log still holds, and never fails.
    """

    def __init__(
        self,
        store: Store,
        assignment: Assignment | None = None,
        *,
        history_size: int = 100,
        decision_log_per_user: int = 1000,
        clock_ms: Callable[[], int] = now_ms,
        event_ids: Callable[[], str] | None = None,
        population: Population | None = None,
    ) -> None:
        self.store = store
        self.assignment = assignment or Assignment.single(registry.DEFAULTS["linucb-v1"])
        self.history_size = history_size
        self.decisions_kept = max(decision_log_per_user, history_size)
        self._clock_ms = clock_ms
        self._event_ids = event_ids or EventIds()
        self.population = population or Population(
            store, self.assignment.policies, clock_ms=clock_ms
        )

    async def score(
        self,
        user_id: str,
        candidates: Sequence[Candidate],
        context: Mapping[str, int] | None = None,
        *,
        explain: bool = False,
    ) -> ScoreResult:
        """Choose one candidate, log the decision with every candidate's raw features,
        count the pull."""
        policy = self.assignment.policy_for(user_id)
        tasks = [c.features for c in candidates]
        X = policy.features(tasks)
        raw = np.array(tasks, dtype=np.float64).reshape(-1, 4)
        candidate_ids = tuple(c.id for c in candidates)
        context_json = dict(context or {})
        prior = self.population.prior(policy.name)
        event_id = self._event_ids()
        ts = self._clock_ms()
        explanation: Explanation | None = None

        def decide(user: UserRecord | None, replay: Replay | None) -> ScoreWrite:
            nonlocal explanation
            state, encoded = self._state_of(policy, user, replay)
            choice = policy.choose(state, X, prior)
            chosen = candidates[choice.index]
            seq = (user.pulls if user else 0) + 1
            reward_count = user.reward_count if user else 0
            record = UserRecord(
                user_id=user_id,
                policy=policy.name,
                state=encoded if encoded is not None else policy.encode(state),
                state_version=policy.state_version,
                pulls=seq,
                reward_count=reward_count,
                cumulative_reward=user.cumulative_reward if user else 0.0,
                last_updated_ms=ts,
            )
            decision = DecisionRecord(
                user_id=user_id,
                seq=seq,
                event_id=event_id,
                ts_ms=ts,
                tip_id=chosen.id,
                features=chosen.features.as_dict(),
                x=X[choice.index],
                score=choice.score,
                policy=policy.name,
                propensity=policy.propensity(choice),
                model_version=reward_count,
                candidate_ids=candidate_ids,
                candidate_X=X,
                candidate_features=raw,
                context=context_json,
            )
            if explain:
                explanation = policy.explain(state, X[choice.index], prior)
            return ScoreWrite(record, decision, keep_from_seq=seq - self.decisions_kept + 1)

        write = await self.store.score_tx(user_id, decide)
        d = write.decision
        return ScoreResult(
            tip_id=d.tip_id,
            score=d.score,
            policy=d.policy,
            event_id=d.event_id,
            explanation=explanation,
        )

    async def reward(
        self,
        user_id: str,
        tip_id: str | None,
        reward: float,
        features: TaskFeatures | None,
        event_id: str | None = None,
    ) -> RewardResult:
        """Learn from a reward, on the candidate that was scored.

        With event_id: on that decision's candidate, once; a repeat is acknowledged and
        not learned again. tip_id, if given, must be that decision's; features are not
        used. Without: on the user's latest decision for tip_id, or, if none is logged,
        on the features in the request (the prototype's behaviour); both are then required.
        """
        if event_id is None and (tip_id is None or features is None):
            raise ValueError("a reward without event_id needs tip_id and features")
        policy = self.assignment.policy_for(user_id)
        ts = self._clock_ms()
        learned_on: TaskFeatures | None = None

        def learn(
            user: UserRecord | None, ref: DecisionRef | None, replay: Replay | None
        ) -> RewardWrite:
            nonlocal learned_on
            if event_id is not None:
                if ref is None:
                    raise UnknownEvent(
                        f"no decision with event_id {event_id!r} for this user_id"
                        " (unknown, another user's, reset, or past retention)",
                        loc=("body", "event_id"),
                    )
                if tip_id is not None and ref.tip_id != tip_id:
                    raise TipMismatch(
                        f"event {event_id!r} chose tip_id {ref.tip_id!r}, not {tip_id!r}",
                        loc=("body", "tip_id"),
                    )
                if ref.reward is not None:
                    return RewardWrite(None, None, reward, ts, matched_event=ref.event_id)
            state, _ = self._state_of(policy, user, replay)
            if ref is not None:
                learned_on = _task_features(ref.features)
                x = ref.x if ref.policy == policy.name else policy.features([learned_on])[0]
            else:
                assert features is not None  # no decision, so no event_id: features required
                learned_on = features
                x = policy.features([features])[0]
            new_state = policy.update(state, x, reward)
            record = UserRecord(
                user_id=user_id,
                policy=policy.name,
                state=policy.encode(new_state),
                state_version=policy.state_version,
                pulls=user.pulls if user else 0,
                reward_count=(user.reward_count if user else 0) + 1,
                cumulative_reward=(user.cumulative_reward if user else 0.0) + reward,
                last_updated_ms=ts,
            )
            unrewarded = ref is not None and ref.reward is None
            return RewardWrite(
                record,
                reward_event=ref.event_id if ref is not None and unrewarded else None,
                reward=reward,
                ts_ms=ts,
                matched_event=ref.event_id if ref is not None else None,
            )

        # The lookup goes by event_id when there is one; only without it is tip_id read.
        lookup = DecisionLookup(tip_id=tip_id, event_id=event_id)
        write = await self.store.reward_tx(user_id, lookup, learn)
        if write.user is not None and learned_on is not None:
            self.population.learn(learned_on, reward)  # only once committed
        return RewardResult(learned=write.user is not None, event_id=write.matched_event)

    async def reset(self, user_id: str) -> bool:
        """Forget the user's model and decisions; True if there was anything."""
        return await self.store.delete_user(user_id)

    async def stats(self, user_id: str) -> Stats:
        user = await self.store.get_user(user_id)
        serving = self.assignment.policy_for(user_id)
        if user is None:
            initial = serving.theta(serving.initial_state(), self.population.prior(serving.name))
            return Stats(
                user_id, 0, 0, 0.0, 0.0, serving.name, serving.feature_names, _floats(initial), None
            )
        policy, _, theta = self.stored_model(user)
        mean = user.cumulative_reward / user.reward_count if user.reward_count else 0.0
        return Stats(
            user_id=user_id,
            pulls=user.pulls,
            reward_count=user.reward_count,
            cumulative_reward=user.cumulative_reward,
            estimated_mean=mean,
            policy=user.policy,
            feature_names=policy.feature_names if policy else (),
            theta=_floats(theta) if theta is not None else [],
            last_updated_ms=user.last_updated_ms,
        )

    def stored_model(self, user: UserRecord) -> tuple[Policy | None, Any, Vector | None]:
        """The policy that learned a stored model (None if this release does not know it),
        the decoded state and the weights it estimates for the user (both None if the
        state does not decode)."""
        policy = self._known(user.policy)
        if policy is None:
            return None, None, None
        try:
            state = policy.decode(user.state, user.state_version)
        except ValueError:
            return policy, None, None
        return policy, state, policy.theta(state, self.population.prior(policy.name))

    async def history(self, user_id: str) -> list[HistoryEntry]:
        return await self.store.history(user_id, self.history_size)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        await self.store.ping()

    def export(self, user_id: str) -> AbstractAsyncContextManager[UserExport]:
        """Everything stored about the user, as one snapshot held until the context exits;
        its decisions come in pages, read as they are consumed."""
        return self.store.export_user(user_id)

    def _known(self, name: str) -> Policy | None:
        for policy in self.assignment.policies:
            if policy.name == name:
                return policy
        return registry.DEFAULTS.get(name)

    def _state_of(
        self, policy: Policy, user: UserRecord | None, replay: Replay | None
    ) -> tuple[Any, bytes | None]:
        """The user's state under `policy`, and its stored bytes when it was stored so
        (None when it was rebuilt and must be written).

        A model of another policy, of a state version this release does not read, or of
        a policy it does not know, is rebuilt from the user's learned rewards: the first
        call raises ReplayNeeded, and the store calls again with them.
        """
        if user is None:
            return policy.initial_state(), None
        if user.policy == policy.name and user.state_version == policy.state_version:
            return policy.decode(user.state, user.state_version), user.state
        if replay is None:
            raise ReplayNeeded
        state = policy.initial_state()
        for logged in replay:
            x = policy.features([_task_features(logged.features)])[0]
            state = policy.update(state, x, logged.reward)
        return state, None


def _task_features(features: Mapping[str, Any]) -> TaskFeatures:
    """Raw features as logged (a JSON object) as the TaskFeatures they were scored as."""
    return TaskFeatures(
        int(features["hour_of_day"]),
        bool(features["is_overdue"]),
        float(features["task_age_days"]),
        int(features["priority"]),
    )


def _floats(v: Vector) -> list[float]:
    return [float(x) for x in v]
