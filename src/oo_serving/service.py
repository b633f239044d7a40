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
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NamedTuple

from oo_serving.core.features import TaskFeatures, feature_matrix, feature_vector
from oo_serving.core.linucb import LinUCBState
from oo_serving.core.policy import LINUCB_V1, LinUCBPolicy
from oo_serving.errors import Conflict, TipMismatch, UnknownEvent
from oo_serving.store.base import (
    DecisionLookup,
    DecisionRecord,
    DecisionRef,
    HistoryEntry,
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
    tip_id: str
    score: float
    policy: str
    event_id: str


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
    user_id: str
    pulls: int
    reward_count: int
    cumulative_reward: float
    estimated_mean: float
    theta: list[float]
    last_updated_ms: int | None


class Service:
    """The operations of the API, each one transaction on one user."""

    def __init__(
        self,
        store: Store,
        policy: LinUCBPolicy = LINUCB_V1,
        *,
        history_size: int = 100,
        decision_log_per_user: int = 1000,
        clock_ms: Callable[[], int] = now_ms,
        event_ids: Callable[[], str] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.history_size = history_size
        self.decisions_kept = max(decision_log_per_user, history_size)
        self._clock_ms = clock_ms
        self._event_ids = event_ids or EventIds()

    async def score(self, user_id: str, candidates: Sequence[Candidate]) -> ScoreResult:
        """Choose one candidate, log the decision, count the pull."""
        X = feature_matrix([c.features for c in candidates])
        candidate_ids = tuple(c.id for c in candidates)
        event_id = self._event_ids()
        ts = self._clock_ms()

        def decide(user: UserRecord | None) -> ScoreWrite:
            state = self._state_of(user)
            choice = self.policy.choose(state, X)
            chosen = candidates[choice.index]
            seq = (user.pulls if user else 0) + 1
            reward_count = user.reward_count if user else 0
            record = UserRecord(
                user_id=user_id,
                policy=self.policy.name,
                A_inv=state.A_inv,
                b=state.b,
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
                policy=self.policy.name,
                propensity=self.policy.propensity(choice),
                model_version=reward_count,
                candidate_ids=candidate_ids,
                candidate_X=X,
            )
            return ScoreWrite(record, decision, keep_from_seq=seq - self.decisions_kept + 1)

        write = await self.store.score_tx(user_id, decide)
        d = write.decision
        return ScoreResult(tip_id=d.tip_id, score=d.score, policy=d.policy, event_id=d.event_id)

    async def reward(
        self,
        user_id: str,
        tip_id: str | None,
        reward: float,
        features: TaskFeatures | None,
        event_id: str | None = None,
    ) -> RewardResult:
        """Learn from a reward, on the vector that was scored.

        With event_id: on that decision's vector, once; a repeat is acknowledged and not
        learned again. tip_id, if given, must be that decision's; features are not used.
        Without: on the user's latest decision for tip_id, or, if none is logged, on the
        features in the request (the prototype's behaviour); both are then required.
        """
        if event_id is None and (tip_id is None or features is None):
            raise ValueError("a reward without event_id needs tip_id and features")
        x_from_request = None if features is None else feature_vector(features)
        ts = self._clock_ms()

        def learn(user: UserRecord | None, ref: DecisionRef | None) -> RewardWrite:
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
            state = self._state_of(user)
            x = ref.x if ref is not None else x_from_request
            assert x is not None  # no decision, so no event_id: features were required
            new_state = self.policy.update(state, x, reward)
            record = UserRecord(
                user_id=user_id,
                policy=self.policy.name,
                A_inv=new_state.A_inv,
                b=new_state.b,
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
        return RewardResult(learned=write.user is not None, event_id=write.matched_event)

    async def reset(self, user_id: str) -> bool:
        """Forget the user's model and decisions; True if there was anything."""
        return await self.store.delete_user(user_id)

    async def stats(self, user_id: str) -> Stats:
        user = await self.store.get_user(user_id)
        if user is None:
            return Stats(user_id, 0, 0, 0.0, 0.0, [0.0] * self.policy.d, None)
        mean = user.cumulative_reward / user.reward_count if user.reward_count else 0.0
        theta = LinUCBState(A_inv=user.A_inv, b=user.b).theta
        return Stats(
            user_id=user_id,
            pulls=user.pulls,
            reward_count=user.reward_count,
            cumulative_reward=user.cumulative_reward,
            estimated_mean=mean,
            theta=[float(v) for v in theta],
            last_updated_ms=user.last_updated_ms,
        )

    async def history(self, user_id: str) -> list[HistoryEntry]:
        return await self.store.history(user_id, self.history_size)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        await self.store.ping()

    def export(self, user_id: str) -> AbstractAsyncContextManager[UserExport]:
        """Everything stored about the user, as one snapshot held until the context exits;
        its decisions come in pages, read as they are consumed."""
        return self.store.export_user(user_id)

    def _state_of(self, user: UserRecord | None) -> LinUCBState:
        if user is None:
            return self.policy.initial_state()
        if user.policy != self.policy.name or user.b.shape != (self.policy.d,):
            raise Conflict(
                f"this user's model was learned by policy {user.policy!r}, not"
                f" {self.policy.name!r}; reset the user to start over",
                loc=("body", "user_id"),
            )
        return LinUCBState(A_inv=user.A_inv, b=user.b)
