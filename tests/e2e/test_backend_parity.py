"""SQLite and PostgreSQL answer the same requests with the same bytes.

Only what is new per decision differs: event ids and clock times, which are masked.
"""

from __future__ import annotations

import random
import re
from typing import Any

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

EVENT_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TIMESTAMP = re.compile(rb"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3})?Z")


def masked(body: bytes) -> bytes:
    return TIMESTAMP.sub(b"<ts>", EVENT_ID.sub(b"<event>", body))


def script(seed: int) -> list[tuple[str, str, dict[str, Any] | None]]:
    """A seeded mix of every endpoint, valid and invalid, for two users."""
    rng = random.Random(seed)
    steps: list[tuple[str, str, dict[str, Any] | None]] = []
    for _ in range(80):
        user = rng.choice(["p-1", "p.2"])
        kind = rng.random()
        if kind < 0.45:
            candidates = [
                {
                    "id": f"t{i}",
                    "content": "c",
                    "source": "s",
                    "features": {
                        "is_overdue": rng.random() < 0.5,
                        "task_age_days": rng.choice([0, 1.5, 7, 31]),
                        "priority": rng.randint(1, 4),
                    },
                }
                for i in range(rng.randint(1, 6))
            ]
            body = {
                "user_id": user,
                "candidates": candidates,
                "context": {"hour_of_day": rng.randrange(24)},
            }
            steps.append(("POST", "/score", body))
        elif kind < 0.85:
            reward = {
                "user_id": user,
                "tip_id": f"t{rng.randint(0, 6)}",
                "reward": rng.choice([1, 0.5, 0, -0.5, -1]),
                "features": {"hour_of_day": rng.randrange(24), "priority": rng.randint(1, 4)},
            }
            if rng.random() < 0.5:
                # The latest decision's event, with its own tip or (409) another.
                reward["event_id"] = rng.choice(["<latest>", "<latest>", "<latest, any tip>"])
            steps.append(("POST", "/reward", reward))
        elif kind < 0.9:
            steps.append(("POST", "/reward", {"user_id": user, "reward": 2, "features": {}}))
        elif kind < 0.95:
            steps.append(("GET", f"/stats/{user}", None))
        else:
            steps.append(("GET", f"/features/{user}", None))
    steps += [("GET", "/stats/p-1", None), ("GET", "/features/p.2", None)]
    steps += [("POST", "/reset/p-1", None), ("GET", "/stats/p-1", None)]
    # Everything stored about a user, then erased.
    steps += [("GET", "/users/p.2/export", None), ("DELETE", "/users/p.2", None)]
    steps += [("GET", "/users/p.2/export", None), ("DELETE", "/users/p.2", None)]
    return steps


def play(server: Server, steps: list[tuple[str, str, dict[str, Any] | None]]) -> list[bytes]:
    answers: list[bytes] = []
    latest: dict[str, tuple[str, str]] = {}  # user -> (event_id, tip_id) of its last decision
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        for method, path, body in steps:
            if body is not None and str(body.get("event_id", "")).startswith("<latest"):
                event_id, tip_id = latest.get(body["user_id"], ("none", body["tip_id"]))
                if body["event_id"] == "<latest, any tip>":
                    tip_id = "not-the-chosen-tip"
                body = {**body, "event_id": event_id, "tip_id": tip_id}
            r = client.request(method, path, json=body)
            if path == "/score" and r.status_code == 200:
                latest[body["user_id"]] = (r.json()["event_id"], r.json()["tip_id"])  # type: ignore[index]
            answers.append(f"{r.status_code} ".encode() + masked(r.content))
    return answers


def test_sqlite_and_postgres_answer_byte_for_byte_alike(
    server_factory, fresh_postgres_url: str
) -> None:
    steps = script(seed=11)
    on_sqlite = play(server_factory(), steps)
    on_postgres = play(server_factory(database_url=fresh_postgres_url), steps)
    assert len(on_sqlite) == len(steps)
    for step, a, b in zip(steps, on_sqlite, on_postgres, strict=True):
        assert a == b, step
    statuses = {a.split(b" ")[0] for a in on_sqlite}
    assert {b"200", b"404", b"409", b"422"} <= statuses  # the script reached every path
