"""`oo-serving evaluate` and `oo-serving export` on decision logs a real server wrote, with
exploration and a shadow policy."""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Server, free_port
from tests.support import metric

pytestmark = pytest.mark.slow

EPSILON = 0.2
N_CANDIDATES = 4
USERS = 40
DECISIONS = 1_200
LOG_ENV = {
    "OO_EXPLORATION": f"epsilon:{EPSILON}",
    "OO_SHADOW_POLICIES": "linucb-v2",
    "OO_REWARD_WAIT": "1s",
}
POLICIES = ("logging", "uniform", "greedy", "linucb-v2")
ESTIMATORS = ("ips", "snips", "dr")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`oo-serving *args` with `env` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "oo_serving", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, **(env or {})},
    )


def evaluate_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = run("evaluate", "--json", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def reward_probability(features: dict[str, Any]) -> float:
    """The simulated user acts more on overdue, high-priority tasks."""
    return 0.1 + 0.45 * float(features["is_overdue"]) + 0.1 * (int(features["priority"]) - 1)


def make_candidates(rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "id": f"task-{i}",
            "content": "c",
            "source": "todoist",
            "features": {
                "is_overdue": rng.random() < 0.4,
                "task_age_days": round(rng.uniform(0, 10), 2),
                "priority": rng.randint(1, 4),
            },
        }
        for i in range(N_CANDIDATES)
    ]


@dataclass
class Decision:
    user_id: str
    event_id: str
    tip_id: str
    propensity: float
    reward: float | None


@dataclass
class Log:
    server: Server
    env: dict[str, str]
    decisions: list[Decision]
    metrics: str

    @property
    def url(self) -> str:
        return self.server.database_url


@dataclass
class Row:
    user_id: str
    event_id: str
    ts_ms: int
    tip_id: str
    propensity: float
    candidate_ids: list[str]
    candidate_p: np.ndarray
    greedy: int
    shadow: dict[str, int]
    reward: float | None


def read_rows(db_path: Path) -> dict[str, Row]:
    with closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute(
            "SELECT user_id, event_id, ts_ms, tip_id, propensity, candidate_ids, candidate_p,"
            " greedy, shadow, reward FROM decision"
        ).fetchall()
    return {
        r[1]: Row(
            user_id=r[0],
            event_id=r[1],
            ts_ms=r[2],
            tip_id=r[3],
            propensity=r[4],
            candidate_ids=json.loads(r[5]),
            candidate_p=np.frombuffer(r[6], dtype="<f8"),
            greedy=r[7],
            shadow=json.loads(r[8]),
            reward=r[9],
        )
        for r in rows
    }


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    """A server with ε-greedy exploration and a shadow policy, after 1,200 decisions of
    40 users, almost all rewarded by a seeded simulated user; its reward window closed."""
    folder = tmp_path_factory.mktemp("evaluate")
    server = Server(
        db_path=folder / "oo.db",
        port=free_port(),
        workers=1,
        log_path=folder / "server.log",
        env={**LOG_ENV, "OO_SQLITE_SYNCHRONOUS": "normal"},
    )
    server.start()
    try:
        rng = random.Random(20261127)
        users = [f"eval-{i:02d}" for i in range(USERS)]
        decisions = []
        with server.client() as client:
            for _ in range(DECISIONS):
                user = rng.choice(users)
                candidates = make_candidates(rng)
                body = {
                    "user_id": user,
                    "candidates": candidates,
                    "context": {"hour_of_day": rng.randrange(24), "day_of_week": rng.randrange(7)},
                }
                r = client.post("/score", json=body)
                assert r.status_code == 200, r.text
                answer = r.json()
                shown = next(c for c in candidates if c["id"] == answer["tip_id"])
                reward = None
                if rng.random() < 0.95:  # the rest are never rewarded
                    reward = float(rng.random() < reward_probability(shown["features"]))
                    r = client.post(
                        "/reward",
                        json={"user_id": user, "event_id": answer["event_id"], "reward": reward},
                    )
                    assert r.status_code == 200, r.text
                decisions.append(
                    Decision(
                        user, answer["event_id"], answer["tip_id"], answer["propensity"], reward
                    )
                )
            metrics = client.get("/metrics").text
        time.sleep(1.2)  # the last decisions' reward window closes
        yield Log(server, dict(LOG_ENV), decisions, metrics)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def rows(log: Log) -> dict[str, Row]:
    return read_rows(log.server.db_path)


