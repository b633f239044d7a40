"""`oo-serving backup` of a SQLite database while it serves, and a restore from the copy."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

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
