"""The one protocol every store implements, and the records it persists.

A store knows the shapes it keeps (arrays of float64, counters, the decision log), not
the bandit maths. Each read-modify-write of a user is one call that takes a *pure*
function: the store opens a transaction, locks the user's row, loads what the function
needs, calls it, writes what it returns and commits. If the function raises, nothing
is written. This is the only way state changes, so no update can be lost or half made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson

from oo_serving.check import CheckReport
from oo_serving.core.features import Matrix, Vector
from oo_serving.core.policy import Pooled
from oo_serving.errors import SchemaNotCurrent, SchemaTooNew, StoreBusy


@dataclass(frozen=True, slots=True, eq=False)
class UserRecord:
    """A user's model row. `state` is the policy's own encoding (Policy.encode) of the
    user's state, of format `state_version`; the store never reads inside it."""

    user_id: str
    policy: str
    state: bytes
    state_version: int
    pulls: int
    reward_count: int
    cumulative_reward: float
    last_updated_ms: int
    shadows: bytes | None = None
    """The shadow policies' states for the user, encoded by the service (shadow.py)."""


RAW_FEATURES = ("hour_of_day", "is_overdue", "task_age_days", "priority")
"""The columns of DecisionRecord.candidate_features: TaskFeatures' fields, in order."""


@dataclass(frozen=True, slots=True, eq=False)
class DecisionRecord:
    """One logged decision: enough to join its reward, and to rebuild or evaluate any
    policy from the log.

    candidate_features: shape (n, 4), every candidate's raw features as scored, columns
    RAW_FEATURES (is_overdue as 0.0/1.0), in `candidate_ids` order; None only for rows
    logged before the log kept them. context: the request's context as scored, e.g.
    {"hour_of_day": 9, "day_of_week": 1}. x: shape (d,), the chosen candidate's vector
    under `policy`; candidate_X: shape (n, d), every candidate's, same order.
    `features` is the chosen candidate's raw features. `model_version` is the user's
    reward_count at decision time.

    candidate_p: shape (n,), the probability with which each candidate was to be shown
    (the logging policy, exploration included; sums to 1), so `propensity` is
    candidate_p[chosen]; None for rows logged before the log kept it (deterministic: 1.0
    on the chosen candidate). greedy: the index the serving policy itself preferred
    before exploration (None: not logged). shadow: each shadow policy's choice, by name,
    as an index into the candidates.

    reward: the value kept under the aggregation rule (OO_REWARD_AGGREGATION); reward_n:
    how many rewards arrived for the decision; learned: whether `reward` is in the model
    (False for a reward that came after the reward window); reward_source: "client", or
    "default" for OO_DEFAULT_REWARD applied by the sweep.
    """

    user_id: str
    seq: int
    event_id: str
    ts_ms: int
    tip_id: str
    features: dict[str, int | bool | float]
    x: Vector
    score: float
    policy: str
    propensity: float
    model_version: int
    candidate_ids: tuple[str, ...]
    candidate_X: Matrix
    candidate_features: Matrix | None
    context: dict[str, int]
    reward: float | None = None
    rewarded_ms: int | None = None
    candidate_p: Vector | None = None
    greedy: int | None = None
    shadow: dict[str, int] = field(default_factory=dict)
    reward_n: int = 0
    learned: bool = False
    reward_source: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class DecisionRef:
    """What a reward needs of its decision: x (shape (d,)) is the chosen vector under
    `policy`; `features` the chosen candidate's raw features, for any other policy.
    reward, reward_n, learned, learned_at: as in DecisionRecord and DecisionMark."""

    seq: int
    event_id: str
    tip_id: str
    policy: str
    x: Vector
    features: dict[str, int | bool | float]
    reward: float | None
    ts_ms: int = 0
    reward_n: int = 0
    learned: bool = False
    learned_at: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class LoggedReward:
    """One learned reward of the decision log: the chosen candidate's raw features."""

    features: dict[str, int | bool | float]
    reward: float


class ReplayNeeded(Exception):
    """Raised by a transaction's function that needs the user's learned rewards (to
    rebuild a state under another policy). The store then reads them, in the same
    transaction, and calls the function again with them."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One row of a user's /features history."""

    ts_ms: int
    features: dict[str, int | bool | float]
    score: float
    tip_id: str
    event_id: str


