"""Where a request becomes one transaction.

Each public method takes plain values (already validated by the API), builds the pure
function that turns the user's stored row into what must be written, and hands it to
the store, which runs it inside one transaction with the user's row locked. The learning
maths is the core's; time and ids come from here, never from the core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from oo_serving import shadow
from oo_serving.assignment import Assignment
from oo_serving.core import exploration as exploration_mod
from oo_serving.core import registry
from oo_serving.core.exploration import Exploration
from oo_serving.core.features import TaskFeatures, Vector, logged_features
from oo_serving.core.policy import Explanation, Policy
from oo_serving.errors import TipMismatch, UnknownEvent
from oo_serving.population import Population
from oo_serving.store.base import (
    KEYSET_START,
    DecisionLookup,
    DecisionMark,
    DecisionRecord,
    DecisionRef,
    HistoryEntry,
    Keyset,
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
        if self._pid != _pid or self._offset + self._BYTES > len(self._block):
            self._pid = _pid
            self._block = os.urandom(self.BLOCK)
            self._offset = 0
        rand = int.from_bytes(self._block[self._offset : self._offset + self._BYTES], "big")
        self._offset += self._BYTES
        value = (now_ms() & (2**48 - 1)) << 80 | rand
        value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
        value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
        h = f"{value:032x}"  # str(uuid.UUID(int=value)), without building the object
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# The process id, kept current across forks without a system call per id.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


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
    propensity: float = 1.0
    explored: bool = False
    """The exploration showed another candidate than the policy's own choice."""
    explanation: Explanation | None = None
    agreement: Mapping[str, bool] = field(default_factory=dict)
    """Per shadow policy: whether it chose what the serving policy preferred."""


