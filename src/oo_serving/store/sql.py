"""Every statement both SQL backends run, written once, with the dialect as a parameter.

SQLite and PostgreSQL differ in little that the store says to them: the parameter marker
(`?`, `%s`), how a JSON value and the list of candidate ids go in and come out (JSON
text on SQLite; jsonb and text[], which the driver encodes and decodes, on PostgreSQL),
how a list of values is matched, the name of `greatest`, and how a decision row is
addressed. A `Dialect` says those; `Statements` writes each statement from one, once,
when a backend module is imported, so a call only looks a string up and builds its
parameters as cheaply as a hand-written tuple.

`SQLStore` is the rest of what the backends share, after aiocache's `BaseCache`: every
read, and every write of one statement, of the Store protocol is written here once, as
a statement, its parameters and its row codec. A backend provides only how a statement
runs (`_query`, `_change`, `_snapshot`: on which thread or connection, in which
transaction) and keeps what is its own: connections and pools, the transactions of
score_tx and reward_tx with their batching, locks (`FOR UPDATE`, `SKIP LOCKED`, flock,
advisory locks), PRAGMAs, migrations, deadlines, retries and error mapping.

The row codecs shared with the in-memory store (user_from_row, decision_from_row, ...)
live in store.base beside the records and their column lists.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import orjson
from psycopg.types.json import Jsonb

from oo_serving.core.policy import Pooled
from oo_serving.store import consistency
from oo_serving.store.base import (
    DECISION_COLUMNS,
    REF_COLUMNS,
    REPORT_COLUMNS,
    USER_COLUMNS,
    DecisionLookup,
    DecisionRecord,
    DecisionStats,
    HistoryEntry,
    Keyset,
    SavedReport,
    UserRecord,
    bucket_stats_from_rows,
    check_stats_range,
    decision_from_row,
    encode_array,
    encode_optional,
    from_json,
    report_from_row,
    sum_pooled,
    user_from_row,
)

T = TypeVar("T")
Row = Sequence[Any]
Rows = Sequence[Row]


def _json_text(value: Any) -> str:
    """A JSON value as text (orjson: compact, NaN refused as null)."""
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class Dialect(consistency.Dialect):
    """What differs between SQLite and PostgreSQL in the statements of the store.

    Beside placeholder and json_as_text (consistency.Dialect, which `oo-serving check`
    reads with): json, how a JSON value (features, context, shadow) goes in as a
    parameter; text_list, how the candidate ids do; greatest, the larger of two values;
    list_item, the candidate id at index `greedy` (from 0); row_key, the columns that
    address a decision row for a batched delete; json_text, the marker of a parameter
    given as JSON text (a report's body); lists, whether a list of values is one
    parameter (`= ANY(%s)`) rather than one marker each (`IN (?, ?)`); log_users, the
    condition that narrows the decision log to a set of users. The fragments are written
    with `?` markers, as the statements are.
    """

    json: Callable[[Any], Any]
    text_list: Callable[[Sequence[str]], Any]
    greatest: str
    list_item: str
    row_key: str
    json_text: str
    lists: bool
    log_users: str

    def in_list(self, n: int) -> str:
        """Membership in a list of n values: one array parameter, or n markers."""
        if self.lists:
            return f"= ANY({self.placeholder})"
        return f"IN ({', '.join([self.placeholder] * n)})"


SQLITE = Dialect(
    placeholder="?",
    json_as_text=True,
    json=_json_text,
    text_list=_json_text,
    greatest="max",
    list_item="json_extract(candidate_ids, '$[' || greedy || ']')",
    row_key="rowid",
    json_text="?",
    lists=False,
    # A temporary table the backend fills: any number of users, past SQLite's limit on
    # the parameters of one statement.
    log_users="user_id IN (SELECT user_id FROM temp.log_users)",
)
POSTGRES = Dialect(
    placeholder="%s",
    json_as_text=False,
    json=Jsonb,
    text_list=list,
    greatest="greatest",
    list_item="candidate_ids[greedy + 1]",  # a text[], indexed from 1
    row_key="user_id, seq",  # not ctid, so that it also runs on a sharded table
    json_text="?::jsonb",
    lists=True,
    log_users="user_id = ANY(?)",
)

# The statements, written with `?` markers; Statements puts in the dialect's.
SELECT_USER_SQL = f"SELECT {USER_COLUMNS} FROM user_model WHERE user_id = ?"
SELECT_USERS_SQL = f"SELECT user_id, {USER_COLUMNS} FROM user_model WHERE user_id "
"""The model rows of several users, user_id first; the membership follows (in_list)."""
INSERT_DECISION_SQL = """
INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score, policy,
                      propensity, model_version, candidate_ids, candidate_x,
                      candidate_features, context, candidate_p, greedy, shadow)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