@dataclass(frozen=True, slots=True)
class BucketStats:
    """One policy's decisions logged in one time bucket (Store.decision_stats).

    bucket: the bucket's index, (ts_ms - since_ms) // bucket_ms. rewarded: decisions with
    a reward (whatever its source); defaulted: those whose reward is the sweep's default
    (reward_source "default"); reward_sum, reward_sq_sum: the sum of the kept rewards and
    of their squares; explored: decisions that showed another candidate than the policy's
    own choice (`greedy` logged and its candidate not the shown tip); reward_min,
    reward_max: the smallest and largest kept reward (None without any).
    """

    policy: str
    bucket: int
    decisions: int
    rewarded: int
    defaulted: int
    reward_sum: float
    reward_sq_sum: float
    explored: int
    reward_min: float | None = None
    reward_max: float | None = None


@dataclass(frozen=True, slots=True)
class DecisionStats:
    """The decision log's counts over a time range: per (policy, bucket), ordered so, and
    the number of distinct users each policy decided for in the whole range."""

    buckets: tuple[BucketStats, ...]
    users: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class SavedReport:
    """A report kept in the database (Store.save_report): `body` is its JSON object."""

    id: int
    kind: str
    created_ms: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True, eq=False)
class UserExport:
    """Everything stored about one user, as one snapshot: the model, and the decisions
    oldest first in pages of at most EXPORT_PAGE_ROWS, read as they are consumed."""

    user: UserRecord | None
    pages: AsyncIterator[list[DecisionRecord]]


# The pooled population statistics: one row per (policy, process); see Store.add_pooled.
POOLED_MAX_SHARDS = 64
POOLED_FOLD_AFTER_MS = 3_600_000
FOLDED_SHARD = "folded"

# An export holds at most this many decisions in memory at once: with the largest
# /score (OO_MAX_CANDIDATES candidates) that is a few MB, whatever the retention.
EXPORT_PAGE_ROWS = 16
# Exports run at once per process; more wait for a slot (within the write deadline).
# Each holds a snapshot and, on PostgreSQL, a pooled connection for as long as it streams.
EXPORTS_AT_ONCE = 2
# Whole-log reads (evaluate, export) fetch this many decisions a page.
LOG_PAGE_ROWS = 500
# Reports of one kind kept by save_report; older ones are deleted as new ones arrive.
REPORTS_KEPT = 50


@dataclass(frozen=True, slots=True, eq=False)
class ScoreWrite:
    """What a /score writes: the user's row, one new decision, and the pruning point.

    Decisions of this user with seq < keep_from_seq are deleted in the same transaction.
    """

    user: UserRecord
    decision: DecisionRecord
    keep_from_seq: int


@dataclass(frozen=True, slots=True, eq=False)
class DecisionMark:
    """A decision's reward columns after a reward: the kept value, how many rewards
    arrived, whether the model holds the value and at which of the user's updates it was
    learned. Written only if the row still has `reward_n_before` rewards; rewarded_ms and
    reward_source are the first reward's, and stay."""

    event_id: str
    reward: float
    rewarded_ms: int
    reward_n: int
    learned: bool
    learned_at: int | None
    reward_source: str
    reward_n_before: int


@dataclass(frozen=True, slots=True, eq=False)
class RewardWrite:
    """What a /reward writes: the user's row (None: unchanged), the decision's reward
    columns (None: no decision, or unchanged)."""

    user: UserRecord | None
    mark: DecisionMark | None
    matched_event: str | None


@dataclass(frozen=True, slots=True)
class DecisionLookup:
    """Which decision a reward is about: by event_id, or else the latest one for tip_id
    (one of the two is given)."""

    tip_id: str | None
    event_id: str | None


T = TypeVar("T")
Keyset = tuple[int, str, int]
"""A position in the decision log's (ts_ms, user_id, seq) order."""
KEYSET_START: Keyset = (-(2**63), "", -(2**63))
Replay = Sequence[LoggedReward]
"""The user's retained decisions that have a reward, in the order they were learned
(rewarded_ms, then seq)."""
ScoreFn = Callable[[UserRecord | None, Replay | None], ScoreWrite]
RewardFn = Callable[[UserRecord | None, DecisionRef | None, Replay | None], RewardWrite]


