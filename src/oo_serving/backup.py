"""`oo-serving backup`: a consistent copy of a SQLite database, taken while it serves.

Copying the database file with `cp` while the service writes is not safe: in WAL mode the
latest commits live in the `-wal` file, and a copy of the two taken at slightly different
moments can be torn. SQLite's online backup API copies the database page by page through
a read transaction, restarting by itself if a write lands between its steps, so the copy
is one committed state. It is made in steps of BACKUP_PAGES pages with a short sleep
between, so serving writes are never held up for long, written beside the target under a
temporary name, checked (`PRAGMA integrity_check` and the schema version), and only then
renamed into place: a failed backup leaves no file that looks whole.

PostgreSQL has its own tools for this (`pg_dump`, or base backups with WAL archiving);
the command says so rather than reinventing them.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

BACKUP_PAGES = 1024  # 4 MiB a step at the default page size
BACKUP_SLEEP_S = 0.005


@dataclass(frozen=True, slots=True)
class BackupReport:
    path: Path
    schema_version: int
    models: int
    decisions: int
    size_bytes: int


def backup_sqlite(source: Path, target: Path) -> BackupReport:
    """Copy the SQLite database at `source` to `target` (replaced if it exists) as one
    consistent snapshot; safe while other processes write. Raises FileNotFoundError for
    a missing source and sqlite3.Error if the copy fails its integrity check."""
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    if target.resolve() == source.resolve():
        raise ValueError("the backup must go to another file than the database itself")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{urllib.parse.quote(str(source))}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=BACKUP_PAGES, sleep=BACKUP_SLEEP_S)
            # A standalone file: no WAL beside it, whatever mode the source was in.
            dst.execute("PRAGMA journal_mode = DELETE")
            report = _verify(dst, target)
        finally:
            dst.close()
    finally:
        src.close()
    try:
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return BackupReport(
        path=target,
        schema_version=report[0],
        models=report[1],
        decisions=report[2],
        size_bytes=target.stat().st_size,
    )


def _verify(conn: sqlite3.Connection, target: Path) -> tuple[int, int, int]:
    problems = integrity_problems(conn)
    if problems:
        raise sqlite3.DatabaseError(
            f"the copy for {target} failed its integrity check: {'; '.join(problems[:5])}"
        )
    return contents(conn)


def integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """What `PRAGMA integrity_check` finds wrong with the database; empty when intact."""
    problems = [str(row[0]) for row in conn.execute("PRAGMA integrity_check").fetchall()]
    return [] if problems == ["ok"] else problems


def contents(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """The schema version, the models and the decisions a database holds (0 for a table
    it lacks)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    models = decisions = 0
    if "user_model" in tables:
        models = int(conn.execute("SELECT count(*) FROM user_model").fetchone()[0])
    if "decision" in tables:
        decisions = int(conn.execute("SELECT count(*) FROM decision").fetchone()[0])
    return version, models, decisions