"""A new decision (`?`: Statements.decision_params)."""
PRUNE_USER_SQL = "DELETE FROM decision WHERE user_id = ? AND seq < ?"
"""A user's decisions below a seq (`?`: user_id, keep_from_seq)."""
REPLAY_SQL = (
    "SELECT features, reward FROM decision WHERE user_id = ? AND learned IS TRUE"
    " ORDER BY rewarded_ms, seq"
)
"""The user's learned rewards in the order they were learned: a Replay (`?`: user_id)."""
MARK_SQL = (
    "UPDATE decision SET reward = ?, rewarded_ms = coalesce(rewarded_ms, ?), reward_n = ?,"
    " learned = ?, learned_at = ?, reward_source = coalesce(reward_source, ?)"
    " WHERE user_id = ? AND event_id = ? AND reward_n = ?"
)
"""A DecisionMark (`?`: mark_params). The first reward's time and source stay."""
REF_BY_EVENT_SQL = f"SELECT {REF_COLUMNS} FROM decision WHERE user_id = ? AND event_id = ?"
REF_BY_TIP_SQL = (
    f"SELECT {REF_COLUMNS} FROM decision WHERE user_id = ? AND tip_id = ? ORDER BY seq DESC LIMIT 1"
)
DELETE_MODEL_SQL = "DELETE FROM user_model WHERE user_id = ?"
DELETE_DECISIONS_SQL = "DELETE FROM decision WHERE user_id = ?"
HISTORY_SQL = (
    "SELECT ts_ms, features, score, tip_id, event_id FROM decision"
    " WHERE user_id = ? ORDER BY seq DESC LIMIT ?"
)
"""A user's last decisions as HistoryEntry rows, newest first (`?`: user_id, limit)."""
PRUNE_SQL = (
    "DELETE FROM decision WHERE ({key}) IN (SELECT {key} FROM decision WHERE ts_ms < ? LIMIT ?)"
)
"""Up to a number of decisions logged before a time (`?`: older_than_ms, batch_size)."""
EXPORT_SQL = f"SELECT {DECISION_COLUMNS} FROM decision WHERE user_id = ? ORDER BY seq"
LOG_SQL = (
    f"SELECT {DECISION_COLUMNS} FROM decision WHERE ts_ms >= ? AND ts_ms < ?{{users}}"
    " ORDER BY ts_ms, user_id, seq"
)
"""The decision log over a range (`?`: since, until, then the users' parameter if any)."""
UNREWARDED_SQL = (
    "SELECT ts_ms, user_id, seq, event_id FROM decision"
    " WHERE ts_ms >= ? AND ts_ms < ? AND reward IS NULL"
    " AND (ts_ms, user_id, seq) > (?, ?, ?) ORDER BY ts_ms, user_id, seq LIMIT ?"
)
"""A page of unrewarded decisions (`?`: since, until, then the keyset after, limit)."""
SWEEP_MARK_SQL = "SELECT until_ms FROM sweep_mark WHERE name = ?"
"""How far a sweep has gone (`?`: its name)."""
SET_SWEEP_MARK_SQL = """
INSERT INTO sweep_mark (name, until_ms) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET until_ms = {greatest}(sweep_mark.until_ms, excluded.until_ms)
"""
"""Advance a sweep, never back (`?`: name, until_ms)."""
STATS_SQL = (
    "SELECT policy, (ts_ms - ?) / ? AS bucket, count(*), count(reward),"
    " count(CASE WHEN reward_source = 'default' THEN 1 END),"
    " coalesce(sum(reward), 0), coalesce(sum(reward * reward), 0),"
    " count(CASE WHEN greedy IS NOT NULL AND tip_id <> {greedy_tip} THEN 1 END),"
    " min(reward), max(reward)"
    " FROM decision WHERE ts_ms >= ? AND ts_ms < ?"
    " GROUP BY policy, bucket ORDER BY policy, bucket"
)
"""A range's BucketStats rows (`?`: since, bucket_ms, since, until)."""
STATS_USERS_SQL = (
    "SELECT policy, count(DISTINCT user_id) FROM decision WHERE ts_ms >= ? AND ts_ms < ?"
    " GROUP BY policy"
)
"""Distinct users per policy over a range (`?`: since, until)."""
RECENT_SQL = f"SELECT {DECISION_COLUMNS} FROM decision WHERE user_id = ? ORDER BY seq DESC LIMIT ?"
"""A user's last decisions, newest first (`?`: user_id, limit)."""
INSERT_REPORT_SQL = "INSERT INTO report (kind, created_ms, body) VALUES (?, ?, {body})"
"""A report (`?`: kind, created_ms, the body as JSON text)."""
LATEST_REPORT_SQL = (
    f"SELECT {REPORT_COLUMNS} FROM report WHERE kind = ? ORDER BY created_ms DESC, id DESC LIMIT 1"
)
"""The newest report of a kind (`?`: kind)."""
TRIM_REPORTS_SQL = (
    "DELETE FROM report WHERE kind = ? AND id NOT IN"
    " (SELECT id FROM report WHERE kind = ? ORDER BY created_ms DESC, id DESC LIMIT ?)"
)
"""Delete all but the newest reports of a kind (`?`: kind, kind, how many to keep)."""
POOLED_SQL = "SELECT count, stats FROM pooled WHERE policy = ? ORDER BY shard"
"""Every pooled row of a policy (`?`: policy)."""
POOLED_ROW_SQL = "SELECT count, stats FROM pooled WHERE policy = ? AND shard = ?"
COUNT_POOLED_SQL = "SELECT count(*) FROM pooled WHERE policy = ?"
STALE_POOLED_SQL = (
    "SELECT shard, count, stats FROM pooled WHERE policy = ? AND updated_ms < ?"
    " AND shard NOT IN (?, ?) ORDER BY shard"
)
"""A policy's rows not updated since a time, but two shards (`?`: policy, the time, the
folded shard, the writer's own)."""
DELETE_SHARDS_SQL = "DELETE FROM pooled WHERE policy = ? AND shard "
"""Pooled rows of a policy; the membership follows (in_list)."""