class Store(Protocol):
    """Every backend: SQLite (embedded default), PostgreSQL (shared by replicas)."""

    async def open(self, migrate: bool = True) -> None:
        """Connect, and apply pending migrations; with migrate=False change nothing and
        refuse a schema that is not current. Raises SchemaError."""

    async def close(self) -> None:
        """Finish in-flight work and release every connection."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""

    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        """Lock user_id's row, call fn(row or None, None), write its ScoreWrite, commit.
        If fn raises ReplayNeeded, read the user's Replay in the same transaction and
        call fn(row, replay) instead."""

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        """Lock user_id's row, find the decision, call fn(row, ref, None), write, commit;
        ReplayNeeded as for score_tx."""

    async def delete_user(self, user_id: str) -> bool:
        """Remove the user's model and decisions; True if there was anything."""

    async def get_user(self, user_id: str) -> UserRecord | None:
        """The user's model row, or None."""

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        """The user's last `limit` decisions, oldest first."""

    def export_user(self, user_id: str) -> AbstractAsyncContextManager[UserExport]:
        """The user's model row and every retained decision, oldest first, one snapshot
        held until the context exits. Raises StoreBusy when too many exports run."""

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        """Delete up to batch_size decisions logged before older_than_ms; how many.

        One short transaction: call it until it returns 0 to prune everything.
        """

    def decision_log(
        self, since_ms: int, until_ms: int, user_ids: Sequence[str] | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[list[DecisionRecord]]]:
        """Every retained decision with since_ms <= ts_ms < until_ms (of `user_ids` only,
        if given), ordered by (ts_ms, user_id, seq), in pages of at most LOG_PAGE_ROWS,
        one snapshot held until the context exits. StoreBusy as for export_user."""

    async def unrewarded(
        self, since_ms: int, until_ms: int, after: Keyset, limit: int
    ) -> list[tuple[int, str, int, str]]:
        """Up to `limit` decisions without a reward, since_ms <= ts_ms < until_ms, after
        the keyset (ts_ms, user_id, seq), in that order, as (ts_ms, user_id, seq, event_id)."""

    async def sweep_mark(self, name: str) -> int | None:
        """How far the sweep `name` has gone (a ts_ms), or None if it never ran."""

    async def set_sweep_mark(self, name: str, until_ms: int) -> None:
        """Advance the sweep `name` to until_ms; never moves it back."""

    async def add_pooled(
        self, policy: str, shard: str, count: int, stats: Vector, ts_ms: int
    ) -> None:
        """Add (count, stats) to the pooled row (policy, shard), creating it; one short
        transaction. Each process writes only its own shard, so no row is hot. Rows of
        `policy` not updated for POOLED_FOLD_AFTER_MS are folded into the shard
        FOLDED_SHARD in the same transaction once there are more than POOLED_MAX_SHARDS,
        so restarts do not grow the table without bound."""

    async def pooled(self, policy: str) -> Pooled | None:
        """The sum of every pooled row of `policy`; None if there is none."""

    async def decision_stats(self, since_ms: int, until_ms: int, bucket_ms: int) -> DecisionStats:
        """The counts of the decisions with since_ms <= ts_ms < until_ms, per policy and
        bucket of bucket_ms (> 0), counted by the database in one pass over the time
        index: no decision is read into this process."""

    async def recent_decisions(self, user_id: str, limit: int) -> list[DecisionRecord]:
        """The user's last `limit` decisions, newest first."""

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        """Keep a report (a JSON object) of `kind`, computed at created_ms; its id. Only
        the REPORTS_KEPT newest of the kind are kept: older ones are deleted in the same
        transaction."""

    async def latest_report(self, kind: str) -> SavedReport | None:
        """The newest report of `kind` (by created_ms, then id), or None."""

    async def check(self, *, summed_rewards: bool = False) -> CheckReport:
        """Read every model and decision, in bounded pages and without a write lock, and
        report each broken invariant (oo_serving.check). Safe while serving.
        summed_rewards: the rewards were kept under OO_REWARD_AGGREGATION=sum, so a
        decision's reward is bounded by its reward_n, and a user's total by nothing."""


