"""The sweep: the default reward for decisions whose reward window closed unrewarded, log
retention, rewards after the window, and the sweep run inside the server.

Real servers and real `oo-serving sweep` processes, on SQLite files and on PostgreSQL.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

GAVE = re.compile(r"gave (\d+) default rewards; deleted (\d+) decisions")
DAY_MS = 86_400_000
ROW_COLUMNS = (
    "user_id", "seq", "event_id", "ts_ms", "reward", "reward_n", "learned", "reward_source",
)  # fmt: skip


def oo_serving_env(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `oo-serving` with `env` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "oo_serving", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def gave_and_deleted(output: str) -> tuple[int, int]:
    match = GAVE.search(output)
    assert match is not None, output
    return int(match.group(1)), int(match.group(2))


def candidates(rng: random.Random, n: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "id": f"task-{i}",
            "content": "c",
            "source": "todoist",
            "features": {
                "is_overdue": rng.random() < 0.5,
                "task_age_days": rng.choice([0, 1.5, 7]),
                "priority": rng.randint(1, 4),
            },
        }
        for i in range(n)
    ]


def score(client: httpx.Client, user: str, rng: random.Random) -> dict[str, Any]:
    r = client.post("/score", json={"user_id": user, "candidates": candidates(rng)})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def decision_rows(database_url: str) -> dict[str, dict[str, Any]]:
    """Every decision in the database, by event_id, with ROW_COLUMNS."""
    query = f"SELECT {', '.join(ROW_COLUMNS)} FROM decision"
    if database_url.startswith("sqlite:///"):
        with closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as conn:
            rows = conn.execute(query).fetchall()
    else:
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = conn.execute(query).fetchall()
    out = {}
    for row in rows:
        record = dict(zip(ROW_COLUMNS, row, strict=True))
        record["learned"] = bool(record["learned"])
        out[record["event_id"]] = record
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sweep.db'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


def test_two_sweeps_at_once_give_each_unrewarded_decision_one_default_reward(
    database_url: str, server_factory
) -> None:
    # database_url first: a PostgreSQL database is dropped only after the server stops.
    window = {"OO_REWARD_WAIT": "1s"}
    if database_url.startswith("sqlite:///"):
        server: Server = server_factory(
            db_path=Path(database_url.removeprefix("sqlite:///")), env=window
        )
    else:
        server = server_factory(database_url=database_url, env=window)
    assert server.database_url == database_url
    rng = random.Random(11)
    users = [f"sweep-{i}" for i in range(8)]
    client_rewards: dict[str, float] = {}
    client_learned: dict[str, bool] = {}
    with server.client() as client:
        for i in range(40):
            decision = score(client, users[i % len(users)], rng)
            if i % 5 == 2:  # a few are rewarded by the client, within the window
                value = rng.choice([1.0, 0.5, -1.0])
                r = client.post(
                    "/reward",
                    json={
                        "user_id": users[i % len(users)],
                        "event_id": decision["event_id"],
                        "reward": value,
                    },
                )
                assert r.status_code == 200, r.text
                client_rewards[decision["event_id"]] = value
                client_learned[decision["event_id"]] = r.json()["learned"]
        time.sleep(1.5)  # every decision's reward window closes

        before = decision_rows(database_url)
        assert len(before) == 40
        unrewarded = [e for e, row in before.items() if row["reward"] is None]
        assert len(unrewarded) == 40 - len(client_rewards) == 32

        sweep_env = {"OO_DEFAULT_REWARD": "0", **window}
        cmd = [sys.executable, "-m", "oo_serving", "sweep", "--database", database_url]
        procs = [
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **sweep_env},
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        for proc, (out, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, (out, err)
        counts = [gave_and_deleted(out) for out, _ in outputs]
        assert sum(given for given, _ in counts) == len(unrewarded)
        assert [deleted for _, deleted in counts] == [0, 0]

        after = decision_rows(database_url)
        assert set(after) == set(before)
        for event_id, row in after.items():
            assert row["reward"] is not None, row
            assert row["reward_n"] == 1, row
            if event_id in client_rewards:
                assert row["reward"] == client_rewards[event_id], row
                assert row["reward_source"] == "client", row
                assert row["learned"] is client_learned[event_id], row
            else:
                assert row["reward"] == 0.0, row
                assert row["reward_source"] == "default", row
                assert row["learned"] is True, row

        learned_per_user = Counter(row["user_id"] for row in after.values() if row["learned"])
        reward_per_user: Counter[str] = Counter()
        for row in after.values():
            if row["learned"]:
                reward_per_user[row["user_id"]] += row["reward"]
        for user in users:
            stats = client.get(f"/stats/{user}").json()
            assert stats["pulls"] == 5
            assert stats["reward_count"] == learned_per_user[user], (user, stats)
            assert stats["cumulative_reward"] == pytest.approx(reward_per_user[user], abs=1e-9)

    third = oo_serving_env("sweep", "--database", database_url, env=sweep_env)
    assert third.returncode == 0, third.stderr
    assert gave_and_deleted(third.stdout) == (0, 0)
    assert decision_rows(database_url) == after

    check = oo_serving_env("check", "--database", database_url, env={})
    assert check.returncode == 0, check.stdout + check.stderr


def _bulk_copies(conn: sqlite3.Connection, template_event: str, count: int, ts_ms: int) -> None:
    """`count` copies of one decision for the user `bulk`, logged at ts_ms."""
    columns = [row[1] for row in conn.execute("PRAGMA table_info(decision)")]
    replaced = {
        "user_id": "'bulk'",
        "seq": "k.i",
        "event_id": "'bulk-' || k.i",
        "ts_ms": str(int(ts_ms)),
    }
    values = ", ".join(replaced.get(c, f"d.{c}") for c in columns)
    conn.execute(
        f"WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {count})"
        f" INSERT INTO decision ({', '.join(columns)}) SELECT {values}"
        " FROM decision AS d, k WHERE d.event_id = ?",
        (template_event,),
    )


def test_the_sweep_deletes_decisions_past_retention_in_batches(server_factory, tmp_path) -> None:
    db_path = tmp_path / "retention.db"
    url = f"sqlite:///{db_path}"
    server: Server = server_factory(db_path=db_path)
    rng = random.Random(5)
    with server.client() as client:
        events = [score(client, f"keep-{i % 3}", rng)["event_id"] for i in range(30)]
    server.stop()

    now_ms = time.time_ns() // 1_000_000
    old, recent = events[:10], events[10:15]  # the other 15 stay just logged
    bulk = 1_234  # more than two of the sweep's batches (500)
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.executemany(
            "UPDATE decision SET ts_ms = ? WHERE event_id = ?",
            [(now_ms - 40 * DAY_MS, e) for e in old] + [(now_ms - 20 * DAY_MS, e) for e in recent],
        )
        _bulk_copies(conn, events[-1], bulk, now_ms - 40 * DAY_MS)
    assert len(decision_rows(url)) == 30 + bulk

    # A retention shorter than the reward window is refused, and deletes nothing.
    refused = oo_serving_env(
        "sweep",
        "--database",
        url,
        env={"OO_LOG_RETENTION_DAYS": "0.00001", "OO_REWARD_WAIT": "24h"},
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.replace("│", " ").split())  # unwrapped from its box
    assert "log_retention_days (1e-05)" in message
    assert "reward window (24h)" in message
    assert len(decision_rows(url)) == 30 + bulk

    swept = oo_serving_env("sweep", "--database", url, env={})  # retention: 30 days
    assert swept.returncode == 0, swept.stderr
    assert gave_and_deleted(swept.stdout) == (0, len(old) + bulk)
    assert "older than 30 days" in swept.stdout
    remaining = decision_rows(url)
    assert set(remaining) == set(events) - set(old)
    assert {row["user_id"] for row in remaining.values()} == {"keep-0", "keep-1", "keep-2"}

    again = oo_serving_env("sweep", "--database", url, env={})
    assert again.returncode == 0, again.stderr
    assert gave_and_deleted(again.stdout) == (0, 0)
    assert set(decision_rows(url)) == set(events) - set(old)


def test_a_reward_after_the_window_is_stored_not_learned(server_factory) -> None:
    server: Server = server_factory(env={"OO_REWARD_WAIT": "1s"})
    user = "late-user"
    with server.client() as client:
        decision = score(client, user, random.Random(3))
        before = client.get(f"/stats/{user}").json()
        assert before["pulls"] == 1
        time.sleep(1.5)  # the window closes
        r = client.post(
            "/reward", json={"user_id": user, "event_id": decision["event_id"], "reward": 1.0}
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "ok": True,
            "learned": False,
            "event_id": decision["event_id"],
            "kept": 1.0,
            "late": True,
            "received": 1.0,
            "repeat": False,
            "reward_n": 1,
            "aggregation": None,
        }
        after = client.get(f"/stats/{user}").json()
        assert after["reward_count"] == before["reward_count"] == 0
        assert after["cumulative_reward"] == 0.0
        assert after["theta"] == before["theta"]
    row = decision_rows(server.database_url)[decision["event_id"]]
    assert row["reward"] == 1.0
    assert row["learned"] is False
    assert row["reward_n"] == 1
    assert row["reward_source"] == "client"


def test_the_server_sweeps_by_itself_every_interval(server_factory) -> None:
    server: Server = server_factory(
        env={
            "OO_SWEEP_INTERVAL_S": "0.5",
            "OO_REWARD_WAIT": "1s",
            "OO_DEFAULT_REWARD": "-0.5",
        }
    )
    rng = random.Random(9)
    users = {"inproc-a": 4, "inproc-b": 2}
    with server.client() as client:
        for user, count in users.items():
            for _ in range(count):
                score(client, user, rng)
        deadline = time.monotonic() + 20.0
        stats: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            stats = {user: client.get(f"/stats/{user}").json() for user in users}
            if all(stats[u]["reward_count"] == n for u, n in users.items()):
                break
            time.sleep(0.2)
        for user, count in users.items():
            assert stats[user]["reward_count"] == count, (stats, server.log())
            assert stats[user]["cumulative_reward"] == -0.5 * count
    rows = decision_rows(server.database_url)
    assert len(rows) == sum(users.values())
    for row in rows.values():
        assert (row["reward"], row["reward_source"], row["learned"]) == (-0.5, "default", True)
