"""Policies over HTTP: which one serves a user, a move between them, "why this tip", and
the population prior, on real servers and real SQLite files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest

from oo_serving.assignment import Assignment, parse_split
from oo_serving.core import registry
from oo_serving.core.features import TaskFeatures
from oo_serving.core.linucb_v2 import LinUCBV2

CANDIDATES = [
    {"id": "overdue", "content": "a", "source": "s", "features": {"is_overdue": True, "task_age_days": 4, "priority": 2}},
    {"id": "fresh", "content": "b", "source": "s", "features": {"is_overdue": False, "task_age_days": 1, "priority": 2}},
    {"id": "urgent", "content": "c", "source": "s", "features": {"priority": 4}},
]  # fmt: skip


def _task(candidate: dict[str, Any], hour: int) -> TaskFeatures:
    f = candidate["features"]
    return TaskFeatures(
        hour, f.get("is_overdue", False), float(f.get("task_age_days", 0.0)), f.get("priority", 1)
    )


def _score(client: httpx.Client, user: str, hour: int = 9, **extra: Any) -> dict[str, Any]:
    body = {"user_id": user, "candidates": CANDIDATES, "context": {"hour_of_day": hour}, **extra}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _reward(client: httpx.Client, user: str, event_id: str, reward: float) -> None:
    r = client.post("/reward", json={"user_id": user, "event_id": event_id, "reward": reward})
    assert r.status_code == 200, r.text
    assert r.json()["learned"] is True


def _teach(client: httpx.Client, user: str, rounds: int) -> list[tuple[TaskFeatures, float]]:
    """`rounds` decisions, each rewarded +1 if it chose the overdue task and −1 otherwise;
    the (features, reward) learned, in order."""
    learned = []
    for i in range(rounds):
        hour = 7 + i % 12
        answer = _score(client, user, hour)
        reward = 1.0 if answer["tip_id"] == "overdue" else -1.0
        _reward(client, user, answer["event_id"], reward)
        chosen = next(c for c in CANDIDATES if c["id"] == answer["tip_id"])
        learned.append((_task(chosen, hour), reward))
    return learned


def _replayed(policy: Any, learned: list[tuple[TaskFeatures, float]], prior: Any = None) -> Any:
    state = policy.initial_state()
    for task, reward in learned:
        state = policy.update(state, policy.features([task])[0], reward)
    return policy.theta(state, prior)


def test_oo_policy_v2_serves_and_logs_every_candidate(server_factory: Any) -> None:
    server = server_factory(env={"OO_POLICY": "linucb-v2"})
    with server.client() as client:
        answer = _score(client, "v2-user", hour=8)
        assert answer["policy"] == "linucb-v2"
        assert "explanation" not in answer  # only when asked for
        stats = client.get("/stats/v2-user").json()
        assert stats["policy"] == "linucb-v2"
        assert stats["feature_names"] == list(LinUCBV2.feature_names)
        assert len(stats["theta"]) == 11

        decision = client.get("/users/v2-user/export").json()["decisions"][0]
    assert decision["policy"] == "linucb-v2"
    assert decision["context"] == {"hour_of_day": 8, "day_of_week": 0}
    assert [c["id"] for c in decision["candidates"]] == [c["id"] for c in CANDIDATES]
    for logged, sent in zip(decision["candidates"], CANDIDATES, strict=True):
        assert logged["features"] == _task(sent, 8)._asdict()
        assert len(logged["x"]) == 11


def test_a_split_assigns_each_user_by_a_stable_hash_and_logs_its_policy(
    server_factory: Any,
) -> None:
    split = "linucb-v1:50,linucb-v2:50"
    expected = Assignment.split(parse_split(split), dict(registry.DEFAULTS))
    server = server_factory(workers=2, env={"OO_POLICY_SPLIT": split})
    users = [f"split-{i}" for i in range(40)]
    seen: dict[str, set[str]] = {}
    with server.client() as client:
        for _ in range(2):  # a user keeps its arm, whichever worker answers
            for user in users:
                seen.setdefault(user, set()).add(_score(client, user)["policy"])
        logged = {u: client.get(f"/users/{u}/export").json()["decisions"] for u in users[:6]}
    assert all(seen[u] == {expected.policy_for(u).name} for u in users)
    arms = [next(iter(seen[u])) for u in users]
    assert 8 <= arms.count("linucb-v2") <= 32  # both arms serve; 50% of 40 ± 3.8 sd
    for user, decisions in logged.items():
        assert {d["policy"] for d in decisions} == seen[user]


def test_a_user_moved_between_policies_keeps_what_it_learned(
    server_factory: Any, tmp_path: Any
) -> None:
    db = tmp_path / "moved.db"
    v1 = registry.make("linucb-v1")
    v2 = registry.make("linucb-v2")

    server = server_factory(db_path=db, env={"OO_POLICY": "linucb-v1"})
    with server.client() as client:
        learned = _teach(client, "mover", 15)
        pending = _score(client, "mover")  # decided under v1, rewarded under v2
        before = client.get("/stats/mover").json()
    server.stop()
    assert np.allclose(before["theta"], _replayed(v1, learned), atol=1e-12)

    server = server_factory(db_path=db, env={"OO_POLICY": "linucb-v2"})
    with server.client() as client:
        moved = client.get("/stats/mover").json()
        assert moved["policy"] == "linucb-v1"  # nothing rebuilt by a read
        answer = _score(client, "mover")
        assert answer["policy"] == "linucb-v2"
        after = client.get("/stats/mover").json()
        assert after["policy"] == "linucb-v2"
        assert after["reward_count"] == before["reward_count"] == 15
        assert after["pulls"] == before["pulls"] + 1
        # Rebuilt from the log: exactly what v2 learns from the same rewards in order.
        assert np.allclose(after["theta"], _replayed(v2, learned), atol=1e-9)

        # A reward for a decision made under v1 is learned under v2: no 409, no 404.
        _reward(client, "mover", pending["event_id"], 1.0)
        chosen = next(c for c in CANDIDATES if c["id"] == pending["tip_id"])
        learned.append((_task(chosen, 9), 1.0))
        assert np.allclose(
            client.get("/stats/mover").json()["theta"], _replayed(v2, learned), atol=1e-9
        )
    server.stop()

    server = server_factory(db_path=db, env={"OO_POLICY": "linucb-v1"})
    with server.client() as client:
        assert _score(client, "mover")["policy"] == "linucb-v1"
        back = client.get("/stats/mover").json()
    assert np.allclose(back["theta"], _replayed(v1, learned), atol=1e-9)


def test_explain_splits_the_score_by_feature(client: httpx.Client, user_id: str) -> None:
    _teach(client, user_id, 5)
    answer = _score(client, user_id, hour=10, explain=True)
    explanation = answer["explanation"]
    assert list(explanation["contributions"]) == list(registry.DEFAULTS["linucb-v1"].feature_names)
    assert explanation["exploration_bonus"] > 0.0
    total = sum(explanation["contributions"].values()) + explanation["exploration_bonus"]
    assert math.isclose(total, answer["score"], rel_tol=1e-9, abs_tol=1e-12)
    # θᵢxᵢ with the user's θ, and the chosen candidate's x.
    theta = client.get(f"/stats/{user_id}").json()["theta"]
    chosen = next(c for c in CANDIDATES if c["id"] == answer["tip_id"])
    x = registry.DEFAULTS["linucb-v1"].features([_task(chosen, 10)])[0]
    assert np.allclose(list(explanation["contributions"].values()), np.array(theta) * x, atol=1e-12)

    plain = _score(client, user_id, hour=10, explain=False)
    assert "explanation" not in plain


def test_a_new_user_starts_from_the_population_and_it_survives_a_restart(
    server_factory: Any, tmp_path: Any
) -> None:
    db = tmp_path / "population.db"
    env = {"OO_POLICY": "linucb-v2", "OO_POPULATION_REFRESH_S": "0.2"}
    overdue = LinUCBV2.feature_names.index("is_overdue")
    server = server_factory(workers=2, db_path=db, env=env)
    with server.client() as client:
        assert client.get("/stats/newcomer").json()["theta"] == [0.0] * 11
        for i in range(8):
            _teach(client, f"teacher-{i}", 12)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # each worker flushes and re-reads every 0.2 s
            thetas = [client.get("/stats/newcomer").json()["theta"] for _ in range(6)]
            if all(t[overdue] > 0.2 for t in thetas):
                break
            time.sleep(0.2)
        assert all(t[overdue] > 0.2 for t in thetas), thetas
        # Its very first /score already prefers what everyone taught.
        first = _score(client, "newcomer", explain=True)
        assert first["tip_id"] == "overdue"
        assert first["explanation"]["contributions"]["is_overdue"] > 0.2
    server.stop()  # a clean stop flushes what is pending

    server = server_factory(db_path=db, env=env)
    with server.client() as client:
        assert client.get("/stats/another-newcomer").json()["theta"][overdue] > 0.2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OO_POLICY": "linucb-v9"}, "no policy 'linucb-v9'"),
        ({"OO_POLICY_SPLIT": "linucb-v1:50,linucb-v3:50"}, "no policy 'linucb-v3'"),
        ({"OO_POLICY_SPLIT": "linucb-v1:x"}, "NAME:WEIGHT"),
        ({"OO_POLICY_SPLIT": "linucb-v1:0,linucb-v2:0"}, "must not all be 0"),
        ({"OO_LINUCB_V2_DISCOUNT": "1.5"}, "linucb_v2_discount"),
    ],
)
def test_a_bad_policy_setting_stops_the_server_with_its_name(
    env: dict[str, str], message: str, tmp_path: Any
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oo_serving", "migrate", "--database", f"sqlite:///{tmp_path}/o.db"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