# The columns each row codec below reads, in its order; the statements are in store.sql.
USER_COLUMNS = (
    "policy, state, state_version, pulls, reward_count, cumulative_reward, last_updated_ms, shadows"
)
REF_COLUMNS = (
    "seq, event_id, tip_id, policy, x, features, reward, ts_ms, reward_n, learned, learned_at"
)
DECISION_COLUMNS = (
    "user_id, seq, event_id, ts_ms, tip_id, features, x, score, policy, propensity,"
    " model_version, candidate_ids, candidate_x, candidate_features, context, reward,"
    " rewarded_ms, candidate_p, greedy, shadow, reward_n, learned, reward_source"
)
REPORT_COLUMNS = "id, kind, created_ms, body"


def user_from_row(user_id: str, row: Sequence[Any] | None) -> UserRecord | None:
    """A UserRecord from the USER_COLUMNS of a row; None for no row or no model yet."""
    if row is None or row[1] is None:
        return None
    return UserRecord(
        user_id=user_id,
        policy=row[0],
        state=bytes(row[1]),
        state_version=row[2],
        pulls=row[3],
        reward_count=row[4],
        cumulative_reward=row[5],
        last_updated_ms=row[6],
        shadows=None if row[7] is None else bytes(row[7]),
    )


def user_params(u: UserRecord) -> tuple[Any, ...]:
    """user_id, then the USER_COLUMNS values, encoded for a database."""
    return (
        u.user_id, u.policy, u.state, u.state_version, u.pulls, u.reward_count,
        u.cumulative_reward, u.last_updated_ms, u.shadows,
    )  # fmt: skip


def mark_params(user_id: str, m: DecisionMark) -> tuple[Any, ...]:
    """The values of store.sql.MARK_SQL for a mark of user_id's decision."""
    return (
        m.reward, m.rewarded_ms, m.reward_n, m.learned, m.learned_at, m.reward_source,
        user_id, m.event_id, m.reward_n_before,
    )  # fmt: skip


def from_json(value: Any, json_as_text: bool) -> Any:
    """A JSON column's value: SQLite keeps JSON as text, PostgreSQL's driver decodes its
    jsonb (and text[]) itself."""
    if json_as_text and value is not None:
        return orjson.loads(value)
    return value


