"""What the dashboard shows, read from the service and shaped into plain values.

Counting is the database's (Store.decision_stats: one GROUP BY over the time index);
here the counts are only added up and divided. Definitions, for a set of decisions:

- reward rate: the mean kept reward of the decisions that have one (the sweep's default
  reward included), with the standard error of that mean;
- join rate: the share of decisions the client sent a reward for (default rewards are
  not the client's, so they do not count);
- exploration share: the share of decisions that showed another candidate than the
  policy's own choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from oo_serving.api.dashboard.evaluation import EvaluationView, evaluation_view
from oo_serving.evaluation import saved
from oo_serving.service import Service
from oo_serving.settings import Settings
from oo_serving.store.base import RAW_FEATURES, BucketStats, DecisionRecord

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
Z95 = 1.96
"""The normal quantile of a two-sided 95% interval."""


@dataclass(frozen=True, slots=True)
class Window:
    """A span of time ending now, cut into buckets of bucket_ms."""

    name: str
    span_ms: int
    bucket_ms: int
    label: str

    @property
    def buckets(self) -> int:
        return self.span_ms // self.bucket_ms

    def range(self, now_ms: int) -> tuple[int, int]:
        """[since, until): the buckets end at the first bucket boundary (in UTC) after
        now, so that the last bucket, still filling, holds now."""
        until = (now_ms // self.bucket_ms + 1) * self.bucket_ms
        return until - self.span_ms, until


WINDOWS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("1h", HOUR_MS, 2 * MINUTE_MS, "2-minute"),
        Window("6h", 6 * HOUR_MS, 15 * MINUTE_MS, "15-minute"),
        Window("24h", DAY_MS, HOUR_MS, "1-hour"),
        Window("7d", 7 * DAY_MS, 6 * HOUR_MS, "6-hour"),
        Window("30d", 30 * DAY_MS, DAY_MS, "1-day"),
    )
}
DEFAULT_WINDOW = "7d"


@dataclass(frozen=True, slots=True)
class Tally:
    """Counts of a set of decisions (BucketStats' columns), and the rates they give."""

    decisions: int = 0
    rewarded: int = 0
    defaulted: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    explored: int = 0
    reward_min: float | None = None
    reward_max: float | None = None

    @classmethod
    def of(cls, b: BucketStats) -> Tally:
        return cls(
            b.decisions, b.rewarded, b.defaulted, b.reward_sum, b.reward_sq_sum, b.explored,
            b.reward_min, b.reward_max,
        )  # fmt: skip

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.decisions + other.decisions,
            self.rewarded + other.rewarded,
            self.defaulted + other.defaulted,
            self.reward_sum + other.reward_sum,
            self.reward_sq_sum + other.reward_sq_sum,
            self.explored + other.explored,
            _least(self.reward_min, other.reward_min),
            _most(self.reward_max, other.reward_max),
        )

    @property
    def reward_rate(self) -> float | None:
        """The mean kept reward of the rewarded decisions; None without any."""
        return self.reward_sum / self.rewarded if self.rewarded else None

    @property
    def reward_se(self) -> float | None:
        """The standard error of reward_rate: the sample standard deviation of the
        rewards over √n; None below two rewards."""
        n = self.rewarded
        if n < 2:
            return None
        variance = (self.reward_sq_sum - self.reward_sum**2 / n) / (n - 1)
        return math.sqrt(max(variance, 0.0) / n)

    @property
    def reward_band(self) -> tuple[float, float] | None:
        """reward_rate ± 1.96 standard errors, within the smallest and largest reward (a
        mean cannot leave them); None without a standard error."""
        rate, se = self.reward_rate, self.reward_se
        if rate is None or se is None:
            return None
        low, high = rate - Z95 * se, rate + Z95 * se
        if self.reward_min is not None:
            low = max(low, self.reward_min)
        if self.reward_max is not None:
            high = min(high, self.reward_max)
        return low, high

    @property
    def client_rewarded(self) -> int:
        return self.rewarded - self.defaulted

    @property
    def join_rate(self) -> float | None:
        """The share of decisions with a reward from the client; None without decisions."""
        return self.client_rewarded / self.decisions if self.decisions else None

    @property
    def exploration_share(self) -> float | None:
        return self.explored / self.decisions if self.decisions else None


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _most(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(frozen=True, slots=True)
class Trend:
    """The reward rate in the first and in the second half of the window, and whether
    their difference is more than 1.96 of its standard errors ("up", "down"), within
    them ("steady"), or cannot be told yet ("unknown": under MIN_REWARDS rewards in a
    half)."""

    before: Tally
    after: Tally

    MIN_REWARDS: ClassVar[int] = 10

    @property
    def change(self) -> float | None:
        a, b = self.before.reward_rate, self.after.reward_rate
        return None if a is None or b is None else b - a

    @property
    def change_se(self) -> float | None:
        a, b = self.before.reward_se, self.after.reward_se
        return None if a is None or b is None else math.sqrt(a * a + b * b)

    @property
    def direction(self) -> str:
        if min(self.before.rewarded, self.after.rewarded) < self.MIN_REWARDS:
            return "unknown"
        change, se = self.change, self.change_se
        if change is None or se is None:
            return "unknown"
        if abs(change) <= Z95 * se:
            return "steady"
        return "up" if change > 0 else "down"


@dataclass(frozen=True, slots=True)
class PolicyView:
    """One policy over the window: totals, one Tally per bucket, users, shares."""

    name: str
    colour: int
    total: Tally
    buckets: tuple[Tally, ...]
    users: int
    configured_share: float | None
    """Its share of users in the configured split; None: not serving now."""

    @property
    def trend(self) -> Trend:
        half = len(self.buckets) // 2
        before = sum(self.buckets[:half], Tally())
        after = sum(self.buckets[half:], Tally())
        return Trend(before, after)


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything /dashboard shows."""

    window: Window
    since_ms: int
    until_ms: int
    now_ms: int
    policies: tuple[PolicyView, ...]
    settings: tuple[tuple[str, str], ...]
    evaluation: EvaluationView | None
    evaluation_error: str | None = None

    @property
    def total(self) -> Tally:
        return sum((p.total for p in self.policies), Tally())

    @property
    def users(self) -> int:
        return sum(p.users for p in self.policies)


async def overview(service: Service, settings: Settings, window: Window) -> Overview:
    """The overview for `window`, ending now (the service's clock)."""
    now = service.now_ms()
    since, until = window.range(now)
    stats = await service.store.decision_stats(since, until, window.bucket_ms)
    shares = service.assignment.shares()
    names = list(shares) + sorted({b.policy for b in stats.buckets} - set(shares))
    policies = tuple(
        _policy_view(
            name,
            colour,
            [b for b in stats.buckets if b.policy == name],
            window.buckets,
            stats.users.get(name, 0),
            shares.get(name),
        )
        for colour, name in enumerate(names)
    )
    report = await saved.latest(service.store)
    view, error = evaluation_view(report)
    return Overview(
        window=window,
        since_ms=since,
        until_ms=until,
        now_ms=now,
        policies=policies,
        settings=settings_shown(settings),
        evaluation=view,
        evaluation_error=error,
    )


def _policy_view(
    name: str,
    colour: int,
    rows: Sequence[BucketStats],
    n_buckets: int,
    users: int,
    share: float | None,
) -> PolicyView:
    buckets = [Tally()] * n_buckets
    for row in rows:
        if 0 <= row.bucket < n_buckets:
            buckets[row.bucket] = Tally.of(row)
    return PolicyView(
        name=name,
        colour=colour,
        total=sum(buckets, Tally()),
        buckets=tuple(buckets),
        users=users,
        configured_share=share,
    )


def settings_shown(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The settings that decide what the charts show, as (variable, value) text. Nothing
    secret: no database URL, no key."""
    split = settings.policy_split or f"{settings.policy}:100"
    default = "none" if settings.default_reward is None else f"{settings.default_reward:g}"
    sweep = "off" if settings.sweep_interval_s == 0 else f"every {settings.sweep_interval_s:g}s"
    return (
        ("OO_POLICY_SPLIT" if settings.policy_split else "OO_POLICY", split),
        ("OO_EXPLORATION", settings.exploration),
        ("OO_SHADOW_POLICIES", settings.shadow_policies or "none"),
        ("OO_REWARD_WAIT", settings.reward_wait),
        ("OO_REWARD_AGGREGATION", settings.reward_aggregation),
        ("OO_DEFAULT_REWARD", default),
        ("OO_LOG_RETENTION_DAYS", f"{settings.log_retention_days:g}"),
        ("OO_SWEEP_INTERVAL_S", sweep),
        ("OO_DECISION_LOG_PER_USER", f"{settings.decision_log_per_user:,}"),
    )


# ── one user ─────────────────────────────────────────────────────────────────

DEFAULT_DECISIONS = 20
MAX_DECISIONS = 200
MAX_CANDIDATES_SHOWN = 12
"""Candidates listed per decision: the shown one, the policy's and the shadows' choices,
then the others in the order offered, up to this many."""


@dataclass(frozen=True, slots=True)
class CandidateView:
    index: int
    tip_id: str
    features: Mapping[str, Any] | None
    probability: float
    shown: bool
    greedy: bool
    shadows: tuple[str, ...]
    """The shadow policies that chose this candidate."""


@dataclass(frozen=True, slots=True)
class DecisionView:
    event_id: str
    seq: int
    ts_ms: int
    policy: str
    tip_id: str
    propensity: float
    explored: bool | None
    """Another candidate than the policy's own choice was shown; None: not logged."""
    context: Mapping[str, int]
    reward: float | None
    reward_n: int
    rewarded_ms: int | None
    learned: bool
    reward_source: str | None
    candidates: tuple[CandidateView, ...]
    offered: int


@dataclass(frozen=True, slots=True)
class UserView:
    """Everything /dashboard/users/{user_id} shows. `known`: the user has a model or a
    logged decision."""

    user_id: str
    known: bool
    serving_policy: str
    model_policy: str | None
    pulls: int
    reward_count: int
    cumulative_reward: float
    last_updated_ms: int | None
    weights: tuple[tuple[str, float], ...]
    decisions: tuple[DecisionView, ...]
    now_ms: int
    limit: int
    more: bool = False
    """There are older decisions than those listed."""
    notes: tuple[str, ...] = ()


async def user_view(service: Service, user_id: str, limit: int) -> UserView:
    """The user's model and last `limit` decisions, newest first."""
    stats = await service.stats(user_id)
    records = await service.store.recent_decisions(user_id, limit + 1)
    serving = service.assignment.policy_for(user_id).name
    model_known = stats.last_updated_ms is not None
    notes: tuple[str, ...] = ()
    if model_known and not stats.theta:
        notes = (
            f"The stored model ({stats.policy}) is of a policy or format this release does"
            " not read: no weights to show.",
        )
    return UserView(
        user_id=user_id,
        known=model_known or bool(records),
        serving_policy=serving,
        model_policy=stats.policy if model_known else None,
        pulls=stats.pulls,
        reward_count=stats.reward_count,
        cumulative_reward=stats.cumulative_reward,
        last_updated_ms=stats.last_updated_ms,
        weights=tuple(zip(stats.feature_names, stats.theta, strict=False)),
        decisions=tuple(decision_view(d) for d in records[:limit]),
        now_ms=service.now_ms(),
        limit=limit,
        more=len(records) > limit,
        notes=notes,
    )


def decision_view(d: DecisionRecord) -> DecisionView:
    n = len(d.candidate_ids)
    try:
        shown = d.candidate_ids.index(d.tip_id)
    except ValueError:
        shown = -1
    greedy = d.greedy if d.greedy is not None and 0 <= d.greedy < n else None
    shadow_of: dict[int, list[str]] = {}
    for name, index in sorted(d.shadow.items()):
        shadow_of.setdefault(index, []).append(name)
    probabilities = _probabilities(d, shown)
    candidates = [
        CandidateView(
            index=i,
            tip_id=tip,
            features=_raw(d, i),
            probability=probabilities[i],
            shown=i == shown,
            greedy=i == greedy,
            shadows=tuple(shadow_of.get(i, ())),
        )
        for i, tip in enumerate(d.candidate_ids)
    ]
    return DecisionView(
        event_id=d.event_id,
        seq=d.seq,
        ts_ms=d.ts_ms,
        policy=d.policy,
        tip_id=d.tip_id,
        propensity=d.propensity,
        explored=None if greedy is None else greedy != shown,
        context=dict(d.context),
        reward=d.reward,
        reward_n=d.reward_n,
        rewarded_ms=d.rewarded_ms,
        learned=d.learned,
        reward_source=d.reward_source,
        candidates=_listed(candidates),
        offered=n,
    )


def _listed(candidates: list[CandidateView]) -> tuple[CandidateView, ...]:
    """The candidates worth listing, in the order offered: every marked one, then the
    others up to MAX_CANDIDATES_SHOWN."""
    marked = {c.index for c in candidates if c.shown or c.greedy or c.shadows}
    room = max(MAX_CANDIDATES_SHOWN - len(marked), 0)
    others = [c.index for c in candidates if c.index not in marked][:room]
    keep = marked | set(others)
    return tuple(c for c in candidates if c.index in keep)


def _probabilities(d: DecisionRecord, shown: int) -> list[float]:
    """Each candidate's logged probability; a decision logged before they were kept was
    deterministic: 1 on the shown candidate."""
    if d.candidate_p is not None:
        return [float(p) for p in d.candidate_p]
    return [1.0 if i == shown else 0.0 for i in range(len(d.candidate_ids))]


def _raw(d: DecisionRecord, i: int) -> dict[str, Any] | None:
    if d.candidate_features is None:
        return None
    row = d.candidate_features[i]
    values: dict[str, Any] = dict(zip(RAW_FEATURES, row.tolist(), strict=True))
    values["hour_of_day"] = int(values["hour_of_day"])
    values["is_overdue"] = bool(values["is_overdue"])
    values["priority"] = int(values["priority"])
    return values
