"""What operators see: metrics added up over workers, request logs, request ids."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from oo_serving.logs import TextFormatter
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


TEXT_RECORD = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"[a-z_.]+: "
)
FORGED = "2030-01-01T00:00:00Z INFO forged status=200"


def test_a_path_cannot_forge_or_garble_text_log_records(server_factory, user_id: str) -> None:
    """A path id is percent-decoded and, on a refused request, not validated: with text
    logs and ids in clear, `u%0A<timestamp> ...` once wrote a record of its own."""
    server: Server = server_factory(
        env={"OO_ACCESS_LOG": "true", "OO_LOG_USER_IDS": "clear", "OO_LOG_FORMAT": "text"}
    )
    ids = [
        "u%0A" + FORGED.replace(" ", "%20"),
        "u%0D%0A" + FORGED.replace(" ", "%20"),
        "u%0D" + FORGED.replace(" ", "%20"),
        "u%1B%5B2J%1B%5BH",  # clear the terminal
        "u%E2%80%A8" + FORGED.replace(" ", "%20"),  # U+2028, a line break to splitlines()
        "u%0B%0C%C2%85%7F",
    ]
    with server.client() as c:
        for raw in ids:
            for method, path in [
                ("GET", f"/stats/{raw}"),
                ("GET", f"/features/{raw}"),
                ("POST", f"/reset/{raw}"),
                ("DELETE", f"/users/{raw}"),
                ("GET", f"/users/{raw}/export"),
            ]:
                r = c.request(method, path)
                assert r.status_code == 422, (method, path, r.text)
        assert c.get(f"/stats/{user_id}").status_code == 200
    server.stop()

    log = server.log()
    for control in "\r\x1b\x0b\x0c\x85\x7f\u2028":
        assert control not in log, repr(control)
    lines = log.split("\n")
    records = [line for line in lines if re.match(r"\d{4}-", line)]
    for line in records:
        assert TEXT_RECORD.match(line), line
        assert not line.startswith("2030-"), line
    requests = [line for line in records if "oo_serving.request: request " in line]
    refused = [line for line in requests if "status=422" in line]
    assert len(refused) == len(ids) * 5
    for line in refused:
        assert "user=None" in line, line  # not a valid id: not logged at all
    [ok] = [line for line in requests if "status=200" in line and "/stats/" in line]
    assert f"user={user_id}" in ok
    # Every line is a record or an indented traceback line: none can pass for a record.
    for line in lines:
        assert not line or TEXT_RECORD.match(line) or line.startswith("    "), line


def _record(message: str, fields: dict[str, Any], exc: bool = False) -> str:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad\n{FORGED}\r\x1b[2J")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(
        "oo_serving.request", logging.ERROR, __file__, 1, message, (), exc_info
    )
    record.fields = fields
    return TextFormatter().format(record)


def test_text_log_records_are_one_line_whatever_they_hold() -> None:
    """The formatter's own guard, for values no endpoint filters (messages, exceptions)."""
    hostile = f'u\n{FORGED}\r\x1b[2J\u2028\x85\x00\t"=\\'
    line = _record(f"msg {hostile}", {"user": hostile, "plain": "a:b@c", "none": None})
    assert line.count("\n") == 0
    assert all(c.isprintable() for c in line), repr(line)
    assert TEXT_RECORD.match(line)
    # Quoted with JSON's escapes, so the value reads back exactly.
    quoted = json.dumps(hostile, ensure_ascii=False).replace("\u2028", "\\u2028")
    quoted = quoted.replace("\x85", "\\u0085")
    assert f" user={quoted} " in line
    assert f'oo_serving.request: "msg {quoted[1:]} user=' in line
    assert line.endswith(" plain=a:b@c none=None")
    # Plain values and sentences stay as they are.
    assert _record("no keys: open", {"status": 200}).endswith(": no keys: open status=200")
    assert _record("a=b", {"route": "/x y"}).endswith(': "a=b" route="/x y"')

    lines = _record("boom", {}, exc=True).split("\n")
    assert TEXT_RECORD.match(lines[0])
    assert len(lines) > 2
    assert all(line.startswith("    ") and line.isprintable() for line in lines[1:]), lines
    # The exception's message, split where it broke lines, escaped where it did not.
    assert lines[-3:] == ["    ValueError: bad", f"    {FORGED}", "    \\u001b[2J"]


def test_a_client_gone_mid_body_is_a_499_not_a_server_error(server_factory) -> None:
    """It was counted and logged as a 500: the body limit ends without an answer when the
    client disconnects, and the request log's status defaulted to 500."""
    server: Server = server_factory(env={"OO_ACCESS_LOG": "true"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"user_id"'
        )
    with server.client() as c:
        deadline = time.monotonic() + 10
        while True:
            text = c.get("/metrics").text
            if metric(text, "oo_http_requests_total", status="499") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert metric(text, "oo_http_requests_total", method="POST", status="499") == 1
    assert metric(text, "oo_http_requests_total", status="500") == 0
    server.stop()

    records = _log_lines(server)
    assert not [r for r in records if r["level"] in ("error", "critical")], records
    [gone] = [r for r in records if r.get("status") == 499]
    assert gone["method"] == "POST"
    assert gone["level"] == "info"


def test_requests_are_labelled_by_route_template_never_by_path(client: httpx.Client) -> None:
    before = client.get("/metrics").text
    for path in ("/openapi.json", "/stats/label-probe-1", "/stats/label-probe-2", "/no/such"):
        client.get(path)
    after = client.get("/metrics").text

    def grew(route: str, status: str) -> float:
        labels = {"method": "GET", "route": route, "status": status}
        return metric(after, "oo_http_requests_total", **labels) - metric(
            before, "oo_http_requests_total", **labels
        )

    assert grew("/openapi.json", "200") == 1  # the framework's own route, by its fixed path
    assert grew("/stats/{user_id}", "200") == 2  # one series for every user
    assert grew("unmatched", "404") == 1
    assert "label-probe" not in after
    assert "/no/such" not in after