@pytest.fixture(scope="module")
def evaluation(log: Log, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """`oo-serving evaluate --json --html FILE` on the log, with the server's settings."""
    html = tmp_path_factory.mktemp("report") / "report.html"
    result = evaluate_json("--database", log.url, "--html", str(html), env=log.env)
    return result, html


# ── tiny and empty logs ──────────────────────────────────────────────────────


def test_an_empty_log_is_evaluated_as_empty(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    migrated = run("migrate", "--database", url)
    assert migrated.returncode == 0, migrated.stderr
    result = evaluate_json("--database", url)
    assert result["enough"] is False
    assert result["estimates"] == []
    assert result["differences"] == []
    assert result["events"] == 0
    assert "empty" in result["verdict"]


def test_a_missing_database_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    done = run("evaluate", "--json", "--database", f"sqlite:///{missing}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(missing) in done.stderr
    assert done.stdout == ""
    assert not missing.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_tiny_log_says_how_many_events_are_needed(server_factory) -> None:
    server: Server = server_factory()
    rng = random.Random(4)
    with server.client() as client:
        for i in range(21):
            user = f"tiny-{i % 3}"
            r = client.post("/score", json={"user_id": user, "candidates": make_candidates(rng)})
            assert r.status_code == 200, r.text
            r = client.post(
                "/reward",
                json={"user_id": user, "event_id": r.json()["event_id"], "reward": 1.0},
            )
            assert r.status_code == 200, r.text
    result = evaluate_json("--database", server.database_url)
    assert result["enough"] is False
    assert result["events"] == 21
    assert result["users"] == 3
    assert result["estimates"] == []
    assert result["differences"] == []
    assert "21 rewarded decisions from 3 users" in result["verdict"]
    assert "200" in result["verdict"]


# ── a real log ───────────────────────────────────────────────────────────────


def test_each_decision_logs_its_exact_probabilities_and_shadow_choice(
    log: Log, rows: dict[str, Row]
) -> None:
    explore, exploit = EPSILON / N_CANDIDATES, EPSILON / N_CANDIDATES + 1 - EPSILON
    answered = [d.propensity for d in log.decisions]
    for p in answered:
        assert p == pytest.approx(exploit, abs=1e-12) or p == pytest.approx(explore, abs=1e-12)
    assert any(p == pytest.approx(explore, abs=1e-12) for p in answered)
    assert any(p == pytest.approx(exploit, abs=1e-12) for p in answered)

    assert len(rows) == DECISIONS
    for d in log.decisions:
        row = rows[d.event_id]
        assert row.tip_id == d.tip_id
        assert row.user_id == d.user_id
        assert len(row.candidate_p) == N_CANDIDATES
        assert float(row.candidate_p.sum()) == pytest.approx(1.0, abs=1e-12)
        position = row.candidate_ids.index(row.tip_id)
        assert row.candidate_p[position] == row.propensity == d.propensity
        assert row.candidate_p[row.greedy] == pytest.approx(exploit, abs=1e-12)
        assert set(row.shadow) == {"linucb-v2"}
        assert 0 <= row.shadow["linucb-v2"] < N_CANDIDATES
        assert row.reward == d.reward


def test_evaluate_estimates_every_policy_with_every_estimator(
    log: Log, rows: dict[str, Row], evaluation: tuple[dict[str, Any], Path]
) -> None:
    result, _ = evaluation
    rewarded = [d.reward for d in log.decisions if d.reward is not None]
    assert DECISIONS - 100 < len(rewarded) < DECISIONS  # a few never rewarded
    assert result["enough"] is True, result["verdict"]
    assert result["events"] == len(rewarded)
    assert result["users"] == USERS
    assert result["skipped"] == {"no_reward": DECISIONS - len(rewarded)}

    by_key = {(e["policy"], e["estimator"]): e for e in result["estimates"]}
    assert set(by_key) == {(p, e) for p in POLICIES for e in ESTIMATORS}
    for key, estimate in by_key.items():
        for name in ("value", "ci_low", "ci_high", "ess"):
            assert estimate[name] is not None, (key, estimate)
            assert math.isfinite(estimate[name]), (key, estimate)
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"], (key, estimate)
    # The logging policy's importance weights are all 1: IPS is the mean logged reward.
    assert by_key[("logging", "ips")]["value"] == pytest.approx(
        sum(rewarded) / len(rewarded), abs=1e-9
    )
    assert by_key[("logging", "ips")]["ess"] == pytest.approx(len(rewarded), rel=1e-9)
    # The simulated user prefers some tips: the policies learn it, a uniform draw cannot.
    assert by_key[("greedy", "dr")]["value"] > by_key[("uniform", "dr")]["value"]
    assert {v["policy"] for v in result["verdicts"]} == {"greedy", "linucb-v2"}
    assert result["verdict"]


def test_evaluate_writes_a_self_contained_html_report(
    evaluation: tuple[dict[str, Any], Path],
) -> None:
    _, html = evaluation
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html")
    images = page.count("<img ")
    assert images >= 2
    assert page.count('src="data:image/png;base64,') == images
    assert 'src="http' not in page
    assert "<link" not in page.lower()
    assert "linucb-v2" in page


def test_evaluate_save_keeps_the_result_for_the_dashboard(log: Log) -> None:
    with closing(sqlite3.connect(log.server.db_path)) as db:
        before = db.execute("SELECT count(*) FROM report").fetchone()[0]
    unsaved = evaluate_json("--database", log.url, "--until", "1h", env=log.env)
    saved = evaluate_json("--database", log.url, "--save", env=log.env)
    with closing(sqlite3.connect(log.server.db_path)) as db:
        rows = db.execute("SELECT kind, body FROM report ORDER BY id").fetchall()
    assert len(rows) == before + 1  # --no-save (the default) wrote nothing
    kind, body = rows[-1]
    kept = json.loads(body)
    assert kind == "evaluate"
    assert kept["result"] == saved
    assert kept["command"].startswith("oo-serving evaluate --json --database ")
    assert kept["command"].endswith(" --save")
    assert kept["since"] is None
    assert unsaved["events"] < saved["events"]
    # The serving process shows it: the latest saved evaluation, with its verdict.
    with log.server.client() as client:
        page = client.get("/dashboard")
    assert page.status_code == 200
    assert "Latest offline evaluation" in page.text
    assert "oo-serving evaluate --json" in page.text
    assert f"{saved['events']:,} events" in page.text


def test_evaluate_trains_a_registered_policy_before_the_cut_and_evaluates_it_after(
    log: Log, rows: dict[str, Row]
) -> None:
    times = sorted(row.ts_ms for row in rows.values())
    cut_ms = times[len(times) // 2]
    cut = datetime.fromtimestamp(cut_ms / 1000, UTC).isoformat(timespec="milliseconds")
    cut = cut.replace("+00:00", "Z")
    result = evaluate_json(
        "--database", log.url, "--policy", "linucb-v1", "--train-until", cut, env=log.env
    )
    after = [row for row in rows.values() if row.ts_ms >= cut_ms]
    assert result["enough"] is True, result["verdict"]
    assert result["events"] == sum(row.reward is not None for row in after)
    assert result["skipped"]["training"] == DECISIONS - len(after)
    by_key = {(e["policy"], e["estimator"]): e for e in result["estimates"]}
    assert set(by_key) == {(p, e) for p in (*POLICIES, "linucb-v1") for e in ESTIMATORS}
    for estimator in ESTIMATORS:
        estimate = by_key[("linucb-v1", estimator)]
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"], estimate
    assert "linucb-v1" in {v["policy"] for v in result["verdicts"]}


def test_metrics_count_shadow_choices_and_explored_decisions(
    log: Log, rows: dict[str, Row]
) -> None:
    explored = sum(row.candidate_ids.index(row.tip_id) != row.greedy for row in rows.values())
    assert explored > 0
    assert metric(log.metrics, "oo_explored_decisions_total") == explored
    assert metric(log.metrics, "oo_shadow_decisions_total", shadow="linucb-v2") == DECISIONS
    agreed = sum(row.shadow["linucb-v2"] == row.greedy for row in rows.values())
    assert (
        metric(log.metrics, "oo_shadow_decisions_total", shadow="linucb-v2", agreed="true")
        == agreed
    )


# ── export ───────────────────────────────────────────────────────────────────


def jsonl(*args: str, url: str) -> list[dict[str, Any]]:
    done = run("export", "--format", "jsonl", "--out", "-", "--database", url, *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_export_jsonl_has_one_line_per_decision(log: Log, rows: dict[str, Row]) -> None:
    exported = jsonl(url=log.url)
    assert len(exported) == DECISIONS
    assert {line["event_id"] for line in exported} == set(rows)
    for line in exported:
        row = rows[line["event_id"]]
        assert line["candidate_p"] == row.candidate_p.tolist()
        assert line["propensity"] == row.propensity
        assert line["candidate_p"][line["position"]] == line["propensity"]
        assert line["shadow"] == [{"policy": "linucb-v2", "position": row.shadow["linucb-v2"]}]
        assert line["reward"] == row.reward
    times = [line["ts_ms"] for line in exported]
    assert times == sorted(times)


def test_export_parquet_has_the_same_rows(log: Log, rows: dict[str, Row], tmp_path: Path) -> None:
    import pyarrow.parquet as pq  # the export extra is part of `make install`: never skipped

    out = tmp_path / "log.parquet"
    done = run("export", "--format", "parquet", "--out", str(out), "--database", log.url)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.num_rows == DECISIONS
    assert set(table.column("event_id").to_pylist()) == set(rows)
    rewards = dict(
        zip(table.column("event_id").to_pylist(), table.column("reward").to_pylist(), strict=True)
    )
    assert rewards == {e: row.reward for e, row in rows.items()}


def test_export_filters_by_user_and_time_and_refuses_unknown_formats(
    log: Log, rows: dict[str, Row], tmp_path: Path
) -> None:
    user = "eval-07"
    mine = jsonl("--user", user, url=log.url)
    assert mine
    assert {line["user_id"] for line in mine} == {user}
    assert {line["event_id"] for line in mine} == {
        e for e, row in rows.items() if row.user_id == user
    }
    assert jsonl("--since", "2099-01-01", url=log.url) == []

    out = tmp_path / "log.csv"
    done = run("export", "--format", "csv", "--out", str(out), "--database", log.url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "csv" in done.stderr
    assert not out.exists()
