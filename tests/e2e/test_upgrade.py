"""docs/upgrade.md's reversal of an additive migration gives back the schema before it.

For each reversal the guide documents (an SQL block headed `-- migration N reversed,
SQLite` or `PostgreSQL`), a database at version N, holding a row in what N added, is
reversed with the guide's own statements and compared with a database built to version
N - 1: same tables, columns, indexes and constraints, same recorded version. When N is
this release's newest, `oo-serving migrate` then upgrades the reversed database again.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from oo_serving.store import migrations
from oo_serving.store.postgres import _SCHEMA_TABLE
from tests.conftest import throwaway_database
from tests.support import oo_serving

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).parent.parent.parent / "docs" / "upgrade.md"
BLOCK = re.compile(
    r"```sql\n[ \t]*-- migration (\d+) reversed, (SQLite|PostgreSQL)[^\n]*\n(.*?)```", re.S
)


def reversals(backend: str) -> dict[int, str]:
    """The guide's reversal statements for `backend`, by migration version."""
    name = {"sqlite": "SQLite", "postgres": "PostgreSQL"}[backend]
    found = {int(v): sql for v, which, sql in BLOCK.findall(GUIDE.read_text()) if which == name}
    assert found, f"docs/upgrade.md reverses no migration on {name}"
    return found


def latest(backend: str) -> int:
    return migrations.load(backend)[-1].version


# ── SQLite ───────────────────────────────────────────────────────────────────


def sqlite_at(path: Path, version: int) -> None:
    """A SQLite database at `version`, as the store migrates: the files in order."""
    with closing(sqlite3.connect(path)) as conn:
        for migration in migrations.load("sqlite")[:version]:
            conn.executescript(migration.sql)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


def sqlite_schema(path: Path) -> tuple[int, list[tuple[Any, ...]]]:
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        rows = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
        ).fetchall()
    return int(version), rows


@pytest.mark.parametrize("version", sorted(reversals("sqlite")))
def test_a_reversed_sqlite_migration_leaves_the_schema_before_it(
    version: int, tmp_path: Path
) -> None:
    reversed_db, before = tmp_path / "reversed.db", tmp_path / "before.db"
    sqlite_at(reversed_db, version)
    sqlite_at(before, version - 1)
    with closing(sqlite3.connect(reversed_db)) as conn:
        if version == 5:  # what it added holds a row, which the reversal drops
            conn.execute("INSERT INTO report (kind, created_ms, body) VALUES ('evaluate', 1, '{}')")
            conn.commit()
        conn.isolation_level = None  # the guide's own BEGIN and COMMIT
        conn.executescript(reversals("sqlite")[version])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "sqlite_sequence" in tables:  # left behind by AUTOINCREMENT, as the guide says
            assert conn.execute("SELECT count(*) FROM sqlite_sequence").fetchone()[0] == 0
    assert sqlite_schema(reversed_db) == sqlite_schema(before)
    assert sqlite_schema(reversed_db)[0] == version - 1

    if version == latest("sqlite"):
        again = oo_serving("migrate", "--database", f"sqlite:///{reversed_db}")
        assert again.returncode == 0, again.stderr
        assert sqlite_schema(reversed_db)[0] == version


# ── PostgreSQL ───────────────────────────────────────────────────────────────


def postgres_at(url: str, version: int) -> None:
    """A PostgreSQL database at `version`, as the store migrates: the files in order in
    one transaction, each recorded in oo_schema_version."""
    with psycopg.connect(url) as conn:
        conn.execute(_SCHEMA_TABLE)
        for migration in migrations.load("postgres")[:version]:
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO oo_schema_version (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )


def postgres_schema(url: str) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default,"
        " is_identity FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY 1, 2",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'public' ORDER BY 1, 2",
        "constraints": "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)"
        " FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE n.nspname = 'public' ORDER BY 1, 2",
        "sequences": "SELECT sequence_name FROM information_schema.sequences"
        " WHERE sequence_schema = 'public' ORDER BY 1",
        "versions": "SELECT version, name FROM oo_schema_version ORDER BY version",
    }
    with psycopg.connect(url) as conn:
        return {what: conn.execute(sql).fetchall() for what, sql in queries.items()}


@pytest.fixture
def two_databases(postgres_admin_dsn: str) -> Iterator[tuple[str, str]]:
    with throwaway_database(postgres_admin_dsn) as a, throwaway_database(postgres_admin_dsn) as b:
        yield a, b


@pytest.mark.parametrize("version", sorted(reversals("postgres")))
def test_a_reversed_postgres_migration_leaves_the_schema_before_it(
    version: int, two_databases: tuple[str, str]
) -> None:
    reversed_url, before = two_databases
    postgres_at(reversed_url, version)
    postgres_at(before, version - 1)
    with psycopg.connect(reversed_url, autocommit=True) as conn:
        if version == 5:
            conn.execute("INSERT INTO report (kind, created_ms, body) VALUES ('evaluate', 1, '{}')")
        conn.execute(reversals("postgres")[version].encode())  # its own BEGIN and COMMIT
    assert postgres_schema(reversed_url) == postgres_schema(before)
    assert postgres_schema(reversed_url)["versions"][-1][0] == version - 1

    if version == latest("postgres"):
        again = oo_serving("migrate", "--database", reversed_url)
        assert again.returncode == 0, again.stderr
        assert postgres_schema(reversed_url)["versions"][-1][0] == version
