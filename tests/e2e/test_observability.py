"""What operators see: metrics added up over workers, request logs, request ids."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.support import metric

pytestmark = pytest.mark.slow

MADE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
REQUESTS = 120  # per kind, spread over two workers


def _score(client: httpx.Client, user: str) -> httpx.Response:
    body = {
        "user_id": user,
        "candidates": [
            {"id": "t1", "content": "a", "source": "s"},
            {"id": "t2", "content": "b", "source": "s", "features": {"priority": 4}},
        ],
    }
    return client.post("/score", json=body)


def _log_lines(server: Server) -> list[dict[str, Any]]:
    """Every line of the server's log, each of which must be one JSON object."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def test_metrics_add_up_over_two_workers_under_load(server_factory, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    server: Server = server_factory(workers=2, env={"OO_METRICS_DIR": str(metrics_dir)})
    rewards = [(-1.0, 0.5, 1.0, 0.0)[i % 4] for i in range(REQUESTS)]

    def one_user(i: int) -> tuple[int, int]:
        with server.client() as c:
            decision = _score(c, f"metrics-user-{i % 30}")
            body = {
                "user_id": f"metrics-user-{i % 30}",
                "tip_id": decision.json()["tip_id"],
                "reward": rewards[i],
                "features": {},
                "event_id": decision.json()["event_id"],
            }
            return decision.status_code, c.post("/reward", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one_user, range(REQUESTS)))
    assert statuses == [(200, 200)] * REQUESTS

    # Any worker answers /metrics; each answer must hold the whole service's counts.
    with server.client() as c:
        for _ in range(6):
            text = c.get("/metrics").text
            assert metric(text, "oo_decisions_total", policy="linucb-v1") == REQUESTS
            assert metric(text, "oo_rewards_total", join="event_id", learned="true") == REQUESTS
            assert metric(text, "oo_reward_value_sum", join="event_id") == pytest.approx(
                sum(rewards)
            )
            assert metric(text, "oo_reward_value_count") == REQUESTS
            assert metric(text, "oo_http_requests_total", route="/score", status="200") == REQUESTS
            assert (
                metric(text, "oo_http_request_duration_seconds_count", route="/reward") == REQUESTS
            )
            assert metric(text, "oo_store_operation_duration_seconds_count", op="score_tx") == (
                REQUESTS
            )
            assert metric(text, "oo_store_errors_total") == 0
        # A repeat, and a reward that joins nothing, are told apart.
        last = c.post(
            "/reward",
            json={"user_id": "metrics-fresh", "tip_id": "t1", "reward": 1.0, "features": {}},
        )
        assert last.status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "oo_rewards_total", join="request_features") == 1
    # Both workers served and wrote their own samples (files named by process id).
    writers = {p.stem.split("_")[-1] for p in metrics_dir.glob("counter_*.db")}
    assert len(writers) == 2, writers


def test_every_answer_carries_a_request_id(client: httpx.Client) -> None:
    given = client.get("/health", headers={"X-Request-ID": "trace-42.a:b/c"})
    assert given.headers["x-request-id"] == "trace-42.a:b/c"

    made = {
        client.get("/health").headers["x-request-id"],
        client.post("/score", content=b"{").headers["x-request-id"],  # 422
        client.get("/no-such-route").headers["x-request-id"],  # 404
    }
    assert len(made) == 3
    assert all(MADE_ID.fullmatch(m) for m in made)
    # A header that could forge log lines is replaced, not echoed.
    for bad in ("a b", "x" * 129, 'a"b', "é".encode()):
        r = client.get("/health", headers={"X-Request-ID": bad})
        assert MADE_ID.fullmatch(r.headers["x-request-id"]), bad


def test_request_logs_are_json_without_user_ids_in_clear(
    server_factory, tmp_path: Path, user_id: str
) -> None:
    env = {"OO_ACCESS_LOG": "true", "OO_LOG_HASH_KEY": "a-fixed-log-key"}
    server: Server = server_factory(env=env)
    with server.client() as c:
        _score(c, user_id)
        c.get(f"/stats/{user_id}", headers={"X-Request-ID": "stats-call"})
        c.post("/reward", json={"user_id": user_id})  # 422
    server.stop()

    lines = _log_lines(server)
    requests = [line for line in lines if line["logger"] == "oo_serving.request"]
    by_route = {(r["method"], r["route"], r["status"]): r for r in requests}
    assert set(by_route) >= {
        ("POST", "/score", 200),
        ("GET", "/stats/{user_id}", 200),
        ("POST", "/reward", 422),
    }
    stats = by_route[("GET", "/stats/{user_id}", 200)]
    assert stats["request_id"] == "stats-call"
    assert stats["level"] == "info"
    assert stats["duration_ms"] >= 0
    # The user is the same keyed hash in every line about them, and never in clear.
    users = {
        by_route[k]["user"] for k in (("POST", "/score", 200), ("GET", "/stats/{user_id}", 200))
    }
    assert len(users) == 1
    assert users.pop() not in (None, user_id)
    assert user_id not in server.log()

    # Same key, same hash: a user can be followed across restarts and workers.
    again: Server = server_factory(env=env)
    with again.client() as c:
        _score(c, user_id)
    again.stop()
    hashes = {r["user"] for r in _log_lines(again) if r.get("route") == "/score"}
    assert hashes == {stats["user"]}


def test_user_ids_in_clear_and_text_logs_when_asked(server_factory, user_id: str) -> None:
    server: Server = server_factory(
        env={"OO_ACCESS_LOG": "true", "OO_LOG_USER_IDS": "clear", "OO_LOG_FORMAT": "text"}
    )
    with server.client() as c:
        c.get(f"/stats/{user_id}")
    server.stop()
    line = next(x for x in server.log().splitlines() if "route=/stats/{user_id}" in x)
    assert "oo_serving.request: request method=GET" in line
    assert f"user={user_id}" in line
    assert "status=200" in line
