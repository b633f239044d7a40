"""Pick the store for a database URL."""

from __future__ import annotations

from oo_serving.settings import Settings
from oo_serving.store.base import Store
from oo_serving.store.sqlite import SQLiteStore, sqlite_path


def open_store(settings: Settings) -> Store:
    """A store for settings.database_url, not yet opened. Raises ValueError on a bad URL."""
    url = settings.database_url
    if url.startswith("sqlite:"):
        return SQLiteStore(
            sqlite_path(url),
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            synchronous=settings.sqlite_synchronous,
        )
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path/to/file.db")