def ref_from_row(row: Sequence[Any] | None, *, json_as_text: bool) -> DecisionRef | None:
    """A DecisionRef from the REF_COLUMNS of a row."""
    if row is None:
        return None
    return DecisionRef(
        seq=row[0], event_id=row[1], tip_id=row[2], policy=row[3],
        x=decode_array(row[4], (len(row[4]) // 8,)), features=from_json(row[5], json_as_text),
        reward=row[6], ts_ms=row[7], reward_n=row[8], learned=bool(row[9]), learned_at=row[10],
    )  # fmt: skip


def replay_from_rows(rows: Sequence[Sequence[Any]], *, json_as_text: bool) -> list[LoggedReward]:
    """The Replay from the rows of store.sql.REPLAY_SQL."""
    return [LoggedReward(features=from_json(r[0], json_as_text), reward=r[1]) for r in rows]


def decision_from_row(r: Sequence[Any], *, json_as_text: bool) -> DecisionRecord:
    """A DecisionRecord from the DECISION_COLUMNS of a row. A row logged before the log
    kept raw candidate features and the context reads as None and {}."""
    d = len(r[6]) // 8
    ids = tuple(from_json(r[11], json_as_text))
    context = from_json(r[14], json_as_text)
    return DecisionRecord(
        user_id=r[0], seq=r[1], event_id=r[2], ts_ms=r[3], tip_id=r[4],
        features=from_json(r[5], json_as_text), x=decode_array(r[6], (d,)), score=r[7],
        policy=r[8], propensity=r[9], model_version=r[10], candidate_ids=ids,
        candidate_X=decode_array(r[12], (len(ids), d)),
        candidate_features=(
            None if r[13] is None else decode_array(r[13], (len(ids), len(RAW_FEATURES)))
        ),
        context={} if context is None else context, reward=r[15], rewarded_ms=r[16],
        candidate_p=None if r[17] is None else decode_array(r[17], (len(ids),)),
        greedy=r[18], shadow=from_json(r[19], json_as_text) or {}, reward_n=r[20],
        learned=bool(r[21]), reward_source=r[22],
    )  # fmt: skip


def bucket_stats_from_rows(rows: Sequence[Sequence[Any]]) -> tuple[BucketStats, ...]:
    """The BucketStats of the rows of store.sql.STATS_SQL."""
    return tuple(
        BucketStats(
            policy=str(r[0]), bucket=int(r[1]), decisions=int(r[2]), rewarded=int(r[3]),
            defaulted=int(r[4]), reward_sum=float(r[5]), reward_sq_sum=float(r[6]),
            explored=int(r[7]), reward_min=_optional_float(r[8]),
            reward_max=_optional_float(r[9]),
        )
        for r in rows
    )  # fmt: skip


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def report_from_row(row: Sequence[Any] | None, *, json_as_text: bool) -> SavedReport | None:
    """A SavedReport from the REPORT_COLUMNS of a row."""
    if row is None:
        return None
    body = from_json(row[3], json_as_text)
    return SavedReport(id=int(row[0]), kind=str(row[1]), created_ms=int(row[2]), body=body)


def check_stats_range(since_ms: int, until_ms: int, bucket_ms: int) -> None:
    """ValueError unless the range and bucket of Store.decision_stats make sense."""
    if bucket_ms <= 0:
        raise ValueError(f"bucket_ms must be positive, got {bucket_ms}")
    if until_ms < since_ms:
        raise ValueError(f"the range ends ({until_ms}) before it starts ({since_ms})")


def encode_optional(a: Matrix | Vector | None) -> bytes | None:
    """encode_array, and None for None (a nullable column)."""
    return None if a is None else encode_array(a)


def add_stats(stored: bytes, stats: Vector, what: str) -> Vector:
    """Stored pooled stats plus `stats`, elementwise; ValueError if the lengths differ
    (a row written under another layout: adding would mix up the policy's statistics)."""
    current = np.frombuffer(bytes(stored), dtype="<f8")
    if current.shape != stats.shape:
        raise ValueError(
            f"{what} holds {current.size} pooled statistics, not {stats.size}: the rows"
            " were written under another layout"
        )
    total: Vector = current + stats
    return total


def sum_pooled(rows: Sequence[Sequence[Any]], what: str) -> Pooled | None:
    """The sum of pooled rows given as (count, stats); None for no row. ValueError if
    their lengths differ."""
    if not rows:
        return None
    stats = np.frombuffer(bytes(rows[0][1]), dtype="<f8").astype(np.float64)
    count = int(rows[0][0])
    for row in rows[1:]:
        stats = add_stats(row[1], stats, what)
        count += int(row[0])
    return Pooled(count=count, stats=stats)


def pooled_stats(stats: Vector) -> Vector:
    """Stats to add to a pooled row, as one flat float64 vector; ValueError otherwise."""
    flat = np.asarray(stats, dtype=np.float64)
    if flat.ndim != 1:
        raise ValueError(f"pooled stats must be a flat vector, got shape {flat.shape}")
    return flat


def encode_array(a: Matrix | Vector) -> bytes:
    """float64, little-endian, row-major."""
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def decode_array(raw: bytes, shape: tuple[int, ...]) -> Matrix:
    """The inverse of encode_array; a fresh, writable array."""
    return np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)


class Slots:
    """At most `size` holders at once; a caller waits at most `timeout_s` for a slot,
    then StoreBusy. For work that holds a scarce resource for long (an export)."""

    def __init__(self, size: int, timeout_s: float, what: str) -> None:
        self._size = size
        self._timeout_s = timeout_s
        self._what = what
        self._semaphore: asyncio.Semaphore | None = None  # made on the serving loop

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._size)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._semaphore.acquire()
        except TimeoutError as exc:
            raise StoreBusy(
                f"{self._size} {self._what} are already running in this process; retry"
            ) from exc
        try:
            yield
        finally:
            self._semaphore.release()


def refuse_newer(version: int, latest: int, where: str) -> None:
    """Raise SchemaTooNew if a database's schema `version` is past this release's `latest`."""
    if version > latest:
        raise SchemaTooNew(
            f"{where} has schema version {version}, newer than {latest}, the newest this"
            " release knows; upgrade oo-serving"
        )


def require_current(version: int, latest: int, where: str) -> None:
    """Raise unless a database's schema `version` is this release's `latest`."""
    refuse_newer(version, latest, where)
    if version < latest:
        raise SchemaNotCurrent(
            f"{where} has schema version {version}; this release needs {latest}:"
            " run `oo-serving migrate` first"
        )