class Statements:
    """Every statement of the SQL backends in one dialect, and the parameters of a new
    decision; built once per dialect (`statements`)."""

    def __init__(self, dialect: Dialect) -> None:
        q = dialect.sql
        self.dialect = dialect
        self.select_user = q(SELECT_USER_SQL)
        self.insert_decision = q(INSERT_DECISION_SQL)
        self.prune_user = q(PRUNE_USER_SQL)
        self.replay = q(REPLAY_SQL)
        self.mark = q(MARK_SQL)
        self.ref_by_event = q(REF_BY_EVENT_SQL)
        self.ref_by_tip = q(REF_BY_TIP_SQL)
        self.delete_model = q(DELETE_MODEL_SQL)
        self.delete_decisions = q(DELETE_DECISIONS_SQL)
        self.history = q(HISTORY_SQL)
        self.prune = q(PRUNE_SQL.format(key=dialect.row_key))
        self.export = q(EXPORT_SQL)
        self.log = q(LOG_SQL.format(users=""))
        self.log_of_users = q(LOG_SQL.format(users=f" AND {dialect.log_users}"))
        self.unrewarded = q(UNREWARDED_SQL)
        self.sweep_mark = q(SWEEP_MARK_SQL)
        self.set_sweep_mark = q(SET_SWEEP_MARK_SQL.format(greatest=dialect.greatest))
        self.stats = q(STATS_SQL.format(greedy_tip=dialect.list_item))
        self.stats_users = q(STATS_USERS_SQL)
        self.recent = q(RECENT_SQL)
        self.insert_report = q(INSERT_REPORT_SQL.format(body=dialect.json_text))
        self.latest_report = q(LATEST_REPORT_SQL)
        self.trim_reports = q(TRIM_REPORTS_SQL)
        self.pooled = q(POOLED_SQL)
        self.pooled_row = q(POOLED_ROW_SQL)
        self.count_pooled = q(COUNT_POOLED_SQL)
        self.stale_pooled = q(STALE_POOLED_SQL)
        self.decision_params = _decision_params(dialect)
        self._select_users = q(SELECT_USERS_SQL)
        self._delete_shards = q(DELETE_SHARDS_SQL)

    def select_users(self, n: int) -> str:
        """The model rows of n users, user_id first (parameters: Dialect.in_list's; with
        `lists`, one array parameter whatever n)."""
        return self._select_users + self.dialect.in_list(n)

    def delete_shards(self, n: int) -> str:
        """Delete n pooled rows of a policy (parameters: the policy, then in_list's)."""
        return self._delete_shards + self.dialect.in_list(n)

    def find_ref(self, user_id: str, lookup: DecisionLookup) -> tuple[str, tuple[Any, ...]]:
        """The statement and parameters that read the decision a reward is about: by
        event_id, or else the user's latest for tip_id (REF_COLUMNS)."""
        if lookup.event_id is not None:
            return self.ref_by_event, (user_id, lookup.event_id)
        return self.ref_by_tip, (user_id, lookup.tip_id)


