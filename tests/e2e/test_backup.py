"""`oo-serving backup` of a SQLite database while it serves, and `oo-serving restore` of the copy."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from oo_serving.store import migrations
from tests.conftest import throwaway_database
from tests.support import oo_serving

CANDIDATES = [
    {"id": "a", "content": "A", "source": "todoist", "features": {"priority": 4}},
    {"id": "b", "content": "B", "source": "todoist", "features": {"is_overdue": True}},
]


def _decide(client: httpx.Client, user: str, reward: float) -> None:
    out = client.post("/score", json={"user_id": user, "candidates": CANDIDATES})
    assert out.status_code == 200, out.text
    r = client.post(
        "/reward", json={"user_id": user, "reward": reward, "event_id": out.json()["event_id"]}
    )
    assert r.status_code == 200, r.text


def test_a_backup_taken_while_serving_restores_every_acknowledged_write(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "live.db"
    server = server_factory(db_path=db, workers=2)
    kept = [f"kept-{i}" for i in range(6)]
    with server.client() as client:
        for i, user in enumerate(kept):
            for step in range(3):
                _decide(client, user, [1.0, -0.5, 0.5][(i + step) % 3])
        expected = {user: client.get(f"/stats/{user}").json() for user in kept}

    stop = threading.Event()
    busy_writes = 0

    def keep_writing() -> None:  # other users, all through the backup
        nonlocal busy_writes
        with server.client() as c:
            while not stop.is_set() and busy_writes < 2000:
                _decide(c, f"busy-{busy_writes % 50}", 1.0)
                busy_writes += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        copy = tmp_path / "backups" / "copy.db"
        done = oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(copy))
    finally:
        stop.set()
        writer.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert "backed up" in done.stdout
    assert str(copy) in done.stdout
    assert busy_writes > 0
    assert copy.is_file()
    assert not copy.with_name(f".{copy.name}.partial").exists()
    checked = oo_serving("check", "--database", f"sqlite:///{copy}")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # Restore: a server on the copy answers what was acknowledged before the backup.
    server.stop()
    restored = server_factory(db_path=copy)
    with restored.client() as client:
        for user in kept:
            stats = client.get(f"/stats/{user}").json()
            assert stats == expected[user]
        _decide(client, "after-restore", 1.0)  # and it serves on


def test_backup_refuses_what_it_cannot_copy(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.db"
    done = oo_serving("backup", "--database", f"sqlite:///{missing}", "--to", str(tmp_path / "c"))
    assert done.returncode == 2
    assert "no database" in done.stderr
    assert not missing.exists()
    assert not (tmp_path / "c").exists()

    db = tmp_path / "db.db"
    assert oo_serving("migrate", "--database", f"sqlite:///{db}").returncode == 0
    same = oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(db))
    assert same.returncode == 2
    assert "another file" in same.stderr

    pg = oo_serving(
        "backup", "--database", "postgresql://oo@127.0.0.1:5432/oo", "--to", str(tmp_path / "p")
    )
    assert pg.returncode == 2
    assert "pg_dump" in pg.stderr
    assert not (tmp_path / "p").exists()


def test_restoring_a_copy_over_a_crashed_database_follows_the_documented_steps(
    server_factory: Any, tmp_path: Path
) -> None:
    """docs/operations.md, "Restoring a SQLite copy": after a crash the old database's
    -wal file is still there; moved aside with the database, the copy put in its place,
    the server serves the copy's state exactly."""
    db = tmp_path / "var" / "oo-serving.db"
    server = server_factory(db_path=db)
    kept = [f"kept-{i}" for i in range(4)]
    with server.client() as client:
        for i, user in enumerate(kept):
            for step in range(2):
                _decide(client, user, [1.0, -0.5, 0.5][(i + step) % 3])
        expected = {user: client.get(f"/stats/{user}").json() for user in kept}
        copy = tmp_path / "backups" / "oo-serving-copy.db"
        done = oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(copy))
        assert done.returncode == 0, done.stderr
        for user in [*kept, "after-backup"]:  # written after the copy: gone once restored
            _decide(client, user, 1.0)
        assert client.get("/stats/after-backup").json()["pulls"] == 1
    server.kill9()
    wal = db.with_name(db.name + "-wal")
    assert wal.is_file()
    assert wal.stat().st_size > 0  # the old database's last commits, not yet in its file

    # The steps: move the database aside with its -wal and -shm, put the copy in place.
    replaced = db.parent / "replaced"
    replaced.mkdir()
    for name in (db.name, f"{db.name}-wal", f"{db.name}-shm"):
        if (db.parent / name).exists():
            (db.parent / name).rename(replaced / name)
    shutil.copyfile(copy, db)
    assert not wal.exists()

    restored = server_factory(db_path=db)
    with restored.client() as client:
        for user in kept:
            assert client.get(f"/stats/{user}").json() == expected[user]
        assert client.get("/stats/after-backup").json()["pulls"] == 0
        _decide(client, "after-restore", 1.0)  # and it serves on
    restored.stop()
    checked = oo_serving("check", "--database", f"sqlite:///{db}")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_pg_dump_restored_into_a_new_database_serves_what_was_dumped(
    server_factory: Any, fresh_postgres_url: str, postgres_admin_dsn: str, tmp_path: Path
) -> None:
    """docs/operations.md, PostgreSQL: pg_dump while serving, pg_restore into a new
    database, replicas pointed at it."""
    for tool in ("pg_dump", "pg_restore"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    server = server_factory(database_url=fresh_postgres_url)
    users = [f"pg-{i}" for i in range(4)]
    with server.client() as client:
        for i, user in enumerate(users):
            for step in range(2):
                _decide(client, user, [1.0, -0.5, 0.5][(i + step) % 3])
        expected = {user: client.get(f"/stats/{user}").json() for user in users}
        dump = tmp_path / "oo.dump"
        dumped = subprocess.run(
            ["pg_dump", "--format=custom", f"--file={dump}", fresh_postgres_url],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert dumped.returncode == 0, dumped.stderr
    server.stop()

    with throwaway_database(postgres_admin_dsn) as restored_url:
        loaded = subprocess.run(
            ["pg_restore", "--no-owner", f"--dbname={restored_url}", str(dump)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
        checked = oo_serving("check", "--database", restored_url)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        restored = server_factory(database_url=restored_url)
        with restored.client() as client:
            for user in users:
                assert client.get(f"/stats/{user}").json() == expected[user]
            _decide(client, "after-restore", 1.0)
        restored.stop()


# ── oo-serving restore ───────────────────────────────────────────────────────


def _restore(db: Path, backup: Path) -> subprocess.CompletedProcess[str]:
    return oo_serving("restore", "--database", f"sqlite:///{db}", "--from", str(backup))


def _kept(db: Path) -> list[Path]:
    """The previous databases a restore kept beside `db`, and any temporary file."""
    return sorted(p for p in db.parent.iterdir() if ".before-restore" in p.name)


def _users(path: Path) -> dict[str, int]:
    """Each user's pulls in the SQLite file at `path`, read-only."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT user_id, pulls FROM user_model").fetchall())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_restore_puts_the_backup_back_and_keeps_the_previous_database(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "var" / "oo-serving.db"
    server = server_factory(db_path=db, workers=2)
    kept_users = [f"kept-{i}" for i in range(5)]
    with server.client() as client:
        for i, user in enumerate(kept_users):
            for step in range(3):
                _decide(client, user, [1.0, -0.5, 0.5][(i + step) % 3])
        expected = {user: client.get(f"/stats/{user}").json() for user in kept_users}
        backup = tmp_path / "backups" / "oo.db"
        done = oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(backup))
        assert done.returncode == 0, done.stderr
        for user in [*kept_users, "after-backup"]:  # gone once restored
            _decide(client, user, 1.0)
    server.stop()

    restored = _restore(db, backup)
    assert restored.returncode == 0, restored.stderr
    [previous] = _kept(db)
    assert previous.name.startswith("oo-serving.db.before-restore-")
    assert restored.stdout == (
        f"oo-serving: restored {len(kept_users)} models and {len(kept_users) * 3} decisions"
        f" (schema version {len(migrations.load('sqlite'))}) from {backup} to {db};"
        f" the previous database is kept as {previous}\n"
    )
    # The previous database, whole, as it was at the stop: the safety net.
    assert _users(previous) == {**{user: 4 for user in kept_users}, "after-backup": 1}
    assert not db.with_name(db.name + "-wal").exists()

    server = server_factory(db_path=db, workers=2)
    with server.client() as client:
        for user in kept_users:
            assert client.get(f"/stats/{user}").json() == expected[user]
        assert client.get("/stats/after-backup").json()["pulls"] == 0
        _decide(client, "after-restore", 1.0)  # and it serves on
    server.stop()
    checked = oo_serving("check", "--database", f"sqlite:///{db}")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_restore_after_kill_9_does_not_replay_the_old_wal(
    server_factory: Any, tmp_path: Path
) -> None:
    """The killed server's -wal file holds its last commits: kept with the previous
    database, never applied to the restored one."""
    db = tmp_path / "oo.db"
    server = server_factory(db_path=db)
    users = [f"kept-{i}" for i in range(4)]
    with server.client() as client:
        for i, user in enumerate(users):
            for step in range(2):
                _decide(client, user, [1.0, -0.5, 0.5][(i + step) % 3])
        expected = {user: client.get(f"/stats/{user}").json() for user in users}
        backup = tmp_path / "backup.db"
        done = oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(backup))
        assert done.returncode == 0, done.stderr
        for user in [*users, "after-backup"]:
            _decide(client, user, -1.0)
    server.kill9()
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 0  # the last commits, not yet in the database file
    assert db.with_name(db.name + "-shm").exists()  # left behind, and no lock on it

    restored = _restore(db, backup)
    assert restored.returncode == 0, restored.stderr
    assert not wal.exists()
    assert not db.with_name(db.name + "-shm").exists()
    [previous] = _kept(db)
    assert _users(previous) == {**{user: 3 for user in users}, "after-backup": 1}
    assert _users(db) == {user: 2 for user in users}

    server = server_factory(db_path=db)
    with server.client() as client:
        for user in users:
            assert client.get(f"/stats/{user}").json() == expected[user]
        assert client.get("/stats/after-backup").json()["pulls"] == 0
        _decide(client, "after-restore", 1.0)
    server.stop()
    checked = oo_serving("check", "--database", f"sqlite:///{db}")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_restore_is_refused_while_a_server_has_the_database_open(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "oo.db"
    server = server_factory(db_path=db, workers=2)
    with server.client() as client:
        _decide(client, "before", 1.0)
        backup = tmp_path / "backup.db"
        done = oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(backup))
        assert done.returncode == 0, done.stderr
        _decide(client, "after-backup", 1.0)
    server.stop()

    # Started and not yet asked anything, a server has the database open all the same.
    server = server_factory(db_path=db, workers=2)
    for attempt in ("idle", "serving"):
        refused = _restore(db, backup)
        assert refused.returncode == 2, (attempt, refused.stdout, refused.stderr)
        assert refused.stdout == ""
        assert refused.stderr == (
            f"oo-serving: {db} is open in another process (a server, or a sweep, check or"
            " backup running): stop it, then restore; nothing was changed\n"
        )
        assert _kept(db) == []
        with server.client() as client:  # it serves on, on the database as it was
            assert client.get("/stats/after-backup").json()["pulls"] == 1
            _decide(client, f"during-{attempt}", 0.5)
            assert client.get(f"/stats/during-{attempt}").json()["pulls"] == 1
    server.stop()
    assert _users(db) == {"before": 1, "after-backup": 1, "during-idle": 1, "during-serving": 1}

    # Stopped, the same command restores.
    assert _restore(db, backup).returncode == 0
    assert _users(db) == {"before": 1}


def test_a_server_started_during_a_restore_waits_for_it_and_says_so_if_too_long(
    tmp_path: Path,
) -> None:
    """A restore holds SQLite's exclusive lock from its first change to its last; a
    server that starts meanwhile waits up to its busy timeout, then exits 2."""
    db = tmp_path / "oo.db"
    assert oo_serving("migrate", "--database", f"sqlite:///{db}").returncode == 0
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")  # as `restore` holds it
        env = {**os.environ, "OO_SQLITE_BUSY_TIMEOUT_MS": "300"}
        done = subprocess.run(
            [sys.executable, "-m", "oo_serving", "serve", "--port", "0",
             "--database", f"sqlite:///{db}"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"oo-serving: the database stayed locked past the busy timeout (database sqlite:///{db})"
    )


def _schema(version: int, path: Path) -> None:
    """A SQLite file with the schema of release `version`, applied by hand."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for migration in migrations.load("sqlite")[:version]:
            conn.executescript(migration.sql)
        conn.execute(f"PRAGMA user_version = {version}")


def test_a_backup_of_an_older_schema_is_restored_as_it_is_and_migrated_at_start(
    tmp_path: Path,
) -> None:
    """Even where there was no database: a new machine, its folder made."""
    latest = len(migrations.load("sqlite"))
    backup = tmp_path / "old.db"
    _schema(latest - 1, backup)
    db = tmp_path / "new-folder" / "oo.db"
    done = _restore(db, backup)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"oo-serving: restored 0 models and 0 decisions (schema version {latest - 1},"
        f" migrated to {latest} by the next serve or migrate) from {backup} to {db};"
        " there was no database before\n"
    )
    assert _kept(db) == []
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest - 1
    migrated = oo_serving("migrate", "--database", f"sqlite:///{db}")
    assert migrated.returncode == 0, migrated.stderr
    assert f"(version {latest})" in migrated.stdout


def _corrupt(backup: Path, into: Path) -> None:
    """A copy of `backup` whose decision table's first page is damaged."""
    shutil.copyfile(backup, into)
    with closing(sqlite3.connect(into)) as conn:
        [root] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'decision'")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with into.open("r+b") as f:
        f.seek((root[0] - 1) * page_size + 8)  # its first cells' offsets
        f.write(b"\x00\x00\x00\x63")


def test_restore_refuses_a_backup_it_cannot_use_and_changes_nothing(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "oo.db"
    server = server_factory(db_path=db)
    with server.client() as client:
        _decide(client, "someone", 1.0)
    server.stop()
    backup = tmp_path / "backup.db"
    assert (
        oo_serving("backup", "--database", f"sqlite:///{db}", "--to", str(backup)).returncode == 0
    )
    before = _digest(db)
    latest = len(migrations.load("sqlite"))

    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("not a database\n" * 400)
    corrupt = tmp_path / "corrupt.db"
    _corrupt(backup, corrupt)
    newer = tmp_path / "newer.db"
    shutil.copyfile(backup, newer)
    with closing(sqlite3.connect(newer)) as conn:
        conn.execute(f"PRAGMA user_version = {latest + 1}")
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()

    cases = {
        tmp_path / "missing.db": f"no backup at {tmp_path / 'missing.db'}",
        not_sqlite: f"{not_sqlite} is not a SQLite database that can be read: file is not a database",
        corrupt: f"{corrupt} ",  # fails its integrity check, or is malformed: either
        newer: f"{newer} has schema version {latest + 1}, newer than {latest}",
        other: f"{other} is not a database of oo-serving (no schema version)",
        db: f"{db} is the database itself: restore another file",
    }
    lines = {}
    for source, says in cases.items():
        done = _restore(db, source)
        assert done.returncode == 2, (source, done.stdout, done.stderr)
        assert done.stdout == ""
        [lines[source]] = done.stderr.splitlines()
        assert lines[source].startswith(f"oo-serving: {says}"), lines[source]
        assert _digest(db) == before, source
        assert _kept(db) == []
    assert "fails its integrity check" in lines[corrupt] or "malformed" in lines[corrupt]


def test_restore_points_postgresql_to_pg_restore(tmp_path: Path) -> None:
    backup = tmp_path / "backup.db"
    _schema(len(migrations.load("sqlite")), backup)
    done = oo_serving(
        "restore", "--database", "postgresql://oo:secret@127.0.0.1:5432/oo", "--from", str(backup)
    )
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "pg_restore" in line
    assert "secret" not in done.stderr
