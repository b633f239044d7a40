"""In memory: the store of one process, for tests, trials and in-process service tests.

Every table is a plain dict of a `MemoryDatabase`, kept for as long as the process keeps
the store (a store reopened on the same database finds it as it was left). Nothing is
written anywhere else, so worker processes would each have their own: `memory://` serves
one process (Settings refuses OO_WORKERS > 1 with it), and the commands that read a
database from outside the server (check, prune, sweep, evaluate, export, backup) refuse it.

Atomicity. Each call runs whole under the database's one lock, and nothing inside it
awaits. A transaction calls the service's pure function with the lock held, then checks
what the write needs (the new decision's seq and event_id are free, the decision to mark
still has the reward count the function saw) and only then applies it, so a function
that raises, or a write that is refused, changes nothing. A threading.Lock, not an
asyncio.Lock: it is never held across an await, so it holds up the loop for one
transaction at most, and one database serves any loop and thread (a test's, a test
client's), where an asyncio.Lock is bound to the first loop that waits on it.

Rows are kept as SQLite keeps them (arrays as float64 bytes, JSON columns as text), so
the row codecs of store.base read them and no caller ever shares a mutable value with
the store: what was written reads back equal, as from a database, never the same object.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from oo_serving.check import MAX_EXAMPLES, CheckReport, Problem, check_decision, check_model
from oo_serving.core.features import Vector
from oo_serving.core.policy import Pooled
from oo_serving.errors import StoreUnavailable
from oo_serving.store import migrations
from oo_serving.store.base import (
    DECISION_COLUMNS,
    EXPORT_PAGE_ROWS,
    EXPORTS_AT_ONCE,
    FOLDED_SHARD,
    LOG_PAGE_ROWS,
    POOLED_FOLD_AFTER_MS,
    POOLED_MAX_SHARDS,
    REF_COLUMNS,
    REPORTS_KEPT,
    DecisionLookup,
    DecisionMark,
    DecisionRecord,
    DecisionStats,
    HistoryEntry,
    Keyset,
    LoggedReward,
    ReplayNeeded,
    RewardFn,
    RewardWrite,
    SavedReport,
    ScoreFn,
    ScoreWrite,
    Slots,
    UserExport,
    UserRecord,
    add_stats,
    bucket_stats_from_rows,
    check_stats_range,
    decision_from_row,
    encode_array,
    encode_optional,
    pooled_stats,
    ref_from_row,
    replay_from_rows,
    report_from_row,
    sum_pooled,
    user_from_row,
    user_params,
)

MEMORY_URL = "memory://"
EXPORT_WAIT_S = 5.0
"""How long an export waits for a slot (EXPORTS_AT_ONCE) before StoreBusy."""


def is_memory_url(url: str) -> bool:
    return url == MEMORY_URL


def schema_version() -> int:
    """The schema a memory store answers for: this release's, as SQLite's migrations
    number it (it keeps that schema's rows, and never an older one)."""
    return migrations.load("sqlite")[-1].version


@functools.cache
def _names(columns: str) -> tuple[str, ...]:
    """The names of a column list such as REF_COLUMNS."""
    return tuple(name.strip() for name in columns.split(","))


@dataclass(frozen=True, slots=True)
class DecisionRow:
    """One decision as the `decision` table holds it on SQLite. Frozen: a reward replaces
    the row, so a snapshot (an export, the log) keeps the row it took."""

    user_id: str
    seq: int
    event_id: str
    ts_ms: int
    tip_id: str
    features: str
    x: bytes
    score: float
    policy: str
    propensity: float
    model_version: int
    candidate_ids: str
    candidate_x: bytes
    candidate_features: bytes | None
    context: str | None
    reward: float | None = None
    rewarded_ms: int | None = None
    candidate_p: bytes | None = None
    greedy: int | None = None
    shadow: str | None = None
    reward_n: int = 0
    learned: bool = False
    learned_at: int | None = None
    reward_source: str | None = None

    @classmethod
    def of(cls, d: DecisionRecord) -> DecisionRow:
        """A new decision's row, not yet rewarded (the reward columns of `d` are not
        written, as by the SQL stores' INSERT)."""
        return cls(
            user_id=d.user_id, seq=d.seq, event_id=d.event_id, ts_ms=d.ts_ms, tip_id=d.tip_id,
            features=orjson.dumps(d.features).decode(), x=encode_array(d.x), score=d.score,
            policy=d.policy, propensity=d.propensity, model_version=d.model_version,
            candidate_ids=orjson.dumps(d.candidate_ids).decode(),
            candidate_x=encode_array(d.candidate_X),
            candidate_features=encode_optional(d.candidate_features),
            context=orjson.dumps(d.context).decode(), candidate_p=encode_optional(d.candidate_p),
            greedy=d.greedy, shadow=orjson.dumps(d.shadow).decode() if d.shadow else None,
        )  # fmt: skip

    def columns(self, names: str) -> tuple[Any, ...]:
        """The values of a column list (DECISION_COLUMNS, REF_COLUMNS), for its codec."""
        return tuple(getattr(self, name) for name in _names(names))

    def record(self) -> DecisionRecord:
        return decision_from_row(self.columns(DECISION_COLUMNS), json_as_text=True)

    def marked(self, m: DecisionMark) -> DecisionRow:
        """The row after a reward (MARK_SQL): the first reward's time and source stay."""
        return dataclasses.replace(
            self, reward=m.reward, reward_n=m.reward_n, learned=m.learned,
            learned_at=m.learned_at,
            rewarded_ms=m.rewarded_ms if self.rewarded_ms is None else self.rewarded_ms,
            reward_source=m.reward_source if self.reward_source is None else self.reward_source,
        )  # fmt: skip


@dataclass(slots=True)
class UserLog:
    """One user's decisions, by seq, and the seq of each event_id (both unique)."""

    rows: dict[int, DecisionRow] = field(default_factory=dict)
    seq_of: dict[str, int] = field(default_factory=dict)

    def ordered(self) -> list[DecisionRow]:
        return sorted(self.rows.values(), key=lambda r: r.seq)

    def put(self, row: DecisionRow) -> None:
        self.rows[row.seq] = row
        self.seq_of[row.event_id] = row.seq

    def remove(self, row: DecisionRow) -> None:
        del self.rows[row.seq]
        del self.seq_of[row.event_id]

    def by_event(self, event_id: str) -> DecisionRow | None:
        seq = self.seq_of.get(event_id)
        return None if seq is None else self.rows[seq]

    def find(self, lookup: DecisionLookup) -> DecisionRow | None:
        """By event_id, or else the latest decision for tip_id."""
        if lookup.event_id is not None:
            return self.by_event(lookup.event_id)
        shown = (r for r in self.rows.values() if r.tip_id == lookup.tip_id)
        return max(shown, key=lambda r: r.seq, default=None)


@dataclass(frozen=True, slots=True)
class PooledRow:
    count: int
    stats: bytes
    updated_ms: int


@dataclass(frozen=True, slots=True)
class ReportRow:
    id: int
    kind: str
    created_ms: int
    body: str  # JSON text


class MemoryDatabase:
    """Every table of a memory store, and the lock that every call holds while it runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users: dict[str, UserRecord] = {}
        self.decisions: dict[str, UserLog] = {}
        self.pooled: dict[str, dict[str, PooledRow]] = {}  # policy -> shard -> row
        self.sweep_marks: dict[str, int] = {}
        self.reports: dict[int, ReportRow] = {}
        self.last_report_id = 0

    def all_decisions(self) -> Iterator[DecisionRow]:
        for log in self.decisions.values():
            yield from log.rows.values()


class MemoryStore:
    """The Store protocol on a MemoryDatabase (a new, empty one unless given)."""

    backend = "memory"

    def __init__(
        self, database: MemoryDatabase | None = None, *, export_wait_s: float = EXPORT_WAIT_S
    ) -> None:
        self.database = MemoryDatabase() if database is None else database
        self._open = False
        self._exports = Slots(EXPORTS_AT_ONCE, export_wait_s, "exports")

    # ── lifecycle ────────────────────────────────────────────────────────────
    async def open(self, migrate: bool = True) -> None:
        """Nothing to connect to or migrate: the rows are always this release's."""
        self._open = True

    async def close(self) -> None:
        """Refuse work from now on; the database keeps its rows."""
        self._open = False

    async def ping(self) -> None:
        with self._tx():
            pass

    @contextmanager
    def _tx(self) -> Iterator[MemoryDatabase]:
        """The database, held for one call; StoreUnavailable if the store is not open."""
        if not self._open:
            raise StoreUnavailable("the store is closed")
        with self.database.lock:
            yield self.database

    # ── transactions ─────────────────────────────────────────────────────────
    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        with self._tx() as db:
            user = db.users.get(user_id)
            try:
                write = fn(user, None)
            except ReplayNeeded:
                write = fn(user, _replay(db, user_id))
            stored = _stored_user(write.user)
            row = DecisionRow.of(write.decision)
            log = db.decisions.get(row.user_id)
            if log is not None and (row.seq in log.rows or row.event_id in log.seq_of):
                raise StoreUnavailable(
                    f"could not log the decision: seq {row.seq} or event_id {row.event_id!r}"
                    " is already logged for the user"
                )
            db.users[stored.user_id] = stored
            db.decisions.setdefault(row.user_id, UserLog()).put(row)
            _prune_user(db, user_id, write.keep_from_seq)
            return write

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        with self._tx() as db:
            log = db.decisions.get(user_id)
            row = None if log is None else log.find(lookup)
            user = db.users.get(user_id)
            ref = None if row is None else ref_from_row(row.columns(REF_COLUMNS), json_as_text=True)
            try:
                write = fn(user, ref, None)
            except ReplayNeeded:
                write = fn(user, ref, _replay(db, user_id))
            stored = None if write.user is None else _stored_user(write.user)
            marked: DecisionRow | None = None
            if write.mark is not None:
                target = None if log is None else log.by_event(write.mark.event_id)
                if target is None or target.reward_n != write.mark.reward_n_before:
                    raise StoreUnavailable(
                        "could not mark the decision rewarded: it is gone, or was rewarded"
                        " since it was read"
                    )
                marked = target.marked(write.mark)
            if stored is not None:
                db.users[stored.user_id] = stored
            if log is not None and marked is not None:
                log.put(marked)
            return write

    async def delete_user(self, user_id: str) -> bool:
        with self._tx() as db:
            model = db.users.pop(user_id, None)
            log = db.decisions.pop(user_id, None)
            return model is not None or (log is not None and bool(log.rows))

    async def add_pooled(
        self, policy: str, shard: str, count: int, stats: Vector, ts_ms: int
    ) -> None:
        flat = pooled_stats(stats)
        with self._tx() as db:
            shards = dict(db.pooled.get(policy, {}))  # a copy: written back whole, or not at all
            own = shards.get(shard)
            if own is not None:
                flat = add_stats(own.stats, flat, f"the pooled row ({policy}, {shard})")
                count += own.count
            shards[shard] = PooledRow(count, encode_array(flat), ts_ms)
            if len(shards) > POOLED_MAX_SHARDS:
                _fold_stale(shards, policy, shard, ts_ms)
            db.pooled[policy] = shards

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        with self._tx() as db:
            deleted = 0
            for user_id, log in list(db.decisions.items()):
                old = [r for r in log.rows.values() if r.ts_ms < older_than_ms]
                for row in old[: max(batch_size - deleted, 0)]:
                    log.remove(row)
                    deleted += 1
                if not log.rows:
                    del db.decisions[user_id]
                if deleted >= batch_size:
                    break
            return deleted

    async def set_sweep_mark(self, name: str, until_ms: int) -> None:
        with self._tx() as db:
            db.sweep_marks[name] = max(until_ms, db.sweep_marks.get(name, until_ms))

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        text = orjson.dumps(body).decode()  # as the SQL stores: NaN is refused as null
        with self._tx() as db:
            db.last_report_id += 1
            db.reports[db.last_report_id] = ReportRow(db.last_report_id, kind, created_ms, text)
            same = sorted(
                (r for r in db.reports.values() if r.kind == kind),
                key=lambda r: (r.created_ms, r.id),
                reverse=True,
            )
            for old in same[REPORTS_KEPT:]:
                del db.reports[old.id]
            return db.last_report_id

    # ── reads ────────────────────────────────────────────────────────────────
    async def get_user(self, user_id: str) -> UserRecord | None:
        with self._tx() as db:
            return db.users.get(user_id)

    async def pooled(self, policy: str) -> Pooled | None:
        with self._tx() as db:
            shards = db.pooled.get(policy, {})
            rows = [(shards[name].count, shards[name].stats) for name in sorted(shards)]
        return sum_pooled(rows, f"a pooled row of {policy}")

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        return [
            HistoryEntry(r.ts_ms, orjson.loads(r.features), r.score, r.tip_id, r.event_id)
            for r in reversed(self._latest(user_id, limit))
        ]

    async def recent_decisions(self, user_id: str, limit: int) -> list[DecisionRecord]:
        return [r.record() for r in self._latest(user_id, limit)]

    def _latest(self, user_id: str, limit: int) -> list[DecisionRow]:
        """The user's last `limit` decisions, newest first."""
        with self._tx() as db:
            log = db.decisions.get(user_id)
            rows = [] if log is None else log.ordered()
        return rows[::-1][: max(limit, 0)]

    @asynccontextmanager
    async def export_user(self, user_id: str) -> AsyncIterator[UserExport]:
        async with self._exports.slot():
            with self._tx() as db:  # the snapshot: the rows as they are now
                user = db.users.get(user_id)
                log = db.decisions.get(user_id)
                rows = [] if log is None else log.ordered()
            yield UserExport(user, _pages(rows, EXPORT_PAGE_ROWS))

    @asynccontextmanager
    async def decision_log(
        self, since_ms: int, until_ms: int, user_ids: Sequence[str] | None = None
    ) -> AsyncIterator[AsyncIterator[list[DecisionRecord]]]:
        users = None if user_ids is None else set(user_ids)
        async with self._exports.slot():
            with self._tx() as db:
                rows = [
                    r
                    for r in db.all_decisions()
                    if since_ms <= r.ts_ms < until_ms and (users is None or r.user_id in users)
                ]
            rows.sort(key=lambda r: (r.ts_ms, r.user_id, r.seq))
            yield _pages(rows, LOG_PAGE_ROWS)

    async def unrewarded(
        self, since_ms: int, until_ms: int, after: Keyset, limit: int
    ) -> list[tuple[int, str, int, str]]:
        with self._tx() as db:
            found = (
                (r.ts_ms, r.user_id, r.seq, r.event_id)
                for r in db.all_decisions()
                if since_ms <= r.ts_ms < until_ms
                and r.reward is None
                and (r.ts_ms, r.user_id, r.seq) > after
            )
            return heapq.nsmallest(max(limit, 0), found)

    async def sweep_mark(self, name: str) -> int | None:
        with self._tx() as db:
            return db.sweep_marks.get(name)

    async def decision_stats(self, since_ms: int, until_ms: int, bucket_ms: int) -> DecisionStats:
        check_stats_range(since_ms, until_ms, bucket_ms)
        with self._tx() as db:
            rows = [r for r in db.all_decisions() if since_ms <= r.ts_ms < until_ms]
        groups: dict[tuple[str, int], list[DecisionRow]] = defaultdict(list)
        users: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            groups[r.policy, (r.ts_ms - since_ms) // bucket_ms].append(r)
            users[r.policy].add(r.user_id)
        counted = [_bucket_row(key, groups[key]) for key in sorted(groups)]
        return DecisionStats(
            bucket_stats_from_rows(counted), {p: len(ids) for p, ids in users.items()}
        )

    async def latest_report(self, kind: str) -> SavedReport | None:
        with self._tx() as db:
            of_kind = [r for r in db.reports.values() if r.kind == kind]
        newest = max(of_kind, key=lambda r: (r.created_ms, r.id), default=None)
        if newest is None:
            return None
        return report_from_row(
            (newest.id, newest.kind, newest.created_ms, newest.body), json_as_text=True
        )

    # ── consistency check: reads only ────────────────────────────────────────
    async def check(self, *, summed_rewards: bool = False) -> CheckReport:
        """Every row against the service's invariants (oo_serving.check), judged after
        the lock is released, on the rows as they were when it was held.

        A duplicate seq or event_id cannot be stored (they key the user's log), so only
        decisions without a model and seqs outside 1..pulls are looked for across tables.
        """
        report = CheckReport(backend=self.backend, database=MEMORY_URL)
        report.summed_rewards = summed_rewards
        if summed_rewards:
            report.skipped["cumulative_reward_bound"] = (
                "rewards are summed (OO_REWARD_AGGREGATION=sum): a user's cumulative_reward"
                " may exceed reward_count"
            )
        report.skipped["integrity_check"] = "a memory store has no file or pages to check"
        with self._tx() as db:
            users = dict(db.users)
            rows = list(db.all_decisions())
        for user_id in sorted(users):
            u = users[user_id]
            report.record(
                user_id,
                check_model(
                    u.policy, u.state, u.state_version, u.pulls, u.reward_count,
                    u.cumulative_reward, summed=summed_rewards,
                ),
            )  # fmt: skip
        report.models = len(users)
        rows.sort(key=lambda r: (r.user_id, r.seq))
        for r in rows:
            report.record(r.user_id, _decision_problems(r, summed_rewards), f"seq {r.seq}")
        report.decisions = len(rows)
        _cross_check(report, users, rows)
        return report


def _stored_user(u: UserRecord) -> UserRecord:
    """The user's row as a database reads it back (state and shadows as bytes)."""
    stored = user_from_row(u.user_id, user_params(u)[1:])
    if stored is None:
        raise StoreUnavailable("could not write the user's model: it has no state")
    return stored


def _replay(db: MemoryDatabase, user_id: str) -> list[LoggedReward]:
    """The user's learned rewards in the order they were learned (REPLAY_SQL); a reward
    without a time sorts first, as SQLite sorts NULL."""
    log = db.decisions.get(user_id)
    learned = [] if log is None else [r for r in log.rows.values() if r.learned]
    learned.sort(key=lambda r: (r.rewarded_ms is not None, r.rewarded_ms or 0, r.seq))
    return replay_from_rows([(r.features, r.reward) for r in learned], json_as_text=True)


def _prune_user(db: MemoryDatabase, user_id: str, keep_from_seq: int) -> None:
    log = db.decisions.get(user_id)
    if log is None:
        return
    for row in [r for r in log.rows.values() if r.seq < keep_from_seq]:
        log.remove(row)
    if not log.rows:
        del db.decisions[user_id]


def _fold_stale(shards: dict[str, PooledRow], policy: str, shard: str, ts_ms: int) -> None:
    """Fold the rows of `policy` not written for POOLED_FOLD_AFTER_MS (but `shard`, being
    written now) into FOLDED_SHARD, in `shards`; as Store.add_pooled describes."""
    stale = sorted(
        name
        for name, row in shards.items()
        if row.updated_ms < ts_ms - POOLED_FOLD_AFTER_MS and name not in (FOLDED_SHARD, shard)
    )
    if not stale:
        return
    folded = [shards[FOLDED_SHARD]] if FOLDED_SHARD in shards else []
    parts = [*folded, *(shards[name] for name in stale)]
    total = sum_pooled([(r.count, r.stats) for r in parts], f"a pooled row of {policy}")
    if total is None:  # not so: there is a stale row
        return
    shards[FOLDED_SHARD] = PooledRow(total.count, encode_array(total.stats), ts_ms)
    for name in stale:
        del shards[name]


async def _pages(rows: list[DecisionRow], size: int) -> AsyncIterator[list[DecisionRecord]]:
    """A snapshot's decisions, decoded a page at a time as they are consumed."""
    for start in range(0, len(rows), size):
        yield [r.record() for r in rows[start : start + size]]


def _bucket_row(key: tuple[str, int], rows: list[DecisionRow]) -> tuple[Any, ...]:
    """One (policy, bucket)'s counts, as a row of STATS_SQL_* (for bucket_stats_from_rows)."""
    rewards = [r.reward for r in rows if r.reward is not None]
    explored = sum(1 for r in rows if _explored(r))
    defaulted = sum(1 for r in rows if r.reward_source == "default")
    return (
        *key, len(rows), len(rewards), defaulted, sum(rewards, 0.0),
        sum((v * v for v in rewards), 0.0), explored, min(rewards, default=None),
        max(rewards, default=None),
    )  # fmt: skip


def _explored(r: DecisionRow) -> bool:
    """The decision showed another candidate than the policy's own choice, told by id
    (a greedy index outside the candidates compares as SQL's NULL: not explored)."""
    if r.greedy is None:
        return False
    ids = orjson.loads(r.candidate_ids)
    return 0 <= r.greedy < len(ids) and r.tip_id != ids[r.greedy]


def _decision_problems(r: DecisionRow, summed: bool) -> list[Problem]:
    return check_decision(
        policy=r.policy, tip_id=r.tip_id, features=orjson.loads(r.features), x=r.x,
        score=r.score, propensity=r.propensity, candidate_ids=orjson.loads(r.candidate_ids),
        candidate_x=r.candidate_x, candidate_features=r.candidate_features,
        context=None if r.context is None else orjson.loads(r.context), reward=r.reward,
        rewarded_ms=r.rewarded_ms, candidate_p=r.candidate_p, greedy=r.greedy,
        shadow=None if r.shadow is None else orjson.loads(r.shadow), reward_n=r.reward_n,
        learned=r.learned, learned_at=r.learned_at, reward_source=r.reward_source,
        summed=summed,
    )  # fmt: skip


def _cross_check(
    report: CheckReport, users: dict[str, UserRecord], rows: Iterable[DecisionRow]
) -> None:
    """The checks across the two tables, counted per user as consistency.scan counts them."""
    found: dict[str, Counter[str]] = {
        "decision_without_model": Counter(),
        "decision_seq_out_of_range": Counter(),
    }
    for r in rows:
        user = users.get(r.user_id)
        if user is None:
            found["decision_without_model"][r.user_id] += 1
        elif r.seq < 1 or r.seq > user.pulls:
            found["decision_seq_out_of_range"][r.user_id] += 1
    details = {
        "decision_without_model": "no model for the decision's user",
        "decision_seq_out_of_range": "seq below 1 or above the user's pulls",
    }
    for kind, per_user in found.items():
        if per_user:
            examples = sorted(per_user)[:MAX_EXAMPLES]
            report.add(kind, sum(per_user.values()), examples, details[kind])
