"""PostgreSQL: one database shared by any number of `oo-serving` replicas.

Round trips. Each write is two round trips, using psycopg's pipeline mode:

    1. BEGIN; make sure the user's row exists; SELECT it FOR UPDATE (and, for a reward,
       its decision)                                              -- one round trip
       ... the service's pure function runs here, the row locked ...
    2. UPDATE the row; INSERT/UPDATE/DELETE decisions; COMMIT     -- one round trip

Atomicity across replicas. The row lock serialises every read-modify-write of one user,
across connections and replicas; the lock is held from step 1 to COMMIT. A user's first
request inserts a row with no model (`state` NULL) before locking it, so two first
requests for a new user serialise too. Other users never wait. A function that needs
the user's learned rewards (ReplayNeeded) gets them by one more round trip between the
two, the row still locked.

Erasure takes part in the same order: its DELETE of the user's row waits for the row
lock, and deletes the decisions in a later statement, which sees what the write before
it committed. A write whose row was erased between its INSERT and its lock finds no row
to lock; it then makes the row again and locks that, in the same transaction, so it is
ordered after the erasure and starts a fresh user. Every statement that must change one
row fails the transaction if it changed none, so nothing is acknowledged that is not
stored.

Deadline. The wait for this user's earlier writes in this process, the wait for a pooled
connection and both round trips count against one deadline (`pool_timeout_s` + twice
`statement_timeout_ms` + 1 s); past it the answer is 503 and nothing was written.

Failures. A connection that breaks in step 1 has committed nothing, so the transaction
is retried once on a fresh connection. Any other database failure, a pool that cannot
hand out a connection within `pool_timeout_s`, or a statement or lock wait past
`statement_timeout_ms` answers 503 (StoreUnavailable / StoreBusy) with nothing written
(a break during step 2 may or may not have committed: a retried reward with its
event_id is then acknowledged without being learned twice). The pool replaces broken
connections by itself, so the service recovers when the database returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, TypeVar

import numpy as np
import orjson
import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from oo_serving.check import CheckReport
from oo_serving.core.features import Vector
from oo_serving.core.policy import Pooled
from oo_serving.errors import StoreBusy, StoreUnavailable
from oo_serving.redact import redact_url
from oo_serving.store import consistency, migrations
from oo_serving.store.base import (
    DECISION_COLUMNS,
    EXPORT_PAGE_ROWS,
    EXPORTS_AT_ONCE,
    FOLDED_SHARD,
    LATEST_REPORT_SQL,
    LOG_PAGE_ROWS,
    MARK_SQL,
    POOLED_FOLD_AFTER_MS,
    POOLED_MAX_SHARDS,
    RECENT_SQL,
    REF_COLUMNS,
    REPLAY_SQL,
    REPORTS_KEPT,
    STATS_SQL_POSTGRES,
    STATS_USERS_SQL,
    SWEEP_MARK_SQL,
    TRIM_REPORTS_SQL,
    UNREWARDED_SQL,
    USER_COLUMNS,
    DecisionLookup,
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
    mark_params,
    pooled_stats,
    ref_from_row,
    refuse_newer,
    replay_from_rows,
    report_from_row,
    require_current,
    sum_pooled,
    user_from_row,
    user_params,
)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
Row = tuple[Any, ...]

_ENSURE_USER = "INSERT INTO user_model (user_id) VALUES (%s) ON CONFLICT (user_id) DO NOTHING"
_LOCK_USER = f"SELECT {USER_COLUMNS} FROM user_model WHERE user_id = %s FOR UPDATE"
# A statement that must change exactly one row divides by the rows it changed, so that
# changing none fails the transaction inside the pipeline, before its COMMIT can run.
_UPDATE_USER = """
WITH changed AS (
    UPDATE user_model SET policy = %s, state = %s, state_version = %s, pulls = %s,
        reward_count = %s, cumulative_reward = %s, last_updated_ms = %s, shadows = %s
    WHERE user_id = %s
    RETURNING 1
)
SELECT 1 / count(*) FROM changed
"""
_MARK_REWARDED = f"""
WITH changed AS ({MARK_SQL.replace("?", "%s")} RETURNING 1)
SELECT 1 / count(*) FROM changed
"""
_UNREWARDED = UNREWARDED_SQL.replace("?", "%s")
_SWEEP_MARK = SWEEP_MARK_SQL.replace("?", "%s")
_SET_SWEEP_MARK = """
INSERT INTO sweep_mark (name, until_ms) VALUES (%s, %s)
ON CONFLICT (name) DO UPDATE SET until_ms = greatest(sweep_mark.until_ms, excluded.until_ms)
"""
_INSERT_DECISION = """
INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score, policy,
                      propensity, model_version, candidate_ids, candidate_x,
                      candidate_features, context, candidate_p, greedy, shadow)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
