"""The embedded default: one SQLite file in WAL mode, shared by every worker process.

Concurrency. Within a process one thread does every write, in batches: the writes queued
while it was busy go into one transaction, so one COMMIT (one fsync) serves them all, and
a write that fails is undone alone. /score writes queued next to each other run together
in a few statements for the lot (one SELECT of their users, then one `executemany` each
for the models, the decisions and the pruning) instead of six each; every other write
runs alone in its own savepoint. Writes never block the event loop. Across processes an
exclusive `flock` on `<database>.writelock` queues the writer threads in the kernel, and
each transaction starts with `BEGIN IMMEDIATE`, which takes SQLite's write lock before
reading, so two workers can never interleave a read-modify-write of the same user. Reads
run on a small thread pool, each thread with its own connection; WAL gives every read a
consistent snapshot.

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
import itertools
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
from oo_serving.errors import StoreBusy, StoreUnavailable
from oo_serving.store import consistency, migrations
from oo_serving.store.base import (
    EXPORT_PAGE_ROWS,
    EXPORTS_AT_ONCE,
    FOLDED_SHARD,
    LOG_PAGE_ROWS,
    POOLED_FOLD_AFTER_MS,
    POOLED_MAX_SHARDS,
    REPORTS_KEPT,
    USER_COLUMNS,
    DecisionLookup,
    DecisionRecord,
    LoggedReward,
    Replay,
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
from oo_serving.store.sql import SQLITE, Rows, SQLStore, statements

T = TypeVar("T")

_SQL = statements(SQLITE)
_decision_params = _SQL.decision_params
# SQLite's own: no row is made before its transaction (BEGIN IMMEDIATE already excludes
# every other writer), so a user's model and a pooled row are written by an upsert.
_UPSERT_USER = f"""
INSERT INTO user_model (user_id, {USER_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET
    policy = excluded.policy, state = excluded.state,
    state_version = excluded.state_version, pulls = excluded.pulls,
    reward_count = excluded.reward_count, cumulative_reward = excluded.cumulative_reward,
    last_updated_ms = excluded.last_updated_ms, shadows = excluded.shadows
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


class SQLiteStore(SQLStore):
    """The Store protocol on one SQLite file."""

    backend = "sqlite"
    sql = _SQL

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
        # Data as well as a closure: the writer runs neighbouring /score writes together,
        # and falls back on the closure to run one alone.
        score = _Score(user_id, fn)
        return await self._write(functools.partial(_score, user_id, fn), score)

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        return await self._write(functools.partial(self._reward, user_id, lookup, fn))

    async def delete_user(self, user_id: str) -> bool:
        return await self._write(functools.partial(self._delete_user, user_id))

    async def add_pooled(
        self, policy: str, shard: str, count: int, stats: Vector, ts_ms: int
    ) -> None:
        flat = pooled_stats(stats)
        await self._write(functools.partial(_add_pooled, policy, shard, count, flat, ts_ms))

    # ── reads (SQLStore's, and the snapshots of export_user and decision_log) ──
    async def _query(self, statement: str, params: Sequence[Any], decode: Callable[[Rows], T]) -> T:
        """A read on a reader thread, its rows decoded there too."""
        return await self._read(lambda conn: decode(conn.execute(statement, params).fetchall()))

    async def _change(self, statement: str, params: Sequence[Any]) -> int:
        """A write of one statement, through the writer thread."""
        return await self._write(lambda conn: conn.execute(statement, params).rowcount)

    async def _snapshot(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[Rows]:
        def query(conn: sqlite3.Connection) -> list[Rows]:
            with _transaction(conn, "DEFERRED"):
                return [conn.execute(statement, params).fetchall() for statement, params in queries]

        return await self._read(query)

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
                    return user, conn.execute(_SQL.export, (user_id,))

                user, cursor = await self._read(begin)

                def page(_: sqlite3.Connection) -> list[DecisionRecord]:
                    return self._decisions(cursor.fetchmany(EXPORT_PAGE_ROWS))

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

                def begin(_: sqlite3.Connection) -> sqlite3.Cursor:
                    if users is not None:  # a temporary table: any number of users
                        conn.execute("CREATE TEMP TABLE log_users (user_id TEXT PRIMARY KEY)")
                        conn.executemany("INSERT INTO log_users VALUES (?)", [(u,) for u in users])
                    conn.execute("BEGIN DEFERRED")
                    statement = _SQL.log if users is None else _SQL.log_of_users
                    return conn.execute(statement, (since_ms, until_ms))

                cursor = await self._read(begin)

                def page(_: sqlite3.Connection) -> list[DecisionRecord]:
                    return self._decisions(cursor.fetchmany(LOG_PAGE_ROWS))

                async def pages() -> AsyncIterator[list[DecisionRecord]]:
                    while batch := await self._read(page):
                        yield batch

                yield pages()
            finally:
                await asyncio.get_running_loop().run_in_executor(None, conn.close)

    async def save_report(self, kind: str, created_ms: int, body: dict[str, Any]) -> int:
        text = orjson.dumps(body).decode()

        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(_SQL.insert_report, (kind, created_ms, text))
            _expect_one(cursor.rowcount, "save the report")
            conn.execute(_SQL.trim_reports, (kind, kind, REPORTS_KEPT))
            return int(cursor.lastrowid or 0)

        return await self._write(write)

    # ── the write bodies, run on the writer thread inside BEGIN IMMEDIATE ────
    def _reward(
        self, user_id: str, lookup: DecisionLookup, fn: RewardFn, conn: sqlite3.Connection
    ) -> RewardWrite:
        row = conn.execute(*_SQL.find_ref(user_id, lookup)).fetchone()
        user = _load_user(conn, user_id)
        ref = ref_from_row(row, json_as_text=True)
        try:
            write = fn(user, ref, None)
        except ReplayNeeded:
            write = fn(user, ref, _load_replay(conn, user_id))
        if write.user is not None:
            _put_user(conn, write.user)
        if write.mark is not None:
            marked = conn.execute(_SQL.mark, mark_params(user_id, write.mark)).rowcount
            _expect_one(marked, "mark the decision rewarded")
        return write

    def _delete_user(self, user_id: str, conn: sqlite3.Connection) -> bool:
        models = conn.execute(_SQL.delete_model, (user_id,)).rowcount
        decisions = conn.execute(_SQL.delete_decisions, (user_id,)).rowcount
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

    async def _write(
        self, body: Callable[[sqlite3.Connection], T], score: _Score | None = None
    ) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        return await self._writer.submit(body, score)

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

        try:
            # Up to 100 messages (SQLite's default), or the single row "ok".
            messages = [str(row[0]) for row in await self._fetch("PRAGMA integrity_check", ())]
            if messages == ["ok"]:
                report.integrity = "ok"
            else:
                report.add("sqlite_integrity", len(messages), messages)
            await consistency.scan(report, self._fetch, SQLITE, summed_rewards=summed_rewards)
        except StoreUnavailable as exc:
            if getattr(exc.__cause__, "sqlite_errorname", None) != "SQLITE_CORRUPT":
                raise
            report.add("sqlite_unreadable", 1, [str(exc.__cause__)], "the check stopped there")
        return report


_PENDING, _CLAIMED, _WITHDRAWN = 0, 1, 2


@dataclass(frozen=True, slots=True, eq=False)
class _Score:
    """A /score write as data (whose user, and the service's pure function), so that the
    writer can run it together with its neighbours (_ScoreBatch)."""

    user_id: str
    fn: ScoreFn


@dataclass(slots=True, eq=False)
class _Job:
    body: Callable[[sqlite3.Connection], Any]  # the write alone, run in its own savepoint
    future: asyncio.Future[Any]
    score: _Score | None = None  # a /score write, which may also run in a _ScoreBatch
    state: int = _PENDING  # changed only under the writer's claim lock


class _GroupCommitWriter:
    """The one writer of a process: a thread that commits queued writes in batches.

    Every write waiting when the thread is free goes into one transaction (at most
    MAX_BATCH), run in queue order, so each user's writes keep their order. Each run of
    consecutive /score writes is one _ScoreBatch in one savepoint; should one of its
    statements fail, the savepoint is rolled back and its writes run again one by one.
    Every other write runs inside its own savepoint. Either way a write that raises is
    undone alone and the others commit. One COMMIT, so one fsync, serves the whole
    batch, and each caller is answered only after it. Between processes, an exclusive
    `flock` on a lock file beside the database queues the writers in the kernel, which
    wakes the next one at once; SQLite's own busy handler would poll with sleeps of up
    to 100 ms.

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

    async def submit(
        self, body: Callable[[sqlite3.Connection], T], score: _Score | None = None
    ) -> T:
        """Run `body` in the next batch; `score`, if given, is the same /score write as
        data, and `body` must be its _score."""
        if not self._thread.is_alive():
            raise StoreUnavailable("the database writer has stopped; restart the server")
        loop = asyncio.get_running_loop()
        job = _Job(body, loop.create_future(), score)
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
                    outcomes = _run_batch(conn, batch)
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


def _run_batch(conn: sqlite3.Connection, batch: list[_Job]) -> list[tuple[bool, Any]]:
    """Each job's outcome, running the jobs in queue order: consecutive /score writes
    together (_score_run), every other write alone in its savepoint."""
    outcomes: list[tuple[bool, Any]] = []
    for scores, run in itertools.groupby(batch, lambda job: job.score is not None):
        jobs = list(run)
        if scores and len(jobs) > 1:
            outcomes.extend(_score_run(conn, jobs))
        else:
            outcomes.extend(_in_savepoint(conn, job.body) for job in jobs)
    return outcomes


def _score_run(conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
    """Consecutive /score writes as one _ScoreBatch in one savepoint. If a statement of it
    fails (a constraint, a full disk), the savepoint is rolled back and each write runs
    again alone, so only the write at fault fails. If the rollback itself fails the
    transaction is not usable: that raises, failing the batch."""
    conn.execute("SAVEPOINT scores")
    try:
        outcomes = _ScoreBatch(conn, [job.score for job in jobs if job.score]).run()
    except Exception:
        conn.execute("ROLLBACK TO scores")
        conn.execute("RELEASE scores")
        return [_in_savepoint(conn, job.body) for job in jobs]
    conn.execute("RELEASE scores")
    return outcomes


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
    return user_from_row(user_id, conn.execute(_SQL.select_user, (user_id,)).fetchone())


def _load_replay(conn: sqlite3.Connection, user_id: str) -> list[LoggedReward]:
    rows = conn.execute(_SQL.replay, (user_id,)).fetchall()
    return replay_from_rows(rows, json_as_text=True)


def _score(user_id: str, fn: ScoreFn, conn: sqlite3.Connection) -> ScoreWrite:
    """One /score write alone (Store.score_tx), on the writer thread inside BEGIN
    IMMEDIATE: the user's row, fn, then the row, the decision and the pruning."""
    user = _load_user(conn, user_id)
    try:
        write = fn(user, None)
    except ReplayNeeded:
        write = fn(user, _load_replay(conn, user_id))
    _put_user(conn, write.user)
    inserted = conn.execute(_SQL.insert_decision, _decision_params(write.decision)).rowcount
    _expect_one(inserted, "log the decision")
    conn.execute(_SQL.prune_user, (user_id, write.keep_from_seq))
    return write


class _ScoreBatch:
    """Consecutive /score writes run together, with the statements of one write alone
    (_score) but each run once for all of them: one SELECT of every user, then one
    `executemany` each for the models, the decisions and the pruning.

    The functions are called in queue order, each on its user as the writes before it
    in the batch left it (an overlay of the models they wrote), so a user who appears
    twice sees its own first write. A function that raises writes nothing and gets its
    error; the others go on. What the functions return is kept in Python and written by
    `_flush`, which must leave the database as the writes one by one would have:

    - each user's row is written once, with the last model of the batch (no statement
      reads the rows in between, and every decision row is written all the same);
    - each user's decisions are pruned once, below the highest pruning point; a decision
      that an earlier write's pruning would have spared (its seq below that point) first
      flushes what is pending, so that pruning runs before it is inserted;
    - a function that needs its user's replay first flushes what is pending, so the
      replay is read from the log as the writes before it left it.

    A statement that fails raises out of `run`; _score_run then undoes the whole batch.
    """

    def __init__(self, conn: sqlite3.Connection, scores: list[_Score]) -> None:
        self._conn = conn
        self._scores = scores
        self._users = _load_users(conn, list(dict.fromkeys(s.user_id for s in scores)))
        self._models: dict[str, tuple[Any, ...]] = {}  # pending, by user_id
        self._decisions: list[tuple[Any, ...]] = []  # pending, in order
        self._prune_below: dict[str, int] = {}  # pending, by user_id

    def run(self) -> list[tuple[bool, Any]]:
        """Each write's outcome: (True, its ScoreWrite) or (False, its function's error)."""
        outcomes: list[tuple[bool, Any]] = []
        for score in self._scores:
            decided = self._decide(score)
            if isinstance(decided, Exception):
                outcomes.append((False, decided))
                continue
            self._add(score, *decided)
            outcomes.append((True, decided[0]))
        self._flush()
        return outcomes

    def _decide(self, score: _Score) -> tuple[ScoreWrite, tuple[Any, ...]] | Exception:
        """The function's write and its decision's row, or the error it raised."""
        user = self._users.get(score.user_id)
        try:
            return _decided(score.fn, user, None)
        except ReplayNeeded:
            pass
        except Exception as exc:
            return exc
        self._flush()
        replay = _load_replay(self._conn, score.user_id)
        try:
            return _decided(score.fn, user, replay)
        except Exception as exc:
            return exc

    def _add(self, score: _Score, write: ScoreWrite, decision: tuple[Any, ...]) -> None:
        d = write.decision
        if d.seq < self._prune_below.get(d.user_id, d.seq):
            self._flush()
        self._users[write.user.user_id] = write.user
        self._models[write.user.user_id] = user_params(write.user)
        self._decisions.append(decision)
        below = self._prune_below.get(score.user_id, write.keep_from_seq)
        self._prune_below[score.user_id] = max(below, write.keep_from_seq)

    def _flush(self) -> None:
        """Write what is pending: the models, then the decisions, then the pruning."""
        conn = self._conn
        if self._models:
            changed = conn.executemany(_UPSERT_USER, self._models.values()).rowcount
            _expect(changed, len(self._models), "write the users' models")
        if self._decisions:
            inserted = conn.executemany(_SQL.insert_decision, self._decisions).rowcount
            _expect(inserted, len(self._decisions), "log the decisions")
        if self._prune_below:
            conn.executemany(_SQL.prune_user, self._prune_below.items())
        self._models.clear()
        self._decisions.clear()
        self._prune_below.clear()


def _decided(
    fn: ScoreFn, user: UserRecord | None, replay: Replay | None
) -> tuple[ScoreWrite, tuple[Any, ...]]:
    """fn's write, and its decision as the parameters of the INSERT of a decision."""
    write = fn(user, replay)
    return write, _decision_params(write.decision)


def _load_users(conn: sqlite3.Connection, user_ids: list[str]) -> dict[str, UserRecord | None]:
    """The model rows of user_ids (at most SQLite's 32766 parameters), by user_id."""
    rows = conn.execute(_SQL.select_users(len(user_ids)), user_ids).fetchall()
    return {row[0]: user_from_row(row[0], row[1:]) for row in rows}


def _add_pooled(
    policy: str, shard: str, count: int, stats: Vector, ts_ms: int, conn: sqlite3.Connection
) -> None:
    """Store.add_pooled's transaction, on the writer thread inside BEGIN IMMEDIATE (which
    already excludes every other writer, so a plain read-modify-write is safe)."""
    row = conn.execute(_SQL.pooled_row, (policy, shard)).fetchone()
    if row is not None:
        stats = add_stats(row[1], stats, f"the pooled row ({policy}, {shard})")
        count += row[0]
    conn.execute(_UPSERT_POOLED, (policy, shard, count, encode_array(stats), ts_ms))
    (shards,) = conn.execute(_SQL.count_pooled, (policy,)).fetchone()
    if shards <= POOLED_MAX_SHARDS:
        return
    stale = conn.execute(
        _SQL.stale_pooled, (policy, ts_ms - POOLED_FOLD_AFTER_MS, FOLDED_SHARD, shard)
    ).fetchall()
    if not stale:
        return
    folded = conn.execute(_SQL.pooled_row, (policy, FOLDED_SHARD)).fetchall()
    total = sum_pooled([*folded, *(r[1:] for r in stale)], f"a pooled row of {policy}")
    if total is not None:  # always: there is a stale row
        conn.execute(
            _UPSERT_POOLED, (policy, FOLDED_SHARD, total.count, encode_array(total.stats), ts_ms)
        )
        conn.execute(_SQL.delete_shards(len(stale)), (policy, *(r[0] for r in stale)))


def _put_user(conn: sqlite3.Connection, u: UserRecord) -> None:
    _expect_one(conn.execute(_UPSERT_USER, user_params(u)).rowcount, "write the user's model")


def _expect_one(changed: int, what: str) -> None:
    """Every write checks the rows it changed: anything but one undoes the write."""
    _expect(changed, 1, what)


def _expect(changed: int, expected: int, what: str) -> None:
    if changed != expected:
        raise StoreUnavailable(f"could not {what}: {changed} rows changed instead of {expected}")


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
