"""PostgreSQL: one database shared by any number of `oo-serving` replicas.

Round trips. A /score write is batched with the other score writes in flight in this
process (group commit): one transaction for up to 64 users, one WAL flush for them all.
Two round trips, using psycopg's pipeline mode:

    1. BEGIN; make sure every user's row exists (one INSERT); lock the rows (one SELECT
       ... ORDER BY user_id FOR UPDATE SKIP LOCKED)                -- one round trip
       ... each write's pure function runs here, the rows locked ...
    2. UPDATE the rows; INSERT the decisions; prune; COMMIT       -- one round trip

A batch starts at once when fewer than two are in flight; otherwise the writes queue, and
the next batch to finish takes everything queued meanwhile. A reward, an erasure and a
score write the batch leaves out (below) are each a transaction of their own, the same
two round trips for one user (and, for a reward, its decision).

Atomicity across replicas. The row lock serialises every read-modify-write of one user,
across connections and replicas; the lock is held from step 1 to COMMIT. A user's first
request inserts a row with no model (`state` NULL) before locking it, so two first
requests for a new user serialise too. In this process a user has one write in flight at
a time (the others wait their turn), so a batch holds each user once. A batch never
waits for a row lock: a row another transaction holds (another replica's batch, a
reward, an erasure) is skipped, and that user's write is then made alone, waiting for the
lock; so batches cannot deadlock (the argument is at _LOCK_USERS), and one user's held
lock holds up no other user. A function that needs the user's learned rewards
(ReplayNeeded) gets them by one more round trip between the two, the rows still locked.

Erasure takes part in the same order: its DELETE of the user's row waits for the row
lock, and deletes the decisions in a later statement, which sees what the write before
it committed. A write whose row was erased between its INSERT and its lock finds no row
to lock; it then makes the row again and locks that (alone, if it was in a batch), so it
is ordered after the erasure and starts a fresh user. Every statement that must change
one row fails the transaction if it changed none, so nothing is acknowledged that is not
stored.

Deadline. The wait for this user's earlier writes in this process, for a batch to take
the write, for a pooled connection, both round trips and, if the write is made alone
after all, its own transaction count against one deadline (`pool_timeout_s` + twice
`statement_timeout_ms` + 1 s); past it the answer is 503. A write whose deadline passes
before its batch sends step 2 is left out of the batch and nothing of it is written; one
whose deadline passes during step 2 may or may not be stored, as after a break there.

Failures. A score write whose function raises is answered with its error and writes
nothing; the rest of its batch goes on. A connection that breaks in step 1 has committed
nothing, so the transaction (a batch, or a write alone) is retried once on a fresh
connection. A batch the server refuses on a live connection (a lock or statement
time-out, a deadlock broken, a constraint) has rolled back, so each of its writes is made
again alone: one user's fault fails that user's write only. Otherwise a database failure,
a pool that cannot hand out a connection within `pool_timeout_s`, or (for a write alone)
a statement or lock wait past `statement_timeout_ms` answers 503 (StoreUnavailable /
StoreBusy) to every write of the transaction, acknowledging none (a break during step 2
may or may not have committed: a retried reward with its event_id is then acknowledged
without being learned twice; a retried /score is a new decision). The pool replaces
broken connections by itself, so the service recovers when the database returns.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from oo_serving.check import CheckReport
from oo_serving.core.features import Vector
from oo_serving.errors import StoreBusy, StoreUnavailable, Unavailable
from oo_serving.redact import redact_url
from oo_serving.store import consistency, migrations
from oo_serving.store.base import (
    EXPORT_PAGE_ROWS,
    EXPORTS_AT_ONCE,
    FOLDED_SHARD,
    LOG_PAGE_ROWS,
    POOLED_FOLD_AFTER_MS,
    POOLED_MAX_SHARDS,
    REPORTS_KEPT,
    DecisionLookup,
    DecisionRecord,
    LoggedReward,
    ReplayNeeded,
    RewardFn,
    RewardWrite,
    ScoreFn,
    ScoreWrite,
    Slots,
    UserExport,
    UserRecord,
    add_stats,
    encode_array,
    mark_params,
    pooled_stats,
    ref_from_row,
    refuse_newer,
    replay_from_rows,
    require_current,
    sum_pooled,
    user_from_row,
    user_params,
)
from oo_serving.store.sql import POSTGRES, Rows, SQLStore, statements

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
Row = tuple[Any, ...]

_SQL = statements(POSTGRES)
_decision_params = _SQL.decision_params


def _one_row(statement: str) -> str:
    """A statement that must change exactly one row, divided by the rows it changed: if it
    changes none, that fails the transaction inside the pipeline, before COMMIT can run."""
    return f"WITH changed AS ({statement} RETURNING 1) SELECT 1 / count(*) FROM changed"


_ENSURE_USER = "INSERT INTO user_model (user_id) VALUES (%s) ON CONFLICT (user_id) DO NOTHING"
_LOCK_USER = f"{_SQL.select_user} FOR UPDATE"
# A batch's rows, made in one statement (in user_id order: see _LOCK_USERS) and locked in
# another. RETURNING names the rows this transaction made.
_ENSURE_USERS = """
INSERT INTO user_model (user_id) SELECT u FROM unnest(%s::text[]) AS u ORDER BY u
ON CONFLICT (user_id) DO NOTHING RETURNING user_id
"""
# Why batches cannot deadlock, with each other or with single writes:
# - A batch never waits for a row lock: SKIP LOCKED leaves out a row another transaction
#   holds (another replica's batch, a reward, an erasure, any client), and that user's
#   write is then made alone, on the single path, which waits for the lock as before.
# - The only waits of a batch's first round trip are its INSERT's, for another
#   transaction's uncommitted insertion or deletion of the same user_id. Every batch
#   inserts in user_id order, so of two batches each waiting for the other, each would
#   have had to insert the other's key first: impossible. A single write (and an
#   erasure) holds at most its one user's row and waits only on that user, so it closes
#   no cycle either: a batch that waits for it holds nothing it needs.
# - In the second round trip a batch writes only its locked users' rows and decisions,
#   which no other transaction of the service writes while it holds them.
#   (prune_decisions deletes old decisions of any user, as it does beside single writes;
#   PostgreSQL breaks such a rare deadlock by failing one side, and a batch that fails
#   so is retried write by write: see _Batch.failed.)
_LOCK_USERS = f"{_SQL.select_users(1)} ORDER BY user_id FOR UPDATE SKIP LOCKED"
# Rows a batch made for writes it did not make (their function failed, or their deadline
# passed): gone again, as they would be had the write run alone and rolled back.
_DROP_MADE = "DELETE FROM user_model WHERE user_id = ANY(%s) AND state IS NULL"
# PostgreSQL's own: a user's row is made (empty) and locked before its function runs, so
# the model is written by an UPDATE of the locked row (parameters: _update_params).
_UPDATE_USER = _one_row(
    "UPDATE user_model SET policy = %s, state = %s, state_version = %s, pulls = %s,"
    " reward_count = %s, cumulative_reward = %s, last_updated_ms = %s, shadows = %s"
    " WHERE user_id = %s"
)
_MARK_REWARDED = _one_row(_SQL.mark)
_INSERT_REPORT = f"{_SQL.insert_report} RETURNING id"
# A pooled row is made (empty: count 0, stats zero) before it is locked, as a user's is.
_ENSURE_POOLED = """
INSERT INTO pooled (policy, shard, count, stats, updated_ms) VALUES (%s, %s, 0, %s, %s)
ON CONFLICT (policy, shard) DO NOTHING
"""
_LOCK_POOLED = f"{_SQL.pooled_row} FOR UPDATE"
# Rows being written by their own process are skipped, not waited for: they are alive,
# and two processes folding at once then never wait for each other's own row.
_LOCK_STALE_POOLED = f"{_SQL.stale_pooled} FOR UPDATE SKIP LOCKED"
_UPDATE_POOLED = _one_row(
    "UPDATE pooled SET count = %s, stats = %s, updated_ms = %s WHERE policy = %s AND shard = %s"
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


class PostgresStore(SQLStore):
    """The Store protocol on PostgreSQL, through a pool of async psycopg connections."""

    backend = "postgres"
    sql = _SQL

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
        self._queue: deque[_ScoreJob] = deque()
        self._batches = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
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
        # Batches in flight finish (each within the deadline) before their pool goes.
        while self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
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
        async def alone() -> ScoreWrite:
            return await self._run_tx(lambda conn: _score_alone(conn, user_id, fn))

        async def batched_or_alone() -> ScoreWrite:
            write = await self._batched(user_id, fn)
            return write if write is not None else await alone()

        return await self._in_turn(user_id, batched_or_alone)

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        find_ref = _SQL.find_ref(user_id, lookup)

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
                models = await conn.execute(_SQL.delete_model, (user_id,))
                decisions = await conn.execute(_SQL.delete_decisions, (user_id,))
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

    # ── reads (SQLStore's, and the snapshots of export_user and decision_log) ──
    async def _query(self, statement: str, params: Sequence[Any], decode: Callable[[Rows], T]) -> T:
        """A read of one autocommit statement on a pooled connection."""

        async def query(conn: Conn) -> T:
            cur = await conn.execute(statement, params)
            return decode(await cur.fetchall())

        return await self._run(query)

    async def _change(self, statement: str, params: Sequence[Any]) -> int:
        """A write of one autocommit statement on a pooled connection."""

        async def write(conn: Conn) -> int:
            return (await conn.execute(statement, params)).rowcount

        return await self._run(write)

    async def _snapshot(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[Rows]:
        async def query(conn: Conn) -> list[Rows]:
            rows: list[Rows] = []
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                for statement, params in queries:
                    rows.append(await (await conn.execute(statement, params)).fetchall())
            return rows

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
                    cur = await conn.execute(_SQL.select_user, (user_id,))
                    user = user_from_row(user_id, await cur.fetchone())
                    await rows.execute(_SQL.export, (user_id,))

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while True:
                        async with self._bounded():
                            batch = await rows.fetchmany(EXPORT_PAGE_ROWS)
                        if not batch:
                            return
                        yield self._decisions(batch)

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
                statement = _SQL.log
                params: list[Any] = [since_ms, until_ms]
                if user_ids is not None:
                    statement = _SQL.log_of_users
                    params = [*params, sorted(set(user_ids))]
                async with self._bounded():
                    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    await rows.execute(statement, params)

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while True:
                        async with self._bounded():
                            batch = await rows.fetchmany(LOG_PAGE_ROWS)
                        if not batch:
                            return
                        yield self._decisions(batch)

                yield pages()
            finally:
                with suppress(Exception):  # the pool discards a connection left in error
                    await rows.close()
                    if not conn.broken:
                        await conn.execute("ROLLBACK")
                await conn_cm.__aexit__(None, None, None)

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        # orjson, as on SQLite: the same text on both backends, and NaN refused as null.
        text = orjson.dumps(body).decode()

        async def write(conn: Conn) -> int:
            async with conn.transaction():
                cur = await conn.execute(_INSERT_REPORT, (kind, created_ms, text))
                row = await cur.fetchone()
                await conn.execute(_SQL.trim_reports, (kind, kind, REPORTS_KEPT))
            if row is None:
                raise StoreUnavailable("could not save the report: no row was inserted")
            return int(row[0])

        return await self._run(write)

    # ── plumbing ─────────────────────────────────────────────────────────────
    async def _user_write(self, user_id: str, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a write of user_id's alone: its turn in this process, then the transaction,
        all within one deadline."""
        return await self._in_turn(user_id, lambda: self._run_tx(body))

    async def _in_turn(self, user_id: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run work (one write of user_id's) in the user's turn in this process, the wait
        for the turn and the work within one deadline."""
        try:
            async with asyncio.timeout(self._deadline_s), self._user_turn(user_id):
                return await work()
        except TimeoutError as exc:
            raise StoreBusy(
                f"this user's write did not finish within {self._deadline_s:g}s: earlier"
                " writes of the same user, or the database, held it up"
            ) from exc

    async def _batched(self, user_id: str, fn: ScoreFn) -> ScoreWrite | None:
        """Queue a score write for the next batch and wait for its answer: the write, once
        committed; None if the batch could not take it and it must be written alone.

        A batch starts at once if fewer than _BATCHES_AT_ONCE are in flight; otherwise the
        write waits in the queue, and the next batch to finish takes it with everything
        else queued meanwhile. Cancelled while it waits (its deadline passed), the write is
        left out of any batch that has not yet sent its COMMIT.
        """
        job = _ScoreJob(user_id, fn, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if self._batches < _BATCHES_AT_ONCE:
            self._batches += 1
            task = asyncio.create_task(self._drain(), name="oo-serving score batch")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
        return await job.answer

    async def _drain(self) -> None:
        """Write queued score writes, a batch at a time, until the queue is empty."""
        try:
            while self._queue:
                jobs: list[_ScoreJob] = []
                while self._queue and len(jobs) < _BATCH_MAX:
                    job = self._queue.popleft()
                    if not job.answer.done():  # not withdrawn while it waited
                        jobs.append(job)
                if jobs:
                    await self._write_batch(_Batch(jobs))
        finally:
            self._batches -= 1

    async def _write_batch(self, batch: _Batch) -> None:
        """One transaction for the batch, and every job of it answered."""
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._run_tx(batch.run)
        except TimeoutError:
            batch.failed(
                StoreUnavailable(f"the database did not answer within {self._deadline_s:g}s")
            )
        except Exception as exc:
            batch.failed(exc)
        else:
            batch.committed()

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

        await consistency.scan(report, self._fetch, POSTGRES, summed_rewards=summed_rewards)
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
    cur = await conn.execute(_SQL.replay, (user_id,))
    return replay_from_rows(await cur.fetchall(), json_as_text=False)


async def _score_alone(conn: Conn, user_id: str, fn: ScoreFn) -> ScoreWrite:
    """A score write in a transaction of its own: the path of a write a batch left out."""
    user_row, _ = await _begin_and_lock(conn, user_id)
    user = user_from_row(user_id, user_row)
    try:
        write = fn(user, None)
    except ReplayNeeded:
        write = fn(user, await _load_replay(conn, user_id))
    async with conn.pipeline():
        await conn.execute(_UPDATE_USER, _update_params(write.user))
        await conn.execute(_SQL.insert_decision, _decision_params(write.decision))
        await conn.execute(_SQL.prune_user, (user_id, write.keep_from_seq))
        await conn.execute("COMMIT")
    return write


# Score writes one batch takes at most; more wait for the next batch.
_BATCH_MAX = 64
# Batches in flight at once per process: while one waits for its COMMIT, the next runs
# its functions. Each holds one pooled connection.
_BATCHES_AT_ONCE = 2


@dataclass(eq=False, slots=True)
class _ScoreJob:
    """One score_tx waiting for a batch: answered with its write once committed, None if
    it must be written alone, or the error its function or the batch raised."""

    user_id: str
    fn: ScoreFn
    answer: asyncio.Future[ScoreWrite | None]


class _Batch:
    """One transaction for the score writes of several users, and how each is answered.

    1. BEGIN; make sure every user's row exists; lock the rows       -- one round trip
       ... each job's function runs here (a ReplayNeeded: one more round trip) ...
    2. UPDATE the rows; INSERT the decisions; prune; COMMIT          -- one round trip
    """

    def __init__(self, jobs: list[_ScoreJob]) -> None:
        self.jobs = jobs
        self.written: list[tuple[_ScoreJob, ScoreWrite]] = []
        self.errors: dict[_ScoreJob, Exception] = {}
        # The server refused the transaction on a live connection: it rolled back, so
        # nothing of it was committed, and each write may be made again alone.
        self.rolled_back = False

    async def run(self, conn: Conn) -> None:
        """The transaction; the connection's retry (_run_tx) may run it twice."""
        self.written, self.errors, self.rolled_back = [], {}, False
        try:
            rows, made = await _begin_and_lock_users(conn, [j.user_id for j in self.jobs])
            for job in self.jobs:
                row = rows.get(job.user_id)
                if row is not None:  # else locked elsewhere, or just erased: written alone
                    await self._call(conn, job, row)
            # A job whose deadline passed while its function ran is left out (and answered
            # by its own time-out): past this point its write would be committed.
            self.written = [(job, w) for job, w in self.written if not job.answer.done()]
            kept = {job.user_id for job, _ in self.written}
            unused = sorted(made - kept)
            if not self.written:
                await conn.execute("ROLLBACK")  # not even the rows made above
                return
            async with conn.cursor() as cur, conn.pipeline():
                await cur.executemany(
                    _UPDATE_USER, [_update_params(w.user) for _, w in self.written]
                )
                await cur.executemany(
                    _SQL.insert_decision, [_decision_params(w.decision) for _, w in self.written]
                )
                await cur.executemany(
                    _SQL.prune_user, [(job.user_id, w.keep_from_seq) for job, w in self.written]
                )
                if unused:
                    await cur.execute(_DROP_MADE, (unused,))
                await cur.execute("COMMIT")
        except psycopg.Error:
            self.rolled_back = not conn.broken
            raise

    async def _call(self, conn: Conn, job: _ScoreJob, row: Row) -> None:
        """Run a job's function on its locked row; keep its write, or its error."""
        user = user_from_row(job.user_id, row)
        try:
            self.written.append((job, job.fn(user, None)))
            return
        except ReplayNeeded:
            pass
        except Exception as exc:
            self.errors[job] = exc
            return
        replay = await _load_replay(conn, job.user_id)  # a database error fails the batch
        try:
            self.written.append((job, job.fn(user, replay)))
        except Exception as exc:
            self.errors[job] = exc

    def committed(self) -> None:
        """The transaction committed (or wrote nothing): answer every job."""
        for job, write in self.written:
            _answer(job, write)
        for job, exc in self.errors.items():
            _fail(job, exc)
        for job in self.jobs:
            _answer(job, None)  # the rest: rows this batch could not lock

    def failed(self, exc: Exception) -> None:
        """The transaction failed: answer every job, acknowledging none.

        A job whose own function failed gets its error. Had the server refused the
        transaction (a lock or statement time-out, a deadlock broken, a constraint), it
        rolled back: each other job is then written alone, so that one user's fault fails
        only that user's write. Otherwise (no connection, a connection broken twice before
        COMMIT or once after it, the batch past its deadline) whether it committed may be
        unknown, and a second attempt could write a job twice: each gets the error (503).
        """
        for job, error in self.errors.items():
            _fail(job, error)
        for job in self.jobs:
            if self.rolled_back:
                _answer(job, None)
            elif isinstance(exc, Unavailable):
                copy = type(exc)(exc.message)
                copy.__cause__ = exc
                _fail(job, copy)
            else:
                _fail(job, exc)


def _answer(job: _ScoreJob, write: ScoreWrite | None) -> None:
    if not job.answer.done():
        job.answer.set_result(write)


def _fail(job: _ScoreJob, exc: Exception) -> None:
    if not job.answer.done():
        job.answer.set_exception(exc)


async def _begin_and_lock_users(conn: Conn, user_ids: list[str]) -> tuple[dict[str, Row], set[str]]:
    """A batch's first round trip: BEGIN, make sure every user's row exists, lock every row
    no other transaction holds. The locked rows by user_id, and the user_ids whose row this
    transaction made.

    A connection that breaks here has committed nothing: the failure is marked safe to retry.
    """
    try:
        async with conn.pipeline() as p:
            await conn.execute("BEGIN")
            made_cur = await conn.execute(_ENSURE_USERS, (user_ids,))
            lock_cur = await conn.execute(_LOCK_USERS, (user_ids,))
            await p.sync()
        made = {r[0] for r in await made_cur.fetchall()}
        locked = {r[0]: r[1:] for r in await lock_cur.fetchall()}
    except psycopg.OperationalError as exc:
        if conn.broken:
            raise _RetrySafe(str(exc)) from exc
        raise
    return locked, made


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
                count_cur = await conn.execute(_SQL.count_pooled, (policy,))
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
        (_SQL.delete_shards(len(stale)), (policy, [r[0] for r in stale])),
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
