"""The embedded default: one SQLite file in WAL mode, shared by every worker process.

Concurrency. Within a process one thread does every write, in batches: the writes queued
while it was busy go into one transaction, each in its own savepoint, so one COMMIT (one
fsync) serves them all and a write that fails is undone alone. Writes never block the
event loop. Across processes an exclusive `flock` on `<database>.writelock` queues the
writer threads in the kernel, and each transaction starts with `BEGIN IMMEDIATE`, which
takes SQLite's write lock before reading, so two workers can never interleave a
read-modify-write of the same user. Reads run on a small thread pool, each thread with
its own connection; WAL gives every read a consistent snapshot.

Durability. A write is acknowledged only after the COMMIT of its batch returns. With
synchronous=FULL (the default) the WAL is fsynced at every commit, so an acknowledged
write survives `kill -9` and power loss; with NORMAL it survives a process crash but the
last commits may be lost on power loss.

Deadlines. A write waits at most `busy_timeout_ms` in all: in this process's queue, for
the `flock` (another worker, a `prune`, a stopped process may hold it) and for SQLite's
own lock. A write still queued at its deadline is withdrawn and answered 503 (StoreBusy)
with nothing written: the writer thread claims a write before running it, and a claimed
write is never withdrawn, so a 503 always means "not written". A failed BEGIN, statement
or COMMIT rolls the transaction back, so a fault (a full disk, an I/O error) never leaves
the write lock held; only a connection that cannot even roll back is replaced.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from oo_serving.check import CheckReport
from oo_serving.core.features import Vector
from oo_serving.core.policy import Pooled
from oo_serving.errors import StoreBusy, StoreUnavailable
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
    STATS_SQL_SQLITE,
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

_UPSERT_USER = """
INSERT INTO user_model (user_id, policy, state, state_version, pulls, reward_count,
                        cumulative_reward, last_updated_ms, shadows)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET
    policy = excluded.policy, state = excluded.state,
    state_version = excluded.state_version, pulls = excluded.pulls,
    reward_count = excluded.reward_count, cumulative_reward = excluded.cumulative_reward,
    last_updated_ms = excluded.last_updated_ms, shadows = excluded.shadows
"""
_INSERT_DECISION = """
INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score, policy,
                      propensity, model_version, candidate_ids, candidate_x,
                      candidate_features, context, candidate_p, greedy, shadow)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SET_SWEEP_MARK = """
INSERT INTO sweep_mark (name, until_ms) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)
"""
_UPSERT_POOLED = """
INSERT INTO pooled (policy, shard, count, stats, updated_ms) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (policy, shard) DO UPDATE SET
    count = excluded.count, stats = excluded.stats, updated_ms = excluded.updated_ms
"""

SYNCHRONOUS_MODES = ("full", "normal", "extra")