@dataclass(frozen=True, slots=True)
class RewardResult:
    """learned: whether the model changed (False for a repeat that changes nothing
    under the aggregation rule, or a reward after the window).

    event_id: the decision the reward was joined to; None when it was learned on the
    features in the request because no logged decision matched. kept: the reward the
    decision now keeps under the aggregation rule. late: it came after the reward
    window: stored, not learned, and, for a repeat, changing nothing learned. reward_n:
    how many rewards the decision has received, this one included (None: no decision's
    reward columns were written). repeat: the decision had a reward already, and
    `aggregation` is the rule that combined them (None when not a repeat).
    """

    learned: bool
    event_id: str | None
    kept: float | None = None
    late: bool = False
    reward_n: int | None = None
    repeat: bool = False
    aggregation: str | None = None


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
        exploration: Exploration = exploration_mod.NONE,
        shadows: Sequence[Policy] = (),
        reward_wait_ms: int | None = None,
        aggregation: str = "first",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        self.store = store
        self.assignment = assignment or Assignment.single(registry.DEFAULTS["linucb-v1"])
        self.exploration = exploration
        self.shadows = tuple(shadows)
        self.shadow_names = tuple(s.name for s in self.shadows)
        self.reward_wait_ms = reward_wait_ms
        self.aggregation = aggregation
        self.history_size = history_size
        self.decisions_kept = max(decision_log_per_user, history_size)
        self._clock_ms = clock_ms
        self._event_ids = event_ids or EventIds()
        self.population = population or Population(
            store, (*self.assignment.policies, *self.shadows), clock_ms=clock_ms
        )

    async def score(
        self,
        user_id: str,
        candidates: Sequence[Candidate],
        context: Mapping[str, int] | None = None,
        *,
        explain: bool = False,
    ) -> ScoreResult:
        """Choose one candidate (exploring, if configured), log the decision with every
        candidate's raw features and probability and each shadow policy's choice, count
        the pull."""
        policy = self.assignment.policy_for(user_id)
        tasks = [c.features for c in candidates]
        X = policy.features(tasks)
        raw = np.array(tasks, dtype=np.float64).reshape(-1, 4)
        candidate_ids = tuple(c.id for c in candidates)
        context_json = dict(context or {})
        prior = self.population.prior(policy.name)
        shadows = self._shadows_of(policy)
        shadow_inputs = {
            s.name: (s.features(tasks), self.population.prior(s.name)) for s in shadows
        }
        event_id = self._event_ids()
        ts = self._clock_ms()
        n = len(candidates)
        explanation: Explanation | None = None
        agreement: dict[str, bool] = {}

        def decide(user: UserRecord | None, replay: Replay | None) -> ScoreWrite:
            nonlocal explanation, agreement
            state, encoded = self._state_of(policy, user, replay)
            shadow_states, shadows_raw = self._shadow_states(shadows, user, replay)
            choice = policy.choose(state, X, prior)
            greedy = choice.index
            index = self.exploration.choose(event_id, n, greedy)
            p = self.exploration.probabilities(n, greedy)
            shadow_choices = {name: greedy for name in self.shadow_names}
            for s in shadows:
                pick = s.choose(shadow_states[s.name], *shadow_inputs[s.name])
                shadow_choices[s.name] = pick.index
            agreement = {name: i == greedy for name, i in shadow_choices.items()}
            chosen = candidates[index]
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
                shadows=shadows_raw,
            )
            decision = DecisionRecord(
                user_id=user_id,
                seq=seq,
                event_id=event_id,
                ts_ms=ts,
                tip_id=chosen.id,
                features=chosen.features.as_dict(),
                x=X[index],
                score=float(choice.scores[index]),
                policy=policy.name,
                propensity=float(p[index]),
                model_version=reward_count,
                candidate_ids=candidate_ids,
                candidate_X=X,
                candidate_features=raw,
                context=context_json,
                candidate_p=p,
                greedy=greedy,
                shadow=shadow_choices,
            )
            if explain:
                explanation = policy.explain(state, X[index], prior)
            return ScoreWrite(record, decision, keep_from_seq=seq - self.decisions_kept + 1)

        write = await self.store.score_tx(user_id, decide)
        d = write.decision
        return ScoreResult(
            tip_id=d.tip_id,
            score=d.score,
            policy=d.policy,
            event_id=d.event_id,
            propensity=d.propensity,
            explored=d.greedy is not None and d.tip_id != d.candidate_ids[d.greedy],
            explanation=explanation,
            agreement=agreement,
        )

    async def reward(
        self,
        user_id: str,
        tip_id: str | None,
        reward: float,
        features: TaskFeatures | None,
        event_id: str | None = None,
        *,
        source: str = "client",
    ) -> RewardResult:
        """Learn from a reward, on the candidate that was shown.

        With event_id: on that decision's candidate; tip_id, if given, must be that
        decision's; features are not used. Without: on the user's latest decision for
        tip_id, or, if none is logged, on the features in the request (the prototype's
        behaviour); both are then required.

        A decision's first reward is learned if it arrives within the reward window
        (OO_REWARD_WAIT) of the decision, and otherwise stored unlearned. Later rewards
        for the same decision are kept under the aggregation rule: if that changes the
        kept value of a learned reward, the model (and each shadow's) is corrected
        exactly as if the new value had been learned in the first place. A reward after
        the window never changes what was learned. source "default" (the sweep's default
        reward) applies only to a decision with no reward, and is never late. Without
        event_id, a reward for a tip whose latest decision already has one is learned as
        a new observation, as the prototype learned every reward.
        """
        if event_id is None and (tip_id is None or features is None):
            raise ValueError("a reward without event_id needs tip_id and features")
        policy = self.assignment.policy_for(user_id)
        shadows = self._shadows_of(policy)
        ts = self._clock_ms()
        learned: list[tuple[TaskFeatures, float, float | None]] = []  # (on, new, old)
        late = False  # this reward came after its decision's window

        def learn(
            user: UserRecord | None, ref: DecisionRef | None, replay: Replay | None
        ) -> RewardWrite:
            nonlocal late
            learned.clear()
            late = False
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
            if ref is None:  # no logged decision: the request's features (the prototype's)
                assert features is not None  # no decision, so no event_id: features required
                new_user = self._relearn(
                    user_id, policy, shadows, user, replay, features, None, ts, reward=reward
                )
                learned.append((features, reward, None))
                return RewardWrite(new_user, None, None)
            if ref.reward is not None and source != "client":
                return RewardWrite(None, None, ref.event_id)  # a default never overrides
            on = logged_features(ref.features)
            if event_id is None and ref.reward is not None and not self._late(ref.ts_ms, ts):
                # Without event_id, as the prototype: each reward is a new observation of
                # the tip's latest decision, not a repeat of its first.
                new_user = self._relearn(
                    user_id, policy, shadows, user, replay, on, ref, ts, reward=reward
                )
                learned.append((on, reward, None))
                return RewardWrite(new_user, None, ref.event_id)
            late = source == "client" and self._late(ref.ts_ms, ts)
            record: UserRecord | None = None
            learned_at = ref.learned_at
            if ref.reward is None:  # the first reward
                kept = reward
                if not late:
                    record = self._relearn(
                        user_id, policy, shadows, user, replay, on, ref, ts, reward=reward
                    )
                    learned_at = record.reward_count
                    learned.append((on, reward, None))
            elif ref.learned and late:
                kept = ref.reward  # after the window nothing learned changes; it is counted
            else:
                old = ref.reward
                kept = aggregate(self.aggregation, old, reward)
                if ref.learned and kept != old:
                    record = self._relearn(
                        user_id, policy, shadows, user, replay, on, ref, ts, reward=kept, old=old
                    )
                    learned.append((on, kept, old))
            mark = DecisionMark(
                event_id=ref.event_id,
                reward=kept,
                rewarded_ms=ts,
                reward_n=ref.reward_n + 1,
                learned=ref.learned or learned_at is not None,
                learned_at=learned_at,
                reward_source=source,
                reward_n_before=ref.reward_n,
            )
            return RewardWrite(record, mark, ref.event_id)

        # The lookup goes by event_id when there is one; only without it is tip_id read.
        lookup = DecisionLookup(tip_id=tip_id, event_id=event_id)
        write = await self.store.reward_tx(user_id, lookup, learn)
        for on, new, old in learned:  # only once committed
            if old is None:
                self.population.learn(on, new)
            else:
                self.population.correct(on, old, new)
        mark = write.mark
        repeat = mark is not None and mark.reward_n > 1
        return RewardResult(
            learned=write.user is not None,
            event_id=write.matched_event,
            kept=mark.reward if mark is not None else (reward if write.user else None),
            late=late,
            reward_n=None if mark is None else mark.reward_n,
            repeat=repeat,
            aggregation=self.aggregation if repeat else None,
        )

    async def sweep_default_rewards(
        self, default: float, *, until_ms: int | None = None, batch_size: int = 500
    ) -> int:
        """Give every decision logged before the reward window closed and never
        rewarded the reward `default` (learned: it is the reward at the window's end);
        how many it gave. Safe to run from many processes at once and to re-run: each
        decision is one transaction on its user, which gives the default only to a
        decision still without a reward. Goes on from where the last sweep stopped."""
        if self.reward_wait_ms is None:
            raise ValueError("a default reward needs a reward window (OO_REWARD_WAIT)")
        until = (until_ms if until_ms is not None else self._clock_ms()) - self.reward_wait_ms
        since = await self.store.sweep_mark(SWEEP_DEFAULT_REWARD)
        after: Keyset = KEYSET_START
        given = 0
        while page := await self.store.unrewarded(
            since if since is not None else -(2**63), until, after, batch_size
        ):
            for _, user_id, _, event_id in page:
                try:
                    result = await self.reward(
                        user_id, None, default, None, event_id, source="default"
                    )
                except UnknownEvent:
                    continue  # reset, or pruned since the page was read
                given += result.learned
            after = page[-1][:3]
        await self.store.set_sweep_mark(SWEEP_DEFAULT_REWARD, until)
        return given

    def _late(self, decided_ms: int, now_ms: int) -> bool:
        return self.reward_wait_ms is not None and now_ms - decided_ms > self.reward_wait_ms

    def _relearn(
        self,
        user_id: str,
        policy: Policy,
        shadows: Sequence[Policy],
        user: UserRecord | None,
        replay: Replay | None,
        on: TaskFeatures,
        ref: DecisionRef | None,
        ts: int,
        *,
        reward: float,
        old: float | None = None,
    ) -> UserRecord:
        """The user's row after learning `reward` on the candidate `on` (the decision
        `ref`'s, if any), by the serving policy and every shadow: a new observation, or
        with `old`, the correction of the one learned as `old` for ref."""
        count = user.reward_count if user else 0
        if old is None:

            def step(p: Policy, state: Any, x: Vector) -> Any:
                return p.update(state, x, reward)

        else:
            assert ref is not None
            assert ref.learned_at is not None
            age = max(count - ref.learned_at, 0)

            def step(p: Policy, state: Any, x: Vector) -> Any:
                return p.correct(state, x, reward - old, age)

        state, _ = self._state_of(policy, user, replay)
        shadow_states, _ = self._shadow_states(shadows, user, replay)
        x = ref.x if ref is not None and ref.policy == policy.name else policy.features([on])[0]
        stored = {
            s.name: (s.state_version, s.encode(step(s, shadow_states[s.name], s.features([on])[0])))
            for s in shadows
        }
        return UserRecord(
            user_id=user_id,
            policy=policy.name,
            state=policy.encode(step(policy, state, x)),
            state_version=policy.state_version,
            pulls=user.pulls if user else 0,
            reward_count=count + (1 if old is None else 0),
            cumulative_reward=(user.cumulative_reward if user else 0.0)
            + (reward if old is None else reward - old),
            last_updated_ms=ts,
            shadows=shadow.encode(stored),
        )

    def now_ms(self) -> int:
        """The service's clock, in Unix ms."""
        return self._clock_ms()

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

    def _shadows_of(self, policy: Policy) -> tuple[Policy, ...]:
        """The shadow policies that keep a state of their own for a user `policy` serves
        (a shadow that is also the serving policy is that policy)."""
        return tuple(s for s in self.shadows if s.name != policy.name)

    def _shadow_states(
        self, shadows: Sequence[Policy], user: UserRecord | None, replay: Replay | None
    ) -> tuple[dict[str, Any], bytes | None]:
        """Each shadow's state for the user, and the stored value to write: the user's
        as it is, unless a state had to be rebuilt (a shadow added since the user last
        learned, or a state this release does not read), which raises ReplayNeeded first
        as _state_of does."""
        try:
            stored = shadow.decode(user.shadows if user else None)
        except ValueError:
            stored = {}
        states: dict[str, Any] = {}
        rebuilt = False
        for s in shadows:
            version, raw = stored.get(s.name, (None, b""))
            if version == s.state_version:
                try:
                    states[s.name] = s.decode(raw, version)
                    continue
                except ValueError:
                    pass
            if user is None or user.reward_count == 0:
                states[s.name] = s.initial_state()
                continue
            if replay is None:
                raise ReplayNeeded
            states[s.name] = _replayed(s, replay)
            stored[s.name] = (s.state_version, s.encode(states[s.name]))
            rebuilt = True
        if not rebuilt:
            return states, user.shadows if user else None
        kept = {name: stored[name] for name in self.shadow_names if name in stored}
        return states, shadow.encode(kept)

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
        return _replayed(policy, replay), None


AGGREGATIONS = ("first", "latest", "sum", "max")
SWEEP_DEFAULT_REWARD = "default-reward"
"""The sweep_mark of the default-reward sweep."""


def aggregate(rule: str, kept: float | None, new: float) -> float:
    """The reward a decision keeps under `rule` when `new` arrives after `kept`."""
    if kept is None or rule == "latest":
        return new
    if rule == "first":
        return kept
    if rule == "sum":
        return kept + new
    if rule == "max":
        return max(kept, new)
    raise ValueError(f"no aggregation rule {rule!r}")


def _replayed(policy: Policy, replay: Replay) -> Any:
    """A policy's state learned from scratch on a user's learned rewards."""
    state = policy.initial_state()
    for logged in replay:
        x = policy.features([logged_features(logged.features)])[0]
        state = policy.update(state, x, logged.reward)
    return state


def _floats(v: Vector) -> list[float]:
    return [float(x) for x in v]