_REPLAY = REPLAY_SQL.replace("?", "%s")
_STATS = STATS_SQL_POSTGRES.replace("?", "%s")
_STATS_USERS = STATS_USERS_SQL.replace("?", "%s")
_RECENT = RECENT_SQL.replace("?", "%s")
_LATEST_REPORT = LATEST_REPORT_SQL.replace("?", "%s")
_TRIM_REPORTS = TRIM_REPORTS_SQL.replace("?", "%s")
_INSERT_REPORT = (
    "INSERT INTO report (kind, created_ms, body) VALUES (%s, %s, %s::jsonb) RETURNING id"
)
# A pooled row is made (empty: count 0, stats zero) before it is locked, as a user's is.
_ENSURE_POOLED = """
INSERT INTO pooled (policy, shard, count, stats, updated_ms) VALUES (%s, %s, 0, %s, %s)
ON CONFLICT (policy, shard) DO NOTHING
"""
_LOCK_POOLED = "SELECT count, stats FROM pooled WHERE policy = %s AND shard = %s FOR UPDATE"
_COUNT_POOLED = "SELECT count(*) FROM pooled WHERE policy = %s"
# Rows being written by their own process are skipped, not waited for: they are alive,
# and two processes folding at once then never wait for each other's own row.
_LOCK_STALE_POOLED = """
SELECT shard, count, stats FROM pooled
WHERE policy = %s AND updated_ms < %s AND shard <> %s AND shard <> %s
ORDER BY shard FOR UPDATE SKIP LOCKED
"""
_UPDATE_POOLED = """
WITH changed AS (
    UPDATE pooled SET count = %s, stats = %s, updated_ms = %s
    WHERE policy = %s AND shard = %s
    RETURNING 1
)
SELECT 1 / count(*) FROM changed
"""
_REF_BY_EVENT = f"SELECT {REF_COLUMNS} FROM decision WHERE user_id = %s AND event_id = %s"
_REF_BY_TIP = (
    f"SELECT {REF_COLUMNS} FROM decision WHERE user_id = %s AND tip_id = %s"
    " ORDER BY seq DESC LIMIT 1"
)
_MIGRATION_LOCK = 0x6F6F_5345  # pg_advisory_xact_lock key: one migrator at a time
_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS oo_schema_version (
    version    integer     NOT NULL PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class _RetrySafe(Exception):
    """The connection broke before anything could be committed."""


class PostgresStore:
    """The Store protocol on PostgreSQL, through a pool of async psycopg connections."""

    backend = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        pool_timeout_s: float = 2.0,
        connect_timeout_s: int = 2,
        statement_timeout_ms: int = 5000,
    ) -> None:
        self.dsn = dsn
        # A bound on one whole database call, should the network hang where no server
        # time-out can act: the wait for a connection plus two statements, and a margin.
        self._deadline_s = pool_timeout_s + 2 * statement_timeout_ms / 1000 + 1.0
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self._exports = Slots(EXPORTS_AT_ONCE, self._deadline_s, "exports")
        self._connect_kwargs: dict[str, Any] = {
            # Transactions are explicit BEGIN ... COMMIT inside pipelines; a read
            # outside them is one statement, committed at once.
            "autocommit": True,
            "connect_timeout": connect_timeout_s,
            # Notice a dead peer on an idle or a busy connection within seconds.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(statement_timeout_ms) + 5000,
            "options": f"-c statement_timeout={int(statement_timeout_ms)}"
            f" -c lock_timeout={int(statement_timeout_ms)}",
        }
        self._pool = AsyncConnectionPool(
            conninfo=dsn,
            min_size=pool_min_size,
            max_size=pool_max_size,
            timeout=pool_timeout_s,
            open=False,
            name="oo-serving",
            kwargs=self._connect_kwargs,
        )

    # ── lifecycle ────────────────────────────────────────────────────────────
    async def open(self, migrate: bool = True) -> None:
        wait_s = max(self._pool.timeout, 5.0)
        try:
            await self._pool.open(wait=True, timeout=wait_s)
        except PoolTimeout as exc:
            await self._pool.close()
            reason = await self._why_no_connection() or f"no connection within {wait_s:g} s"
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {redact_url(self.dsn)}: {reason}"
            ) from exc
        if migrate:
            await self.migrate()
        else:
            await self._require_current()

    async def _why_no_connection(self) -> str | None:
        """The driver's reason a connection cannot be made (refused, timed out, no such
        database, password refused), from one direct attempt: a pool that fails to open
        says only that it timed out. None if the attempt succeeds."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, **self._connect_kwargs)
        except psycopg.Error as exc:
            return _one_line(str(exc))
        await conn.close()
        return None

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        """The database answers and takes writes (a standby in recovery does not)."""

        async def query(conn: Conn) -> None:
            cur = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cur.fetchone()
            if row is None or row[0]:
                raise StoreUnavailable("the database is read-only (a standby in recovery)")

        await self._run(query)

    async def _require_current(self) -> None:
        """Raise SchemaError unless the schema is this release's; read only."""
        known = migrations.load("postgres")

        async def version(conn: Conn) -> int:
            cur = await conn.execute("SELECT to_regclass('oo_schema_version') IS NOT NULL")
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM oo_schema_version")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        try:
            current = await self._run(version)
        except BaseException:
            await self._pool.close()
            raise
        require_current(current, known[-1].version if known else 0, "the database")

    async def migrate(self) -> list[int]:
        """Apply pending migrations; [] when current. Raises SchemaTooNew.

        Replicas may run it at once: an advisory lock lets one migrate at a time.
        """
        known = migrations.load("postgres")
        latest = known[-1].version if known else 0

        async def apply(conn: Conn) -> list[int]:
            applied: list[int] = []
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute(_SCHEMA_TABLE)
                cur = await conn.execute("SELECT coalesce(max(version), 0) FROM oo_schema_version")
                row = await cur.fetchone()
                current = int(row[0]) if row else 0
                refuse_newer(current, latest, "the database")
                for migration in known[current:]:
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO oo_schema_version (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                    applied.append(migration.version)
            return applied

        return await self._run(apply)

    # ── transactions ─────────────────────────────────────────────────────────
    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        async def body(conn: Conn) -> ScoreWrite:
            user_row, _ = await _begin_and_lock(conn, user_id)
            user = user_from_row(user_id, user_row)
            try:
                write = fn(user, None)
            except ReplayNeeded:
                write = fn(user, await _load_replay(conn, user_id))
            d = write.decision
            async with conn.pipeline():
                await conn.execute(_UPDATE_USER, _update_params(write.user))
                await conn.execute(
                    _INSERT_DECISION,
                    (d.user_id, d.seq, d.event_id, d.ts_ms, d.tip_id, Jsonb(d.features),
                     encode_array(d.x), d.score, d.policy, d.propensity, d.model_version,
                     list(d.candidate_ids), encode_array(d.candidate_X),
                     encode_optional(d.candidate_features), Jsonb(d.context),
                     encode_optional(d.candidate_p), d.greedy,
                     Jsonb(d.shadow) if d.shadow else None),
                )  # fmt: skip
                await conn.execute(
                    "DELETE FROM decision WHERE user_id = %s AND seq < %s",
                    (user_id, write.keep_from_seq),
                )
                await conn.execute("COMMIT")
            return write

        return await self._user_write(user_id, body)

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        find_ref: tuple[str, tuple[Any, ...]]
        if lookup.event_id is not None:
            find_ref = (_REF_BY_EVENT, (user_id, lookup.event_id))
        else:
            find_ref = (_REF_BY_TIP, (user_id, lookup.tip_id))

        async def body(conn: Conn) -> RewardWrite:
            user_row, ref_row = await _begin_and_lock(conn, user_id, find_ref)
            user = user_from_row(user_id, user_row)
            ref = ref_from_row(ref_row, json_as_text=False)
            try:
                write = fn(user, ref, None)
            except ReplayNeeded:
                write = fn(user, ref, await _load_replay(conn, user_id))
            if write.user is None and write.mark is None:
                await conn.execute("ROLLBACK")  # nothing to write, not even the row made above
                return write
            async with conn.pipeline():
                if write.user is not None:
                    await conn.execute(_UPDATE_USER, _update_params(write.user))
                if write.mark is not None:
                    await conn.execute(_MARK_REWARDED, mark_params(user_id, write.mark))
                await conn.execute("COMMIT")
            return write

        return await self._user_write(user_id, body)

    async def delete_user(self, user_id: str) -> bool:
        async def body(conn: Conn) -> bool:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                # First the row: this waits for the row lock of a write in flight, so the
                # decisions statement after it sees that write's decision, and deletes it.
                models = await conn.execute("DELETE FROM user_model WHERE user_id = %s", (user_id,))
                decisions = await conn.execute(
                    "DELETE FROM decision WHERE user_id = %s", (user_id,)
                )
                await conn.execute("COMMIT")
            return bool(models.rowcount or decisions.rowcount)

        return await self._user_write(user_id, body)

    async def add_pooled(
        self, policy: str, shard: str, count: int, stats: Vector, ts_ms: int
    ) -> None:
        flat = pooled_stats(stats)

        async def body(conn: Conn) -> None:
            own = await _begin_and_lock_pooled(conn, policy, shard, flat.size, ts_ms)
            total = add_stats(own[1], flat, f"the pooled row ({policy}, {shard})")
            writes: list[tuple[str, tuple[Any, ...]]] = [
                (_UPDATE_POOLED, (own[0] + count, encode_array(total), ts_ms, policy, shard))
            ]
            if own[2] > POOLED_MAX_SHARDS:
                writes += await _fold_pooled(conn, policy, shard, flat.size, ts_ms)
            async with conn.pipeline():
                for statement in writes:
                    await conn.execute(*statement)
                await conn.execute("COMMIT")

        try:
            async with asyncio.timeout(self._deadline_s):
                await self._run_tx(body)
        except TimeoutError as exc:
            raise StoreBusy(
                f"the pooled statistics' write did not finish within {self._deadline_s:g}s"
            ) from exc

    async def pooled(self, policy: str) -> Pooled | None:
        async def query(conn: Conn) -> Pooled | None:
            cur = await conn.execute(
                "SELECT count, stats FROM pooled WHERE policy = %s ORDER BY shard", (policy,)
            )
            return sum_pooled(await cur.fetchall(), f"a pooled row of {policy}")

        return await self._run(query)

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        async def delete(conn: Conn) -> int:
            # Keyed by (user_id, seq), not ctid, so that it also runs on a sharded table.
            cur = await conn.execute(
                "DELETE FROM decision WHERE (user_id, seq) IN (SELECT user_id, seq FROM decision"
                " WHERE ts_ms < %s LIMIT %s)",
                (older_than_ms, batch_size),
            )
            return cur.rowcount

        return await self._run(delete)

    # ── reads ────────────────────────────────────────────────────────────────
    async def get_user(self, user_id: str) -> UserRecord | None:
        async def query(conn: Conn) -> UserRecord | None:
            cur = await conn.execute(
                f"SELECT {USER_COLUMNS} FROM user_model WHERE user_id = %s", (user_id,)
            )
            return user_from_row(user_id, await cur.fetchone())

        return await self._run(query)

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        async def query(conn: Conn) -> list[HistoryEntry]:
            cur = await conn.execute(
                "SELECT ts_ms, features, score, tip_id, event_id FROM decision"
                " WHERE user_id = %s ORDER BY seq DESC LIMIT %s",
                (user_id, limit),
            )
            rows = await cur.fetchall()
            return [
                HistoryEntry(ts_ms=r[0], features=r[1], score=r[2], tip_id=r[3], event_id=r[4])
                for r in reversed(rows)
            ]

        return await self._run(query)

    @asynccontextmanager
    async def export_user(self, user_id: str) -> AsyncIterator[UserExport]:
        # One snapshot (REPEATABLE READ) read through a server-side cursor, a page at a
        # time; the pooled connection is held while the export streams, hence the slots.
        async with self._exports.slot():
            async with self._bounded():
                conn_cm = self._pool.connection()
                conn = await conn_cm.__aenter__()
            rows = conn.cursor(name="oo_export")
            try:
                async with self._bounded():
                    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    cur = await conn.execute(
                        f"SELECT {USER_COLUMNS} FROM user_model WHERE user_id = %s", (user_id,)
                    )
                    user = user_from_row(user_id, await cur.fetchone())
                    await rows.execute(
                        f"SELECT {DECISION_COLUMNS} FROM decision WHERE user_id = %s ORDER BY seq",
                        (user_id,),
                    )

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while True:
                        async with self._bounded():
                            batch = await rows.fetchmany(EXPORT_PAGE_ROWS)
                        if not batch:
                            return
                        yield [decision_from_row(r, json_as_text=False) for r in batch]

                yield UserExport(user, pages())
            finally:
                with suppress(Exception):  # the pool discards a connection left in error
                    await rows.close()
                    if not conn.broken:
                        await conn.execute("ROLLBACK")
                await conn_cm.__aexit__(None, None, None)

    @asynccontextmanager
    async def decision_log(
        self, since_ms: int, until_ms: int, user_ids: Sequence[str] | None = None
    ) -> AsyncIterator[AsyncIterator[list[DecisionRecord]]]:
        # As export_user: one snapshot read through a server-side cursor, a page at a time.
        async with self._exports.slot():
            async with self._bounded():
                conn_cm = self._pool.connection()
                conn = await conn_cm.__aenter__()
            rows = conn.cursor(name="oo_decision_log")
            try:
                where = "ts_ms >= %s AND ts_ms < %s"
                params: list[Any] = [since_ms, until_ms]
                if user_ids is not None:
                    where += " AND user_id = ANY(%s)"
                    params.append(sorted(set(user_ids)))
                async with self._bounded():
                    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    await rows.execute(
                        f"SELECT {DECISION_COLUMNS} FROM decision WHERE {where}"
                        " ORDER BY ts_ms, user_id, seq",
                        params,
                    )

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while True:
                        async with self._bounded():
                            batch = await rows.fetchmany(LOG_PAGE_ROWS)
                        if not batch:
                            return
                        yield [decision_from_row(r, json_as_text=False) for r in batch]

                yield pages()
            finally:
                with suppress(Exception):  # the pool discards a connection left in error
                    await rows.close()
                    if not conn.broken:
                        await conn.execute("ROLLBACK")
                await conn_cm.__aexit__(None, None, None)

    async def unrewarded(
        self, since_ms: int, until_ms: int, after: Keyset, limit: int
    ) -> list[tuple[int, str, int, str]]:
        async def query(conn: Conn) -> list[tuple[int, str, int, str]]:
            cur = await conn.execute(_UNREWARDED, (since_ms, until_ms, *after, limit))
            return [(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()]

        return await self._run(query)

    async def sweep_mark(self, name: str) -> int | None:
        async def query(conn: Conn) -> int | None:
            cur = await conn.execute(_SWEEP_MARK, (name,))
            row = await cur.fetchone()
            return None if row is None else int(row[0])

        return await self._run(query)

    async def set_sweep_mark(self, name: str, until_ms: int) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(_SET_SWEEP_MARK, (name, until_ms))

        await self._run(write)

    async def decision_stats(self, since_ms: int, until_ms: int, bucket_ms: int) -> DecisionStats:
        check_stats_range(since_ms, until_ms, bucket_ms)

        async def query(conn: Conn) -> DecisionStats:
            # One snapshot for both statements, so that the users match the counts.
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = await conn.execute(_STATS, (since_ms, bucket_ms, since_ms, until_ms))
                rows = await cur.fetchall()
                cur = await conn.execute(_STATS_USERS, (since_ms, until_ms))
                users = {r[0]: int(r[1]) for r in await cur.fetchall()}
            return DecisionStats(bucket_stats_from_rows(rows), users)

        return await self._run(query)

    async def recent_decisions(self, user_id: str, limit: int) -> list[DecisionRecord]:
        async def query(conn: Conn) -> list[DecisionRecord]:
            cur = await conn.execute(_RECENT, (user_id, limit))
            return [decision_from_row(r, json_as_text=False) for r in await cur.fetchall()]

        return await self._run(query)

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        # orjson, as on SQLite: the same text on both backends, and NaN refused as null.
        text = orjson.dumps(body).decode()

        async def write(conn: Conn) -> int:
            async with conn.transaction():
                cur = await conn.execute(_INSERT_REPORT, (kind, created_ms, text))
                row = await cur.fetchone()
                await conn.execute(_TRIM_REPORTS, (kind, kind, REPORTS_KEPT))
            if row is None:
                raise StoreUnavailable("could not save the report: no row was inserted")
            return int(row[0])

        return await self._run(write)

    async def latest_report(self, kind: str) -> SavedReport | None:
        async def query(conn: Conn) -> SavedReport | None:
            cur = await conn.execute(_LATEST_REPORT, (kind,))
            return report_from_row(await cur.fetchone(), json_as_text=False)

        return await self._run(query)

    # ── plumbing ─────────────────────────────────────────────────────────────
    async def _user_write(self, user_id: str, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a write of user_id's: its turn in this process, then the transaction, all
        within one deadline."""
        try:
            async with asyncio.timeout(self._deadline_s), self._user_turn(user_id):
                return await self._run_tx(body)
        except TimeoutError as exc:
            raise StoreBusy(
                f"this user's write did not finish within {self._deadline_s:g}s: earlier"
                " writes of the same user, or the database, held it up"
            ) from exc

    @asynccontextmanager
    async def _user_turn(self, user_id: str) -> AsyncIterator[None]:
        """One write per user at a time in this process; the others wait here.

        The row lock already serialises a user's writes across replicas; waiting for it
        in-process instead keeps a burst for one user from holding every pooled connection
        (each blocked on that row) while other users' requests time out waiting for one.
        The map holds only users with a write in flight.
        """
        lock, waiting = self._turns.get(user_id) or (asyncio.Lock(), 0)
        self._turns[user_id] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._turns[user_id]
            if waiting == 1:
                del self._turns[user_id]
            else:
                self._turns[user_id] = (lock, waiting - 1)

    @asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """One database call: within the deadline, its failures as the service's errors."""
        with _mapped_errors(self._deadline_s):
            async with asyncio.timeout(self._deadline_s):
                yield

    async def _run(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run body on a pooled connection; database failures become service errors."""
        async with self._bounded(), self._pool.connection() as conn:
            return await body(conn)

    async def _run_tx(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """As _run, rolling back on any error, and retrying once a break before writing."""

        async def guarded(conn: Conn) -> T:
            try:
                return await body(conn)
            except BaseException:
                if not conn.broken and conn.info.transaction_status != _IDLE:
                    await conn.execute("ROLLBACK")
                raise

        try:
            return await self._run(guarded)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, _RetrySafe):
                raise
        return await self._run(guarded)

    # ── consistency check (`oo-serving check`): reads only ───────────────────
    async def check(self, *, summed_rewards: bool = False) -> CheckReport:
        """Every row against the service's invariants.

        Each page and each cross-table check is one autocommit SELECT: its own snapshot,
        no row lock, nothing held between statements. Every statement must finish within
        the store's statement timeout; `oo-serving check` opens its store with a long one.
        summed_rewards: as Store.check.
        """
        report = CheckReport(backend=self.backend, database=redact_url(self.dsn))
        report.skipped["integrity_check"] = (
            "PostgreSQL has no equivalent of SQLite's; pg_amcheck checks its indexes and heap"
        )

        async def fetch(statement: str, params: tuple[Any, ...]) -> list[Row]:
            async def query(conn: Conn) -> list[Row]:
                cur = await conn.execute(statement, params)
                return await cur.fetchall()

            return await self._run(query)

        await consistency.scan(report, fetch, consistency.POSTGRES, summed_rewards=summed_rewards)
        return report


_IDLE = psycopg.pq.TransactionStatus.IDLE
_LOCK_ATTEMPTS = 5


async def _begin_and_lock(
    conn: Conn, user_id: str, also: tuple[str, tuple[Any, ...]] | None = None
) -> tuple[Row | None, Row | None]:
    """The first round trip of a write: BEGIN, make sure the user's row exists, lock it,
    and run `also` (a query and its parameters) if given. The two rows, or None.

    A connection that breaks here has committed nothing: the failure is marked safe to retry.
    """
    begin = True
    for _ in range(_LOCK_ATTEMPTS):
        try:
            async with conn.pipeline() as p:
                if begin:
                    await conn.execute("BEGIN")
                await conn.execute(_ENSURE_USER, (user_id,))
                user_cur = await conn.execute(_LOCK_USER, (user_id,))
                also_cur = await conn.execute(*also) if also is not None else None
                await p.sync()
            user_row = await user_cur.fetchone()
            also_row = await also_cur.fetchone() if also_cur is not None else None
        except psycopg.OperationalError as exc:
            if conn.broken:
                raise _RetrySafe(str(exc)) from exc
            raise
        if user_row is not None:
            return user_row, also_row
        # The row was erased between our INSERT and our lock: make it again, and lock it.
        begin = False
    raise StoreBusy("the user was erased again and again while this write waited; retry")


async def _load_replay(conn: Conn, user_id: str) -> list[LoggedReward]:
    """The user's Replay, read inside the write's transaction (the row still locked)."""
    cur = await conn.execute(_REPLAY, (user_id,))
    return replay_from_rows(await cur.fetchall(), json_as_text=False)


async def _begin_and_lock_pooled(
    conn: Conn, policy: str, shard: str, size: int, ts_ms: int
) -> tuple[int, bytes, int]:
    """The first round trip of add_pooled: BEGIN, make sure the row (policy, shard) exists,
    lock it, and count the policy's rows. (count, stats, rows of the policy).

    A connection that breaks here has committed nothing: the failure is marked safe to
    retry. A row folded away between its INSERT and its lock is made again, as a user's.
    """
    begin = True
    empty = encode_array(np.zeros(size))
    for _ in range(_LOCK_ATTEMPTS):
        try:
            async with conn.pipeline() as p:
                if begin:
                    await conn.execute("BEGIN")
                await conn.execute(_ENSURE_POOLED, (policy, shard, empty, ts_ms))
                own_cur = await conn.execute(_LOCK_POOLED, (policy, shard))
                count_cur = await conn.execute(_COUNT_POOLED, (policy,))
                await p.sync()
            own = await own_cur.fetchone()
            counted = await count_cur.fetchone()
        except psycopg.OperationalError as exc:
            if conn.broken:
                raise _RetrySafe(str(exc)) from exc
            raise
        if own is not None and counted is not None:
            return int(own[0]), bytes(own[1]), int(counted[0])
        begin = False
    raise StoreBusy("the pooled row was folded again and again while this write waited; retry")


async def _fold_pooled(
    conn: Conn, policy: str, shard: str, size: int, ts_ms: int
) -> list[tuple[str, tuple[Any, ...]]]:
    """Lock the policy's stale rows (as Store.add_pooled defines them) and the folded row;
    the statements that fold the first into the second, to run before COMMIT."""
    cur = await conn.execute(
        _LOCK_STALE_POOLED, (policy, ts_ms - POOLED_FOLD_AFTER_MS, FOLDED_SHARD, shard)
    )
    stale = await cur.fetchall()
    if not stale:
        return []
    async with conn.pipeline() as p:
        await conn.execute(
            _ENSURE_POOLED, (policy, FOLDED_SHARD, encode_array(np.zeros(size)), ts_ms)
        )
        folded_cur = await conn.execute(_LOCK_POOLED, (policy, FOLDED_SHARD))
        await p.sync()
    folded = await folded_cur.fetchall()
    total = sum_pooled([*folded, *(r[1:] for r in stale)], f"a pooled row of {policy}")
    if total is None:  # not so: there is a stale row
        return []
    return [
        (_UPDATE_POOLED, (total.count, encode_array(total.stats), ts_ms, policy, FOLDED_SHARD)),
        (
            "DELETE FROM pooled WHERE policy = %s AND shard = ANY(%s)",
            (policy, [r[0] for r in stale]),
        ),
    ]


def _one_line(message: str) -> str:
    """libpq's message, which spans lines (a hint indented below), as one sentence-like
    line for a log or a terminal."""
    text = ""
    for line in message.splitlines():
        part = " ".join(line.split())
        if part:
            text = f"{text}{'' if text[-1:] in ('', '.', '?', '!', ':', ';') else '.'} {part}"
    return text.strip()


@contextmanager
def _mapped_errors(deadline_s: float) -> Iterator[None]:
    """Database failures, and a call past its deadline, as the service's errors."""
    try:
        yield
    except TimeoutError as exc:
        raise StoreUnavailable(f"the database did not answer within {deadline_s:.0f}s") from exc
    except PoolTimeout as exc:
        raise StoreUnavailable("no database connection could be had in time") from exc
    except PoolClosed as exc:
        raise StoreUnavailable("the store is closed") from exc
    except _RetrySafe as exc:
        raise StoreUnavailable(f"the database connection broke: {exc}") from exc
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        raise StoreBusy(f"the database did not answer in time: {exc}") from exc
    except psycopg.errors.DivisionByZero as exc:  # a row that had to change did not
        raise StoreUnavailable("a row the write had to change was not there") from exc
    except psycopg.Error as exc:
        raise StoreUnavailable(f"the database failed: {exc}") from exc


def _update_params(u: UserRecord) -> tuple[Any, ...]:
    user_id, *columns = user_params(u)
    return (*columns, user_id)
