"""One fixture per store backend, and `store`, parametrised over them by fixture name, as
litestar lays out its store tests: a contract test takes `store` and runs on every
backend; a test of one backend takes that backend's fixture.

Each backend fixture opens a store on an empty database on the tests' one loop (`run`),
and closes it after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from tests.store.support import run

from oo_serving.settings import Settings
from oo_serving.store.base import Store
from oo_serving.store.factory import open_store
from oo_serving.store.memory import MemoryStore
from oo_serving.store.postgres import PostgresStore
from oo_serving.store.sqlite import SQLiteStore

BACKENDS = ["memory_store", "sqlite_store", "postgres_store"]
SQL_BACKENDS = ["sqlite_store", "postgres_store"]


@pytest.fixture
def memory_store() -> Iterator[MemoryStore]:
    store = open_store(Settings(database_url="memory://"))
    assert isinstance(store, MemoryStore)
    run(store.open())
    yield store
    run(store.close())


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = open_store(Settings(database_url=f"sqlite:///{tmp_path}/s.db"))
    assert isinstance(store, SQLiteStore)
    run(store.open())
    yield store
    run(store.close())


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[PostgresStore]:
    """On the test run's shared database, emptied."""
    store = open_store(Settings(database_url=postgres_url))
    assert isinstance(store, PostgresStore)
    run(store.open())
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("TRUNCATE user_model, decision, pooled, report, sweep_mark")
    yield store
    run(store.close())


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    """An opened store on an empty database, of each backend in turn."""
    opened: Store = request.getfixturevalue(request.param)
    return opened


@pytest.fixture(params=SQL_BACKENDS)
def sql_store(request: pytest.FixtureRequest) -> Store:
    """As `store`, of the SQL backends only: for tests that write rows behind the store's
    back in SQL, or that read what only a schema holds."""
    opened: Store = request.getfixturevalue(request.param)
    return opened
