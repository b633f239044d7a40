"""`oo-serving restore`: put a backup in the place of a SQLite database, in one command.

The database is rewritten in place, through SQLite, never renamed or replaced as a file:
a process that opened the file a moment before would otherwise keep reading and writing
the old one, beside the new one's `-wal` file. In order:

1. Refuse if a process has the database open. Every SQLite connection in WAL mode holds
   a shared lock on the "dead-man switch" byte of the `-shm` file (offset 128) for as
   long as it is open, and a server keeps one open from start to stop; a lock there that
   cannot be had means the database is in use. After `kill -9` the file stays, unlocked.
2. Check the backup, read-only: a SQLite database, intact (`PRAGMA integrity_check`),
   with the schema of oo-serving and no newer than this release knows. An older schema
   is restored as it is: the next `serve` or `migrate` migrates it, and the previous
   release, when rolling back an upgrade, can still open it.
3. Open the database in SQLite's exclusive locking mode and take its EXCLUSIVE lock,
   without waiting. It fails if any process holds the database (so step 1 is checked
   again, by SQLite's own lock); held until the end, it makes any process that opens
   the database meanwhile wait (up to its busy timeout), and then read the restored
   state. A `-wal` file left by a crash is read on opening: the database as seen is
   whole.
4. Keep the previous database: copied with the backup API to a temporary name beside
   it, fsynced, renamed `<database>.before-restore-<UTC time>`. A crash leaves the
   database untouched (and at worst the temporary file).
5. Switch the database to a rollback journal (`journal_mode = DELETE`): SQLite
   checkpoints the WAL into the file and deletes it. A crash leaves the WAL, which
   SQLite replays on the next open: the same state.
6. Copy the backup in with the backup API: one transaction on the database, its rollback
   journal synced before the file is written (synchronous = FULL). A crash before the
   commit leaves a hot journal, which the next process to open the database plays back:
   the previous database, whole. After it, the restored one.
7. Delete the stale `-shm` file, release the lock, fsync the folder.

At no point is there a database file paired with another database's `-wal`, or no
database at all. The next `serve` switches the database back to WAL. The file keeps its
owner and permissions; the kept copy gets the same permissions.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from oo_serving.backup import contents, integrity_problems
from oo_serving.errors import SchemaError
from oo_serving.store import migrations
from oo_serving.store.base import refuse_newer

# SQLite's unix VFS: the wal-index locks start at byte 120 of the -shm file, 8 of them,
# then the dead-man switch (DMS), read-locked by every open connection.
SHM_DMS_OFFSET = 128


class RestoreRefused(Exception):
    """The restore did not happen, and the database is as it was; the message says why."""


@dataclass(frozen=True, slots=True)
class RestoreReport:
    database: Path
    source: Path
    schema_version: int
    latest_version: int  # the newest schema this release knows
    models: int
    decisions: int
    kept: Path | None  # the previous database; None when there was none


def restore_sqlite(source: Path, database: Path) -> RestoreReport:
    """Replace the SQLite database at `database` (created if missing) with the backup at
    `source`, keeping the previous one beside it. Raises RestoreRefused, with nothing
    changed, if the backup is not fit or a process has the database open."""
    if not source.is_file():
        raise RestoreRefused(f"no backup at {source}")
    if database.exists() and source.resolve() == database.resolve():
        raise RestoreRefused(f"{source} is the database itself: restore another file")
    if in_use(database):
        raise RestoreRefused(_in_use(database))
    latest = migrations.load("sqlite")[-1].version
    with closing(_open_read_only(source)) as backup:
        version = _check_backup(backup, source, latest)
        existed = database.is_file()
        database.parent.mkdir(parents=True, exist_ok=True)
        with _locked(database) as live:
            kept = _keep_previous(live, database) if existed else None
            _copy_in(backup, live, database)
            _, models, decisions = contents(live)
            _shm(database).unlink(missing_ok=True)
    _fsync_folder(database.parent)
    return RestoreReport(database, source, version, latest, models, decisions, kept)


def in_use(database: Path) -> bool:
    """Whether a process has the database open in WAL mode: it holds a shared lock on
    the -shm file's dead-man switch, which no exclusive lock can then take. POSIX locks
    belong to processes: one held by this process is not seen."""
    try:
        fd = os.open(_shm(database), os.O_RDWR)
    except FileNotFoundError:
        return False  # no connection in WAL mode has it open
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_OFFSET)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held elsewhere
        return True
    finally:
        os.close(fd)  # releases the lock, if taken
    return False


def _in_use(database: Path) -> str:
    return (
        f"{database} is open in another process (a server, or a sweep, check or backup"
        " running): stop it, then restore; nothing was changed"
    )


def _shm(database: Path) -> Path:
    return database.with_name(database.name + "-shm")


def _open_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)


def _check_backup(conn: sqlite3.Connection, source: Path, latest: int) -> int:
    """The backup's schema version, once it is known to be intact, of oo-serving, and
    not newer than `latest`."""
    try:
        problems = integrity_problems(conn)
        version, _, _ = contents(conn)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        raise RestoreRefused(f"{source} is not a SQLite database that can be read: {exc}") from exc
    if problems:
        raise RestoreRefused(f"{source} fails its integrity check: {'; '.join(problems[:5])}")
    if version == 0 or not {"user_model", "decision"} <= tables:
        raise RestoreRefused(f"{source} is not a database of oo-serving (no schema version)")
    try:
        refuse_newer(version, latest, str(source))
    except SchemaError as exc:
        raise RestoreRefused(str(exc)) from exc
    return version


@contextmanager
def _locked(database: Path) -> Iterator[sqlite3.Connection]:
    """A connection to `database` holding its EXCLUSIVE lock until closed, in exclusive
    locking mode (so it never uses the -shm file); refused at once if the lock is held."""
    conn = sqlite3.connect(
        f"file:{urllib.parse.quote(str(database))}?mode=rwc",
        uri=True,
        timeout=0,  # no waiting: a lock held means a process has the database open
        isolation_level=None,
    )
    with closing(conn):
        try:
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")  # the lock stays: exclusive locking mode
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise RestoreRefused(_in_use(database)) from exc
            raise _unreadable(database, exc) from exc
        except sqlite3.DatabaseError as exc:
            raise _unreadable(database, exc) from exc
        yield conn


def _unreadable(database: Path, exc: Exception) -> RestoreRefused:
    return RestoreRefused(
        f"the database {database} cannot be opened ({exc}): move it aside, with any -wal"
        " and -shm files beside it, and restore again; nothing was changed"
    )


def _keep_previous(live: sqlite3.Connection, database: Path) -> Path:
    """Copy the database as it is (its WAL included) to a new file beside it; its path."""
    kept = _free_name(database, datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    partial = database.with_name(f".{database.name}.before-restore.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        with closing(sqlite3.connect(partial)) as copy:
            live.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")  # a standalone file
        _fsync(partial)
        os.chmod(partial, stat.S_IMODE(database.stat().st_mode))
        partial.replace(kept)
    except sqlite3.Error as exc:
        raise _unreadable(database, exc) from exc
    finally:
        partial.unlink(missing_ok=True)
    return kept


def _free_name(database: Path, stamp: str) -> Path:
    """`<database>.before-restore-<stamp>`, with -2, -3... if taken."""
    name = f"{database.name}.before-restore-{stamp}"
    kept, n = database.with_name(name), 1
    while kept.exists():
        n += 1
        kept = database.with_name(f"{name}-{n}")
    return kept


def _copy_in(backup: sqlite3.Connection, live: sqlite3.Connection, database: Path) -> None:
    """The backup's pages into the database, in one transaction with a rollback journal."""
    try:
        live.execute("PRAGMA journal_mode = DELETE")  # the WAL checkpointed, and deleted
        backup.backup(live)
    except sqlite3.Error as exc:
        raise RestoreRefused(f"the restore failed, and {database} is as it was: {exc}") from exc


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
