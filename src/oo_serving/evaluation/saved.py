"""`oo-serving evaluate` results kept in the database, for the dashboard to show.

A saved result is a report of kind "evaluate" (Store.save_report): a JSON object with the
result as `render.to_json` writes it, and what produced it:

    {"result": {...to_json...}, "command": "oo-serving evaluate ...",
     "since": "2026-01-01T00:00:00.000Z", "until": "..."}

`command`, `since` and `until` may be null. Only the newest REPORTS_KEPT results are
kept; /dashboard shows the latest.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from oo_serving.store.base import SavedReport, Store

KIND = "evaluate"
"""The kind of report `oo-serving evaluate` saves."""

REQUIRED_KEYS = ("events", "users", "estimates", "verdict")
"""What every result of `render.to_json` holds; a body without them is refused."""


async def save_report(
    store: Store,
    report_json: dict[str, Any],
    *,
    command: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    created_ms: int | None = None,
) -> int:
    """Keep `report_json` (the result as `render.to_json` gives it) as the latest
    evaluation, with the command line and the requested range [since_ms, until_ms) if
    given; created_ms: when it was computed (default: now). The saved report's id.

    ValueError if `report_json` is not such a result. The store must be open.
    """
    missing = [key for key in REQUIRED_KEYS if key not in report_json]
    if missing:
        raise ValueError(
            f"not an `oo-serving evaluate` result (render.to_json): no {', '.join(missing)}"
        )
    body = {
        "result": report_json,
        "command": command,
        "since": _iso(since_ms),
        "until": _iso(until_ms),
    }
    when = created_ms if created_ms is not None else _now_ms()
    return await store.save_report(KIND, when, body)


async def latest(store: Store) -> SavedReport | None:
    """The latest saved evaluation, or None."""
    return await store.latest_report(KIND)


def _iso(ts_ms: int | None) -> str | None:
    if ts_ms is None:
        return None
    moment = datetime.fromtimestamp(ts_ms / 1000.0, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
