"""`oo-serving migrate` and start-up schema checks, on both backends, as an operator runs them."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from oo_serving.errors import SchemaNotCurrent
from oo_serving.settings import Settings
from oo_serving.store import migrations
from oo_serving.store.factory import open_store
from oo_serving.store.postgres import _SCHEMA_TABLE
from tests.conftest import TURNS
from tests.support import SideBySide, oo_serving

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/m.db"
    return str(request.getfixturevalue("fresh_postgres_url"))


def schema_version(url: str) -> int:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT max(version) FROM oo_schema_version").fetchone()
        return int(row[0]) if row else 0


def set_schema_version(url: str, version: int) -> None:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(f"PRAGMA user_version = {version}")
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO oo_schema_version (version, name) VALUES (%s, 'from-the-future')",
            (version,),
        )


def test_migrate_creates_the_schema_and_rerunning_is_a_no_op(database_url: str) -> None:
    backend = "sqlite" if database_url.startswith("sqlite") else "postgres"
    latest = len(migrations.load(backend))
    first = oo_serving("migrate", "--database", database_url)
    assert first.returncode == 0, first.stderr
    assert schema_version(database_url) == latest
    second = oo_serving("migrate", "--database", database_url)
    assert second.returncode == 0, second.stderr
    assert "current" in second.stdout
    assert schema_version(database_url) == latest


def test_a_newer_schema_is_refused_by_migrate_and_serve(database_url: str) -> None:
    assert oo_serving("migrate", "--database", database_url).returncode == 0
    backend = "sqlite" if database_url.startswith("sqlite") else "postgres"
    newer = len(migrations.load(backend)) + 1
    set_schema_version(database_url, newer)

    for command in (["migrate"], ["serve", "--port", "0"]):
        result = oo_serving(*command, "--database", database_url)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert f"schema version {newer}" in result.stderr
        assert "upgrade oo-serving" in result.stderr
    assert schema_version(database_url) == newer  # left as it was


def apply_migrations_up_to(url: str, version: int) -> None:
    """The schema as release `version` left it, applied by hand (no `oo-serving migrate`)."""
    backend = "sqlite" if url.startswith("sqlite") else "postgres"
    known = migrations.load(backend)[:version]
    if backend == "sqlite":
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)) as conn:
            for migration in known:
                conn.executescript(migration.sql)
            conn.execute(f"PRAGMA user_version = {version}")
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_SCHEMA_TABLE)
        for migration in known:
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO oo_schema_version (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )


def test_migration_5_adds_the_report_table_and_check_accepts_it(database_url: str) -> None:
    apply_migrations_up_to(database_url, 4)
    settings = Settings(database_url=database_url)

    async def before() -> None:
        store = open_store(settings)
        await store.open(migrate=False)  # refused: the schema is not current

    with pytest.raises(SchemaNotCurrent):
        asyncio.run(before())
    done = oo_serving("migrate", "--database", database_url)
    assert done.returncode == 0, done.stderr
    assert schema_version(database_url) == 5

    async def after() -> tuple[int, Any]:
        store = open_store(settings)
        await store.open(migrate=False)
        try:
            saved_id = await store.save_report("evaluate", 1, {"verdict": "ok"})
            return saved_id, await store.latest_report("evaluate")
        finally:
            await store.close()

    saved_id, latest = asyncio.run(after())
    assert latest is not None
    assert (latest.id, latest.body) == (saved_id, {"verdict": "ok"})
    checked = oo_serving("check", "--database", database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_serve_refuses_an_unreachable_database_with_a_clear_message(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens there.
    result = oo_serving(
        "serve", "--port", "0", "--database", "postgresql://postgres@127.0.0.1:9/none"
    )
    assert result.returncode == 2
    assert "PostgreSQL" in result.stderr


def test_prune_command_deletes_old_decisions(server_factory, database_url: str) -> None:
    server = server_factory(database_url=database_url)
    body = {"user_id": "pruned", "candidates": [{"id": "a", "content": "a", "source": "s"}]}
    with server.client() as client:
        for _ in range(3):
            assert client.post("/score", json=body).status_code == 200
        kept = oo_serving("prune", "--older-than-days", "1", "--database", database_url)
        assert kept.returncode == 0, kept.stderr
        assert "deleted 0 decisions" in kept.stdout
        assert len(client.get("/features/pruned").json()["history"]) == 3
        gone = oo_serving("prune", "--older-than-days", "0", "--database", database_url)
        assert gone.returncode == 0, gone.stderr
        assert "deleted 3 decisions" in gone.stdout
        assert client.get("/features/pruned").json()["history"] == []
        assert client.get("/stats/pruned").json()["pulls"] == 3  # the model stays


SECRET = "s3cretpw"


def with_password(url: str, password: str = SECRET) -> str:
    """`url` with `password` in its userinfo (the local cluster trusts, and ignores it)."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{password}@{host}"))


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_migrate_names_the_database_without_its_password(
    fresh_postgres_url: str, form: str
) -> None:
    if form == "userinfo":
        url, shown = with_password(fresh_postgres_url), ":***@"
    else:
        url, shown = f"{fresh_postgres_url}?password={SECRET}&sslmode=disable", "password=***&"
    result = oo_serving("migrate", "--database", url)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "is current" in result.stdout
    assert shown in result.stdout
    assert urlsplit(fresh_postgres_url).path in result.stdout  # the database is still named


MYSQL = f"mysql://u:{SECRET}@h/db"
MISSING_DB = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/oo_no_such_database"
# libpq quotes a URL it cannot parse, password and all, in the pool's warnings.
MALFORMED = f"postgresql://postgres:{SECRET}@[::1:5432/postgres"
MIGRATE, SERVE, PRUNE = ("migrate",), ("serve", "--port", "0"), ("prune", "--older-than-days", "1")
REFUSED = {
    "migrate-unsupported": (MIGRATE, MYSQL),
    "serve-unsupported": (SERVE, MYSQL),
    "prune-unsupported": (PRUNE, MYSQL),
    "migrate-missing-database": (MIGRATE, MISSING_DB),
    "migrate-malformed": (MIGRATE, MALFORMED),
    "serve-malformed": (SERVE, MALFORMED),
    "prune-malformed": (PRUNE, MALFORMED),
}


@pytest.fixture(scope="module")
def refused(postgres_admin_dsn: str) -> SideBySide:
    """Every case of the test below, started at once: the pool retries a connection for
    seconds before it gives up, and run one by one the waits add up."""
    with TURNS.turn():  # the commands talk to PostgreSQL: not while it restarts
        side = SideBySide({case: (*cmd, "--database", url) for case, (cmd, url) in REFUSED.items()})
        try:
            side.wait()
        finally:
            side.close()
    return side


@pytest.mark.xdist_group("migrations-refused")  # one batch: one worker starts it once
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_database_that_cannot_be_used_is_refused_without_its_password(
    refused: SideBySide, case: str
) -> None:
    """Exit 2 with a message, never the password (skips without PostgreSQL)."""
    result = refused.result(case)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("oo-serving: ")
