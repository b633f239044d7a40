"""Pick the store for a database URL."""

from __future__ import annotations

from typing import Literal

from oo_serving.redact import redact_url
from oo_serving.settings import Settings
from oo_serving.store.base import Store
from oo_serving.store.memory import MemoryStore, is_memory_url
from oo_serving.store.postgres import PostgresStore, is_postgres_url
from oo_serving.store.sqlite import SQLiteStore, sqlite_path

Backend = Literal["sqlite", "postgres", "memory"]


def backend_of(url: str) -> Backend:
    """Which store serves `url`. Raises ValueError, naming the URL (password masked), on
    one that is neither SQLite, PostgreSQL nor memory://."""
    if url.startswith("sqlite:"):
        return "sqlite"
    if is_postgres_url(url):
        return "postgres"
    if is_memory_url(url):
        return "memory"
    raise ValueError(
        f"unsupported database URL {redact_url(url)!r}: use sqlite:///path/to/file.db"
        " or postgresql://user@host:port/dbname"
    )


def open_store(settings: Settings) -> Store:
    """A store for settings.database_url, not yet opened. Raises ValueError on a bad URL.

    memory:// is a new, empty store each time, on a MemoryDatabase of its own."""
    url = settings.database_url
    backend = backend_of(url)
    if backend == "memory":
        return MemoryStore()
    if backend == "sqlite":
        return SQLiteStore(
            sqlite_path(url),
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            synchronous=settings.sqlite_synchronous,
        )
    return PostgresStore(
        url,
        pool_min_size=settings.pg_pool_min_size,
        pool_max_size=settings.pg_pool_max_size,
        pool_timeout_s=settings.pg_pool_timeout_s,
        connect_timeout_s=settings.pg_connect_timeout_s,
        statement_timeout_ms=settings.pg_statement_timeout_ms,
    )