def sqlite_path(url: str) -> Path:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` to a Path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"a SQLite URL looks like sqlite:///path/to/file.db, got {url!r}")
    path = url[len(prefix) :]
    if path == ":memory:":
        raise ValueError("an in-memory SQLite database cannot be shared by workers")
    return Path(path)


class SQLiteStore:
    """The Store protocol on one SQLite file."""

    backend = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        synchronous: str = "full",
        read_threads: int = 4,
    ) -> None:
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._synchronous = synchronous
        self._read_threads = read_threads
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer: _GroupCommitWriter | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._exports = Slots(EXPORTS_AT_ONCE, busy_timeout_ms / 1000, "exports")

    # ── lifecycle ────────────────────────────────────────────────────────────
    async def open(self, migrate: bool = True) -> None:
        if migrate:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reason = exc.strerror or exc
                raise StoreUnavailable(
                    f"cannot create the folder of {self.path}: {reason}"
                ) from exc
        self._readers = ThreadPoolExecutor(self._read_threads, thread_name_prefix="oo-sqlite-read")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._readers, self.migrate if migrate else self._require_current
        )
        # A reader's connection, open from now until close(), holds the WAL's shared
        # lock: however idle, an open store shows that the database is in use, which
        # `oo-serving restore` checks before it replaces the file.
        await self._read(self._schema_version)
        self._writer = _GroupCommitWriter(
            self._new_connection, self.lock_path, self._busy_timeout_ms / 1000
        )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        self._writer = None
        self._readers = None
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    @property
    def lock_path(self) -> Path:
        """The file whose `flock` queues the writers of every process."""
        return self.path.with_name(self.path.name + ".writelock")

    async def ping(self) -> None:
        """Reads answer, and a write could start now: the writer thread is alive and takes
        the write lock (flock and BEGIN IMMEDIATE) within the deadline."""
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())
        await self._write(lambda conn: None)

    def migrate(self) -> list[int]:
        """Apply pending migrations now, on the calling thread; the versions applied.

        Safe to run from several processes at once: the check and the changes are one
        immediate transaction. Raises SchemaTooNew for a schema newer than this release.
        """
        with _mapped_errors():
            conn = self._new_connection(create=True)
            try:
                return self._migrate(conn)
            finally:
                conn.close()

    def _require_current(self) -> None:
        """Raise SchemaError unless the schema is this release's; read only."""
        known = migrations.load("sqlite")
        with _mapped_errors():
            conn = self._new_connection()
            try:
                version = self._schema_version(conn)
            finally:
                conn.close()
        require_current(version, known[-1].version if known else 0, f"the database {self.path}")

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # ── transactions ─────────────────────────────────────────────────────────
    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        return await self._write(functools.partial(self._score, user_id, fn))

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        return await self._write(functools.partial(self._reward, user_id, lookup, fn))

    async def delete_user(self, user_id: str) -> bool:
        return await self._write(functools.partial(self._delete_user, user_id))

    async def add_pooled(
        self, policy: str, shard: str, count: int, stats: Vector, ts_ms: int
    ) -> None:
        flat = pooled_stats(stats)
        await self._write(functools.partial(_add_pooled, policy, shard, count, flat, ts_ms))

    # ── reads ────────────────────────────────────────────────────────────────
    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._read(functools.partial(_load_user, user_id=user_id))

    async def pooled(self, policy: str) -> Pooled | None:
        def query(conn: sqlite3.Connection) -> Pooled | None:
            rows = conn.execute(
                "SELECT count, stats FROM pooled WHERE policy = ? ORDER BY shard", (policy,)
            ).fetchall()
            return sum_pooled(rows, f"a pooled row of {policy}")

        return await self._read(query)

    async def history(self, user_id: str, limit: int) -> list[HistoryEntry]:
        def query(conn: sqlite3.Connection) -> list[HistoryEntry]:
            rows = conn.execute(
                "SELECT ts_ms, features, score, tip_id, event_id FROM decision"
                " WHERE user_id = ? ORDER BY seq DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
            return [
                HistoryEntry(
                    ts_ms=r[0], features=orjson.loads(r[1]), score=r[2], tip_id=r[3], event_id=r[4]
                )
                for r in reversed(rows)
            ]

        return await self._read(query)

    async def prune_decisions(self, older_than_ms: int, batch_size: int) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM decision WHERE rowid IN"
                " (SELECT rowid FROM decision WHERE ts_ms < ? LIMIT ?)",
                (older_than_ms, batch_size),
            ).rowcount

        return await self._write(delete)

    @asynccontextmanager
    async def export_user(self, user_id: str) -> AsyncIterator[UserExport]:
        # A connection of its own holds the snapshot; each page is read by a short task
        # on the reader threads, so an export being streamed occupies none of them.
        async with self._exports.slot():
            conn = await self._read(lambda _: self._new_connection())
            try:

                def begin(_: sqlite3.Connection) -> tuple[UserRecord | None, sqlite3.Cursor]:
                    conn.execute("BEGIN DEFERRED")
                    user = _load_user(conn, user_id)  # the first read fixes the snapshot
                    cursor = conn.execute(
                        f"SELECT {DECISION_COLUMNS} FROM decision WHERE user_id = ? ORDER BY seq",
                        (user_id,),
                    )
                    return user, cursor

                user, cursor = await self._read(begin)

                def page(_: sqlite3.Connection) -> list[DecisionRecord]:
                    rows = cursor.fetchmany(EXPORT_PAGE_ROWS)
                    return [decision_from_row(r, json_as_text=True) for r in rows]

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while batch := await self._read(page):
                        yield batch

                yield UserExport(user, pages())
            finally:
                await asyncio.get_running_loop().run_in_executor(None, conn.close)

    @asynccontextmanager
    async def decision_log(
        self, since_ms: int, until_ms: int, user_ids: Sequence[str] | None = None
    ) -> AsyncIterator[AsyncIterator[list[DecisionRecord]]]:
        async with self._exports.slot():
            conn = await self._read(lambda _: self._new_connection())
            try:
                users = sorted(set(user_ids)) if user_ids is not None else None
                where = "ts_ms >= ? AND ts_ms < ?"
                params: list[Any] = [since_ms, until_ms]
                if users is not None:
                    where += " AND user_id IN (SELECT user_id FROM temp.log_users)"

                def begin(_: sqlite3.Connection) -> sqlite3.Cursor:
                    if users is not None:  # a temporary table: any number of users
                        conn.execute("CREATE TEMP TABLE log_users (user_id TEXT PRIMARY KEY)")
                        conn.executemany("INSERT INTO log_users VALUES (?)", [(u,) for u in users])
                    conn.execute("BEGIN DEFERRED")
                    return conn.execute(
                        f"SELECT {DECISION_COLUMNS} FROM decision WHERE {where}"
                        " ORDER BY ts_ms, user_id, seq",
                        params,
                    )

                cursor = await self._read(begin)

                def page(_: sqlite3.Connection) -> list[DecisionRecord]:
                    rows = cursor.fetchmany(LOG_PAGE_ROWS)
                    return [decision_from_row(r, json_as_text=True) for r in rows]

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while batch := await self._read(page):
                        yield batch

                yield pages()
            finally:
                await asyncio.get_running_loop().run_in_executor(None, conn.close)

    async def unrewarded(
        self, since_ms: int, until_ms: int, after: Keyset, limit: int
    ) -> list[tuple[int, str, int, str]]:
        def query(conn: sqlite3.Connection) -> list[tuple[int, str, int, str]]:
            rows = conn.execute(UNREWARDED_SQL, (since_ms, until_ms, *after, limit)).fetchall()
            return [(r[0], r[1], r[2], r[3]) for r in rows]

        return await self._read(query)

    async def sweep_mark(self, name: str) -> int | None:
        def query(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(SWEEP_MARK_SQL, (name,)).fetchone()
            return None if row is None else int(row[0])

        return await self._read(query)

    async def set_sweep_mark(self, name: str, until_ms: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(_SET_SWEEP_MARK, (name, until_ms))

        await self._write(write)

    async def decision_stats(self, since_ms: int, until_ms: int, bucket_ms: int) -> DecisionStats:
        check_stats_range(since_ms, until_ms, bucket_ms)

        def query(conn: sqlite3.Connection) -> DecisionStats:
            # One snapshot for both statements, so that the users match the counts.
            with _transaction(conn, "DEFERRED"):
                rows = conn.execute(
                    STATS_SQL_SQLITE, (since_ms, bucket_ms, since_ms, until_ms)
                ).fetchall()
                users = conn.execute(STATS_USERS_SQL, (since_ms, until_ms)).fetchall()
            return DecisionStats(bucket_stats_from_rows(rows), {r[0]: int(r[1]) for r in users})

        return await self._read(query)

    async def recent_decisions(self, user_id: str, limit: int) -> list[DecisionRecord]:
        def query(conn: sqlite3.Connection) -> list[DecisionRecord]:
            rows = conn.execute(RECENT_SQL, (user_id, limit)).fetchall()
            return [decision_from_row(r, json_as_text=True) for r in rows]

        return await self._read(query)

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        text = orjson.dumps(body).decode()

        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO report (kind, created_ms, body) VALUES (?, ?, ?)",
                (kind, created_ms, text),
            )
            _expect_one(cursor.rowcount, "save the report")
            conn.execute(TRIM_REPORTS_SQL, (kind, kind, REPORTS_KEPT))
            return int(cursor.lastrowid or 0)

        return await self._write(write)

    async def latest_report(self, kind: str) -> SavedReport | None:
        def query(conn: sqlite3.Connection) -> SavedReport | None:
            row = conn.execute(LATEST_REPORT_SQL, (kind,)).fetchone()
            return report_from_row(row, json_as_text=True)

        return await self._read(query)

    # ── the write bodies, run on the writer thread inside BEGIN IMMEDIATE ────
    def _score(self, user_id: str, fn: ScoreFn, conn: sqlite3.Connection) -> ScoreWrite:
        user = _load_user(conn, user_id)
        try:
            write = fn(user, None)
        except ReplayNeeded:
            write = fn(user, _load_replay(conn, user_id))
        _put_user(conn, write.user)
        d = write.decision
        inserted = conn.execute(
            _INSERT_DECISION,
            (
                d.user_id,
                d.seq,
                d.event_id,
                d.ts_ms,
                d.tip_id,
                orjson.dumps(d.features).decode(),
                encode_array(d.x),
                d.score,
                d.policy,
                d.propensity,
                d.model_version,
                orjson.dumps(d.candidate_ids).decode(),
                encode_array(d.candidate_X),
                encode_optional(d.candidate_features),
                orjson.dumps(d.context).decode(),
                encode_optional(d.candidate_p),
                d.greedy,
                orjson.dumps(d.shadow).decode() if d.shadow else None,
            ),
        ).rowcount
        _expect_one(inserted, "log the decision")
        conn.execute(
            "DELETE FROM decision WHERE user_id = ? AND seq < ?", (user_id, write.keep_from_seq)
        )
        return write

    def _reward(
        self, user_id: str, lookup: DecisionLookup, fn: RewardFn, conn: sqlite3.Connection
    ) -> RewardWrite:
        if lookup.event_id is not None:
            row = conn.execute(
                f"SELECT {REF_COLUMNS} FROM decision WHERE user_id = ? AND event_id = ?",
                (user_id, lookup.event_id),
            ).fetchone()
        else:
            row = conn.execute(
                f"SELECT {REF_COLUMNS} FROM decision WHERE user_id = ? AND tip_id = ?"
                " ORDER BY seq DESC LIMIT 1",
                (user_id, lookup.tip_id),
            ).fetchone()
        user = _load_user(conn, user_id)
        ref = ref_from_row(row, json_as_text=True)
        try:
            write = fn(user, ref, None)
        except ReplayNeeded:
            write = fn(user, ref, _load_replay(conn, user_id))
        if write.user is not None:
            _put_user(conn, write.user)
        if write.mark is not None:
            marked = conn.execute(MARK_SQL, mark_params(user_id, write.mark)).rowcount
            _expect_one(marked, "mark the decision rewarded")
        return write

    def _delete_user(self, user_id: str, conn: sqlite3.Connection) -> bool:
        models = conn.execute("DELETE FROM user_model WHERE user_id = ?", (user_id,)).rowcount
        decisions = conn.execute("DELETE FROM decision WHERE user_id = ?", (user_id,)).rowcount
        return bool(models or decisions)

    def _migrate(self, conn: sqlite3.Connection) -> list[int]:
        known = migrations.load("sqlite")
        latest = known[-1].version if known else 0
        # A worker (re)started while the others write finds the schema current: it reads
        # and takes no lock, so it cannot time out behind their writes.
        if self._schema_version(conn) == latest and _journal_mode(conn) == "wal":
            return []
        with _flock(self.lock_path, self._busy_timeout_ms / 1000):
            if _journal_mode(conn) != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            applied: list[int] = []
            with _transaction(conn):
                current = self._schema_version(conn)
                refuse_newer(current, latest, f"the database {self.path}")
                for migration in known[current:]:
                    for statement in _statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {migration.version}")
                    applied.append(migration.version)
            return applied

    # ── plumbing ─────────────────────────────────────────────────────────────
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, made on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection()
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _new_connection(self, create: bool = False) -> sqlite3.Connection:
        """A connection of the caller's own (the writer keeps one, and replaces it only if
        it cannot roll back). Only `migrate` creates the file: a database deleted under a
        running server is an error, never silently replaced by an empty one."""
        mode = "rwc" if create else "rw"
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(str(self.path))}?mode={mode}",
            uri=True,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # each is used by one thread at a time
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        return await self._writer.submit(body)

    async def _read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, body)

    def _run_read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        with _mapped_errors():
            return body(self._connection())

    # ── consistency check (`oo-serving check`): reads only ───────────────────
    async def check(self, *, summed_rewards: bool = False) -> CheckReport:
        """Every row against the service's invariants, then `PRAGMA integrity_check`.

        Each page is one statement on a reader connection, so one WAL snapshot each and
        never the write lock. A file SQLite finds corrupt while reading is reported as a
        violation (sqlite_unreadable), not as a database that cannot be opened.
        summed_rewards: as Store.check.
        """
        report = CheckReport(backend=self.backend, database=str(self.path))

        async def fetch(statement: str, params: tuple[Any, ...]) -> list[Any]:
            return await self._read(lambda conn: conn.execute(statement, params).fetchall())

        try:
            # Up to 100 messages (SQLite's default), or the single row "ok".
            messages = [str(row[0]) for row in await fetch("PRAGMA integrity_check", ())]
            if messages == ["ok"]:
                report.integrity = "ok"
            else:
                report.add("sqlite_integrity", len(messages), messages)
            await consistency.scan(report, fetch, consistency.SQLITE, summed_rewards=summed_rewards)
        except StoreUnavailable as exc:
            if getattr(exc.__cause__, "sqlite_errorname", None) != "SQLITE_CORRUPT":
                raise
            report.add("sqlite_unreadable", 1, [str(exc.__cause__)], "the check stopped there")
        return report


_PENDING, _CLAIMED, _WITHDRAWN = 0, 1, 2


@dataclass(slots=True, eq=False)
class _Job:
    body: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    state: int = _PENDING  # changed only under the writer's claim lock


class _GroupCommitWriter:
    """The one writer of a process: a thread that commits queued writes in batches.

    Every write waiting when the thread is free goes into one transaction (at most
    MAX_BATCH), each inside its own savepoint, so that a write that raises is undone alone
    and the others commit. One COMMIT, so one fsync, serves the whole batch, and each
    caller is answered only after it. Between processes, an exclusive `flock` on a lock
    file beside the database queues the writers in the kernel, which wakes the next one
    at once; SQLite's own busy handler would poll with sleeps of up to 100 ms.

    The flock has no time-out of its own, so the deadline is kept on the other side: a
    timer withdraws a write that is still pending when its time is up, and the thread,
    once it holds the lock, claims only the writes not withdrawn. Claim and withdrawal
    are decided under one lock, so each write is either run or answered 503, never both.
    The thread survives any failure of a batch; should it end all the same, every later
    write is refused at once and `ping` (so /ready) fails.
    """

    MAX_BATCH = 128

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], lock_path: Path, timeout_s: float
    ) -> None:
        self._connect = connect
        self._lock_path = lock_path
        self._timeout_s = timeout_s
        self._claims = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="oo-sqlite-write", daemon=True)
        self._thread.start()

    async def submit(self, body: Callable[[sqlite3.Connection], T]) -> T:
        if not self._thread.is_alive():
            raise StoreUnavailable("the database writer has stopped; restart the server")
        loop = asyncio.get_running_loop()
        job = _Job(body, loop.create_future())
        self._queue.put(job)
        timer = loop.call_later(self._timeout_s, self._withdraw, job)
        try:
            return await job.future  # type: ignore[no-any-return]
        finally:
            timer.cancel()
            if job.future.cancelled():  # the caller gave up: do not run it later
                self._withdraw(job)

    def _withdraw(self, job: _Job) -> None:
        with self._claims:
            if job.state == _CLAIMED and self._thread.is_alive():
                return  # it runs, and its caller waits for the outcome
            dead = job.state == _CLAIMED  # claimed by a thread that has since died
            job.state = _WITHDRAWN
        if dead and not job.future.done():
            job.future.set_exception(StoreUnavailable("the database writer has stopped"))
        elif not job.future.done():
            job.future.set_exception(
                StoreBusy(
                    f"the database write lock could not be had within {self._timeout_s:g}s"
                    " (OO_SQLITE_BUSY_TIMEOUT_MS); nothing was written"
                )
            )

    def stop(self) -> None:
        """Commit what is queued, then end the thread (waiting at most a deadline more:
        a lock held elsewhere must not hold up the shutdown)."""
        self._queue.put(None)
        self._thread.join(self._timeout_s + 1.0)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        lock_fd: int | None = None
        try:
            stopping = False
            while not stopping:
                job = self._queue.get()
                if job is None:
                    break
                batch = [job]
                while len(batch) < self.MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    batch.append(more)
                try:
                    if lock_fd is None:
                        lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                    if conn is None:
                        conn = self._connect()
                except Exception as exc:
                    _answer(batch, [(False, _as_store_error(exc))] * len(batch))
                    continue
                try:
                    ok = self._commit(conn, lock_fd, batch)
                except Exception as exc:  # unforeseen (the flock itself failed): keep going
                    with self._claims:
                        for job in batch:
                            if job.state == _PENDING:
                                job.state = _CLAIMED
                    claimed = [job for job in batch if job.state == _CLAIMED]
                    _answer(claimed, [(False, _as_store_error(exc))] * len(claimed))
                    ok = False
                if not ok and conn.in_transaction:
                    # Not even the rollback went through: start again on a fresh connection.
                    # Otherwise keep this one: closing the process's last connection would
                    # make the next open rewrite the shared-memory file, which a full disk
                    # may refuse, failing every reader too.
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                os.close(lock_fd)

    def _claim(self, batch: list[_Job]) -> list[_Job]:
        with self._claims:
            live = [job for job in batch if job.state == _PENDING]
            for job in live:
                job.state = _CLAIMED
        return live

    def _commit(self, conn: sqlite3.Connection, lock_fd: int, batch: list[_Job]) -> bool:
        """Run the batch's live writes in one transaction; False if the batch failed."""
        outcomes: list[tuple[bool, Any]] = []
        ok = True
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            batch = self._claim(batch)
            if not batch:
                return True
            try:
                with _mapped_errors(), _transaction(conn):
                    for job in batch:
                        outcomes.append(_in_savepoint(conn, job.body))
            except Exception as exc:  # BEGIN, a rollback or COMMIT failed: nothing is stored
                outcomes = [(False, _as_store_error(exc))] * len(batch)
                ok = False
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        _answer(batch, outcomes)
        return ok


def _as_store_error(exc: Exception) -> Exception:
    """A failure outside any write's own body, as the service error its callers get."""
    if isinstance(exc, (StoreBusy, StoreUnavailable)):
        return exc
    error = StoreUnavailable(f"the database failed: {exc}")
    error.__cause__ = exc
    return error


def _answer(batch: list[_Job], outcomes: list[tuple[bool, Any]]) -> None:
    """Settle each job's future on its own loop: one wake-up per loop for the batch."""
    by_loop: dict[
        asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], tuple[bool, Any]]]
    ] = {}
    for job, outcome in zip(batch, outcomes, strict=True):
        by_loop.setdefault(job.future.get_loop(), []).append((job.future, outcome))
    for loop, settled in by_loop.items():
        with suppress(RuntimeError):  # that loop has closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, settled)


def _in_savepoint(
    conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], Any]
) -> tuple[bool, Any]:
    """Run one write in a savepoint: (True, result), or (False, error) with it undone.

    If the undo itself fails the transaction is not usable: that raises, failing the batch.
    """
    conn.execute("SAVEPOINT job")
    try:
        with _mapped_errors():
            result = body(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return False, exc
    conn.execute("RELEASE job")
    return True, result


def _settle(settled: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for future, (ok, value) in settled:
        if future.done():  # cancelled by its caller
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


@contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """BEGIN IMMEDIATE (a write) or DEFERRED (a read: one snapshot) ... COMMIT.

    ROLLBACK if the body raises.
    """
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT (a full disk, an I/O error), which leaves the
        # transaction open and the write lock held.
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """sqlite3 errors become the service's: a lock wait timeout is StoreBusy."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreBusy("the database stayed locked past the busy timeout") from exc
        raise StoreUnavailable(f"the database failed: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"the database failed: {exc}") from exc


def _statements(script: str) -> list[str]:
    """Split a migration file into complete SQL statements."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return statements


def _load_user(conn: sqlite3.Connection, user_id: str) -> UserRecord | None:
    row = conn.execute(
        f"SELECT {USER_COLUMNS} FROM user_model WHERE user_id = ?", (user_id,)
    ).fetchone()
    return user_from_row(user_id, row)


def _load_replay(conn: sqlite3.Connection, user_id: str) -> list[LoggedReward]:
    rows = conn.execute(REPLAY_SQL, (user_id,)).fetchall()
    return replay_from_rows(rows, json_as_text=True)


def _add_pooled(
    policy: str, shard: str, count: int, stats: Vector, ts_ms: int, conn: sqlite3.Connection
) -> None:
    """Store.add_pooled's transaction, on the writer thread inside BEGIN IMMEDIATE (which
    already excludes every other writer, so a plain read-modify-write is safe)."""
    row = conn.execute(
        "SELECT count, stats FROM pooled WHERE policy = ? AND shard = ?", (policy, shard)
    ).fetchone()
    if row is not None:
        stats = add_stats(row[1], stats, f"the pooled row ({policy}, {shard})")
        count += row[0]
    conn.execute(_UPSERT_POOLED, (policy, shard, count, encode_array(stats), ts_ms))
    (shards,) = conn.execute("SELECT count(*) FROM pooled WHERE policy = ?", (policy,)).fetchone()
    if shards <= POOLED_MAX_SHARDS:
        return
    stale = conn.execute(
        "SELECT shard, count, stats FROM pooled WHERE policy = ? AND updated_ms < ?"
        " AND shard NOT IN (?, ?) ORDER BY shard",
        (policy, ts_ms - POOLED_FOLD_AFTER_MS, FOLDED_SHARD, shard),
    ).fetchall()
    if not stale:
        return
    folded = conn.execute(
        "SELECT count, stats FROM pooled WHERE policy = ? AND shard = ?", (policy, FOLDED_SHARD)
    ).fetchall()
    total = sum_pooled([*folded, *(r[1:] for r in stale)], f"a pooled row of {policy}")
    if total is not None:  # always: there is a stale row
        conn.execute(
            _UPSERT_POOLED, (policy, FOLDED_SHARD, total.count, encode_array(total.stats), ts_ms)
        )
        conn.executemany(
            "DELETE FROM pooled WHERE policy = ? AND shard = ?", [(policy, r[0]) for r in stale]
        )


def _put_user(conn: sqlite3.Connection, u: UserRecord) -> None:
    _expect_one(conn.execute(_UPSERT_USER, user_params(u)).rowcount, "write the user's model")


def _expect_one(changed: int, what: str) -> None:
    """Every write checks the rows it changed: anything but one undoes the write."""
    if changed != 1:
        raise StoreUnavailable(f"could not {what}: {changed} rows changed instead of 1")


def _journal_mode(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()


@contextmanager
def _flock(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold the writers' flock, waiting at most timeout_s (polled: only migrations, which
    are rare, take this path; the writer thread waits in the kernel)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusy(
                        f"the database write lock could not be had within {timeout_s:g}s"
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