def _decision_params(dialect: Dialect) -> Callable[[DecisionRecord], tuple[Any, ...]]:
    """A new decision as the parameters of INSERT_DECISION_SQL, in the dialect: a plain
    function over the dialect's encoders, as cheap to call as one written by hand."""
    json, text_list = dialect.json, dialect.text_list

    def params(d: DecisionRecord) -> tuple[Any, ...]:
        return (
            d.user_id, d.seq, d.event_id, d.ts_ms, d.tip_id, json(d.features),
            encode_array(d.x), d.score, d.policy, d.propensity, d.model_version,
            text_list(d.candidate_ids), encode_array(d.candidate_X),
            encode_optional(d.candidate_features), json(d.context),
            encode_optional(d.candidate_p), d.greedy, json(d.shadow) if d.shadow else None,
        )  # fmt: skip

    return params


@functools.cache
def statements(dialect: Dialect) -> Statements:
    """The dialect's Statements, built on first use."""
    return Statements(dialect)


STATS_SQL_SQLITE = statements(SQLITE).stats
"""A range's BucketStats rows on SQLite (`?`: since, bucket_ms, since, until); the
candidate ids are a JSON array there."""
STATS_SQL_POSTGRES = statements(POSTGRES).stats
"""As STATS_SQL_SQLITE on PostgreSQL, whose candidate ids are a text[] indexed from 1."""


def history_from_rows(rows: Rows, *, json_as_text: bool) -> list[HistoryEntry]:
    """The HistoryEntry of the rows of HISTORY_SQL (newest first), oldest first."""
    return [
        HistoryEntry(
            ts_ms=r[0], features=from_json(r[1], json_as_text), score=r[2], tip_id=r[3],
            event_id=r[4],
        )
        for r in reversed(rows)
    ]  # fmt: skip


def _first(rows: Rows) -> Row | None:
    """The first row, or None."""
    return rows[0] if rows else None


