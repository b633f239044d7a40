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
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from oo_serving.errors import SchemaTooNew, StoreBusy, StoreUnavailable
from oo_serving.store import migrations
from oo_serving.store.base import (
    DECISION_COLUMNS,
    REF_COLUMNS,
    USER_COLUMNS,
    DecisionLookup,
    HistoryEntry,
    RewardFn,
    RewardWrite,
    ScoreFn,
    ScoreWrite,
    UserExport,
    UserRecord,
    decision_from_row,
    encode_array,
    ref_from_row,
    user_from_row,
    user_params,
)

T = TypeVar("T")

_UPSERT_USER = """
INSERT INTO user_model (user_id, policy, a_inv, b, pulls, reward_count,
                        cumulative_reward, last_updated_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET
    policy = excluded.policy, a_inv = excluded.a_inv, b = excluded.b,
    pulls = excluded.pulls, reward_count = excluded.reward_count,
    cumulative_reward = excluded.cumulative_reward,
    last_updated_ms = excluded.last_updated_ms
"""
_INSERT_DECISION = """
INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score, policy,
                      propensity, model_version, candidate_ids, candidate_x)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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

    # ── lifecycle ────────────────────────────────────────────────────────────
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._readers = ThreadPoolExecutor(self._read_threads, thread_name_prefix="oo-sqlite-read")
        await asyncio.get_running_loop().run_in_executor(self._readers, self.migrate)
        self._writer = _GroupCommitWriter(
            self._connection, self.path.with_name(self.path.name + ".writelock")
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

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    def migrate(self) -> list[int]:
        """Apply pending migrations now, on the calling thread; the versions applied.

        Safe to run from several processes at once: the check and the changes are one
        immediate transaction. Raises SchemaTooNew for a schema newer than this release.
        """
        with _mapped_errors():
            return self._migrate(self._connection())

    # ── transactions ─────────────────────────────────────────────────────────
    async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
        return await self._write(functools.partial(self._score, user_id, fn))

    async def reward_tx(self, user_id: str, lookup: DecisionLookup, fn: RewardFn) -> RewardWrite:
        return await self._write(functools.partial(self._reward, user_id, lookup, fn))

    async def delete_user(self, user_id: str) -> bool:
        return await self._write(functools.partial(self._delete_user, user_id))

    # ── reads ────────────────────────────────────────────────────────────────
    async def get_user(self, user_id: str) -> UserRecord | None:
        return await self._read(functools.partial(_load_user, user_id=user_id))

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

    async def export_user(self, user_id: str) -> UserExport:
        def query(conn: sqlite3.Connection) -> UserExport:
            with _transaction(conn, "DEFERRED"):  # both reads see one snapshot
                user = _load_user(conn, user_id)
                rows = conn.execute(
                    f"SELECT {DECISION_COLUMNS} FROM decision WHERE user_id = ? ORDER BY seq",
                    (user_id,),
                ).fetchall()
            decisions = [
                decision_from_row(r, orjson.loads(r[5]), orjson.loads(r[11])) for r in rows
            ]
            return UserExport(user, decisions)

        return await self._read(query)

    # ── the write bodies, run on the writer thread inside BEGIN IMMEDIATE ────
    def _score(self, user_id: str, fn: ScoreFn, conn: sqlite3.Connection) -> ScoreWrite:
        write = fn(_load_user(conn, user_id))
        _put_user(conn, write.user)
        d = write.decision
        conn.execute(
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
            ),
        )
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
        write = fn(_load_user(conn, user_id), ref_from_row(row))
        if write.user is not None:
            _put_user(conn, write.user)
        if write.reward_event is not None:
            conn.execute(
                "UPDATE decision SET reward = ?, rewarded_ms = ?"
                " WHERE user_id = ? AND event_id = ? AND reward IS NULL",
                (write.reward, write.ts_ms, user_id, write.reward_event),
            )
        return write

    def _delete_user(self, user_id: str, conn: sqlite3.Connection) -> bool:
        models = conn.execute("DELETE FROM user_model WHERE user_id = ?", (user_id,)).rowcount
        decisions = conn.execute("DELETE FROM decision WHERE user_id = ?", (user_id,)).rowcount
        return bool(models or decisions)

    def _migrate(self, conn: sqlite3.Connection) -> list[int]:
        known = migrations.load("sqlite")
        latest = known[-1].version if known else 0
        conn.execute("PRAGMA journal_mode = WAL")
        applied: list[int] = []
        with _transaction(conn):
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > latest:
                raise SchemaTooNew(
                    f"the database {self.path} has schema version {current}, newer than"
                    f" {latest}, the newest this release knows; upgrade oo-serving"
                )
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
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # each is used by one thread; closed after it ends
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
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


@dataclass(frozen=True, slots=True)
class _Job:
    body: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


class _GroupCommitWriter:
    """The one writer of a process: a thread that commits queued writes in batches.

    Every write waiting when the thread is free goes into one transaction (at most
    MAX_BATCH), each inside its own savepoint, so that a write that raises is undone alone
    and the others commit. One COMMIT, so one fsync, serves the whole batch, and each
    caller is answered only after it. Between processes, an exclusive `flock` on a lock
    file beside the database queues the writers in the kernel, which wakes the next one
    at once; SQLite's own busy handler would poll with sleeps of up to 100 ms.
    """

    MAX_BATCH = 128

    def __init__(self, connect: Callable[[], sqlite3.Connection], lock_path: Path) -> None:
        self._connect = connect
        self._lock_path = lock_path
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="oo-sqlite-write", daemon=True)
        self._thread.start()

    async def submit(self, body: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Job(body, future))
        return await future

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        conn = self._connect()
        lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
                self._commit(conn, lock_fd, batch)
        finally:
            os.close(lock_fd)

    def _commit(self, conn: sqlite3.Connection, lock_fd: int, batch: list[_Job]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with _mapped_errors():
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    with _transaction(conn):
                        for job in batch:
                            outcomes.append(_in_savepoint(conn, job.body))
                finally:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch is stored
            outcomes = [(False, exc)] * len(batch)
        # One wake-up per event loop for the whole batch, not one per write.
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
        if future.cancelled():
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
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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


def _put_user(conn: sqlite3.Connection, u: UserRecord) -> None:
    conn.execute(_UPSERT_USER, user_params(u))
