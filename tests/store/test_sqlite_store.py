"""What only the SQLite store does: its migrations on a file, the writers' flock, WAL,
bounded waits and a writer thread that survives, and the query plans of its indexes."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from tests.store.support import (
    assert_exports_beyond_the_slots_answer_busy,
    database_at_schema_2,
    event_ids_of,
    log_decision,
    make_write,
    prototype_models,
    run,
    sqlite_store_at,
)

from oo_serving.errors import SchemaTooNew, StoreBusy, StoreUnavailable
from oo_serving.settings import Settings
from oo_serving.store import migrations
from oo_serving.store.factory import open_store
from oo_serving.store.sqlite import SQLiteStore

# ── exports ──────────────────────────────────────────────────────────────────


def test_exports_beyond_the_slots_answer_busy_not_wait_forever(tmp_path: Path) -> None:
    store = open_store(
        Settings(database_url=f"sqlite:///{tmp_path}/e.db", sqlite_busy_timeout_ms=300)
    )
    run(store.open())
    assert_exports_beyond_the_slots_answer_busy(store)


# ── migrations (SQLite) ──────────────────────────────────────────────────────


def test_migrations_apply_once(tmp_path: Path) -> None:
    known = [m.version for m in migrations.load("sqlite")]
    assert known == list(range(1, len(known) + 1))
    assert known

    fresh = sqlite_store_at(tmp_path / "m.db")
    try:
        assert fresh.migrate() == known
        assert fresh.migrate() == []
    finally:
        run(fresh.close())


def test_opening_twice_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first = sqlite_store_at(path)
    run(first.open())
    try:
        log_decision(first, "u1", 1, "ev-1")
        assert first.migrate() == []
    finally:
        run(first.close())

    second = sqlite_store_at(path)
    run(second.open())
    try:
        assert second.migrate() == []
        assert event_ids_of(second, "u1") == ["ev-1"]
        assert run(second.get_user("u1")) is not None
    finally:
        run(second.close())

    with sqlite3.connect(path) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert version == len(migrations.load("sqlite"))
    assert mode == "wal"


def test_the_sqlite_migration_aborts_on_a_state_that_is_not_exact(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migration compares every converted state with its two old columns byte for
    byte, and any difference aborts it, leaving schema 2 as it was. SQLite copies exactly,
    so the copy is damaged on purpose here (one byte more) to show the guard acts."""
    url = database_at_schema_2("sqlite", tmp_path, request)
    known = migrations.load("sqlite")
    exact = "CAST(a_inv || b AS BLOB)"
    assert exact in known[2].sql
    damaged = dataclasses.replace(known[2], sql=known[2].sql.replace(exact, f"{exact} || x'00'"))
    monkeypatch.setattr(migrations, "load", lambda backend: [*known[:2], damaged])

    store = open_store(Settings(database_url=url))
    with pytest.raises(StoreUnavailable, match="CHECK constraint failed"):
        run(store.open())
    run(store.close())

    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        a_inv = conn.execute("SELECT a_inv FROM user_model WHERE user_id = 'diagonal'").fetchone()
    assert tables == {"user_model", "decision"}
    assert a_inv[0] == prototype_models()["diagonal"][0].tobytes()


def test_a_schema_newer_than_this_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    newer = len(migrations.load("sqlite")) + 1
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE from_the_future (x INTEGER)")
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.commit()
    conn.close()

    store = sqlite_store_at(path)
    try:
        with pytest.raises(SchemaTooNew, match=str(newer)):
            run(store.open())
    finally:
        run(store.close())

    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    assert version == newer
    assert tables == {"from_the_future"}


# ── faults: bounded waits, a writer that survives ────────────────────────────


def test_a_held_write_lock_answers_busy_within_the_deadline_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """Another process holds the writers' flock (a stopped worker, a long prune): a write
    is withdrawn at its deadline, answered StoreBusy, and never runs later."""
    store = sqlite_store_at(tmp_path / "f.db", busy_timeout_ms=300)
    run(store.open())
    try:
        fd = os.open(store.lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            # Before, these waited for the lock forever (run() gives up after 120 s).
            with pytest.raises(StoreBusy, match="OO_SQLITE_BUSY_TIMEOUT_MS"):
                log_decision(store, "u1", 1, "ev-1")
            with pytest.raises(StoreBusy):
                run(store.ping())
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        log_decision(store, "u1", 1, "ev-2")
        assert event_ids_of(store, "u1") == ["ev-2"]  # the withdrawn write never ran
        run(store.ping())
    finally:
        run(store.close())


def test_the_writer_survives_a_failure_to_start_and_ready_says_so(tmp_path: Path) -> None:
    """The lock file cannot be opened (here: a directory stands in its place). Each write
    answers StoreUnavailable at once instead of hanging, ping fails, and writes work again
    once the cause is gone, without a restart."""
    path = tmp_path / "w.db"
    first = sqlite_store_at(path)
    run(first.open())
    run(first.close())
    first.lock_path.unlink()
    first.lock_path.mkdir()

    store = sqlite_store_at(path)
    run(store.open())
    try:
        with pytest.raises(StoreUnavailable):
            run(
                asyncio.wait_for(
                    store.score_tx("u1", lambda _user, _replay: make_write("u1", 1)), 10
                )
            )
        with pytest.raises(StoreUnavailable):
            run(asyncio.wait_for(store.ping(), 10))
        store.lock_path.rmdir()
        log_decision(store, "u1", 1, "ev-1")
        run(store.ping())
        assert event_ids_of(store, "u1") == ["ev-1"]
    finally:
        run(store.close())


def test_a_restarted_worker_opens_while_another_holds_the_write_lock(tmp_path: Path) -> None:
    """Opening a store on a current schema takes no write lock: a worker restarted while
    the others write cannot time out on its way up."""
    path = tmp_path / "r.db"
    writer = sqlite_store_at(path, busy_timeout_ms=200)
    run(writer.open())
    try:
        fd = os.open(writer.lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        blocker = sqlite3.connect(path)
        blocker.execute("BEGIN IMMEDIATE")  # SQLite's own write lock too
        try:
            restarted = sqlite_store_at(path, busy_timeout_ms=200)
            run(restarted.open())
            run(restarted.close())
        finally:
            blocker.rollback()
            blocker.close()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    finally:
        run(writer.close())


# ── pruning by time uses an index ────────────────────────────────────────────


def test_pruning_by_time_uses_the_decision_time_index(sqlite_store: SQLiteStore) -> None:
    with sqlite3.connect(sqlite_store.path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN DELETE FROM decision WHERE rowid IN"
            " (SELECT rowid FROM decision WHERE ts_ms < 5 LIMIT 10)"
        ).fetchall()
    conn.close()
    assert any("decision_ts" in str(step) for step in plan), plan