class SQLStore(ABC):
    """What the SQL backends share: each read, and each write of one statement, of the
    Store protocol, as a statement of `sql`, its parameters and its row codec.

    A backend sets `sql` (its dialect's Statements) and says how a statement runs:
    `_query` (a read, its rows decoded where the backend reads them), `_change` (one
    statement as a write of its own; the rows it changed) and `_snapshot` (reads that
    must see one snapshot).
    """

    sql: ClassVar[Statements]

    @abstractmethod
    async def _query(self, statement: str, params: Sequence[Any], decode: Callable[[Rows], T]) -> T:
        """decode(the statement's rows), read outside any write."""

    @abstractmethod
    async def _change(self, statement: str, params: Sequence[Any]) -> int:
        """Run the statement as a write of its own; how many rows it changed."""

    @abstractmethod
    async def _snapshot(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[Rows]:
        """Each query's rows, every query reading the same snapshot."""

    async def _fetch(self, statement: str, params: tuple[Any, ...]) -> Rows:
        """The statement's rows (consistency.Fetch)."""
        return await self._query(statement, params, _rows)

    async def get_user(self, user_id: str) -> UserRecord | None:
        decode = functools.partial(_user_of_rows, user_id)
        return await self._query(self.sql.select_user, (user_id,), decode)

    async def pooled(self, policy: str) -> Pooled | None:
        what = f"a pooled row of {policy}"
        return await self._query(self.sql.pooled, (policy,), lambda r: sum_pooled(r, what))

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        decode = functools.partial(history_from_rows, json_as_text=self.sql.dialect.json_as_text)
        return await self._query(self.sql.history, (user_id, limit), decode)

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        return await self._change(self.sql.prune, (older_than_ms, batch_size))

    async def unrewarded(
        self, since_ms: int, until_ms: int, after: Keyset, limit: int
    ) -> list[tuple[int, str, int, str]]:
        params = (since_ms, until_ms, *after, limit)
        return await self._query(self.sql.unrewarded, params, _keysets)

    async def sweep_mark(self, name: str) -> int | None:
        return await self._query(self.sql.sweep_mark, (name,), _first_int)

    async def set_sweep_mark(self, name: str, until_ms: int) -> None:
        await self._change(self.sql.set_sweep_mark, (name, until_ms))

    async def decision_stats(self, since_ms: int, until_ms: int, bucket_ms: int) -> DecisionStats:
        check_stats_range(since_ms, until_ms, bucket_ms)
        # One snapshot for both statements, so that the users match the counts.
        rows, users = await self._snapshot(
            [
                (self.sql.stats, (since_ms, bucket_ms, since_ms, until_ms)),
                (self.sql.stats_users, (since_ms, until_ms)),
            ]
        )
        return DecisionStats(bucket_stats_from_rows(rows), {r[0]: int(r[1]) for r in users})

    async def recent_decisions(self, user_id: str, limit: int) -> list[DecisionRecord]:
        return await self._query(self.sql.recent, (user_id, limit), self._decisions)

    async def latest_report(self, kind: str) -> SavedReport | None:
        return await self._query(self.sql.latest_report, (kind,), self._report)

    def _decisions(self, rows: Rows) -> list[DecisionRecord]:
        """The DecisionRecord of rows of DECISION_COLUMNS."""
        json_as_text = self.sql.dialect.json_as_text
        return [decision_from_row(r, json_as_text=json_as_text) for r in rows]

    def _report(self, rows: Rows) -> SavedReport | None:
        return report_from_row(_first(rows), json_as_text=self.sql.dialect.json_as_text)


def _rows(rows: Rows) -> Rows:
    return rows


def _user_of_rows(user_id: str, rows: Rows) -> UserRecord | None:
    return user_from_row(user_id, _first(rows))


def _keysets(rows: Rows) -> list[tuple[int, str, int, str]]:
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def _first_int(rows: Rows) -> int | None:
    return None if not rows else int(rows[0][0])
