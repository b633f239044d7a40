"""User data rights: export everything stored about a user; erase it all."""

from __future__ import annotations

import math
import re
from typing import Any

import httpx
import numpy as np
import pytest
from tests.oracle import closed_form
from tests.support import error_locs

TS_MS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def _score(client: httpx.Client, user: str, hour: int = 9) -> dict[str, Any]:
    body = {
        "user_id": user,
        "candidates": [
            {"id": "t1", "content": "a", "source": "s", "features": {"priority": 4}},
            {"id": "t2", "content": "b", "source": "s", "features": {"is_overdue": True}},
        ],
        "context": {"hour_of_day": hour},
    }
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _reward(client: httpx.Client, user: str, tip: str, reward: float, event: str) -> None:
    body = {"user_id": user, "tip_id": tip, "reward": reward, "features": {}, "event_id": event}
    r = client.post("/reward", json=body)
    assert r.status_code == 200, r.text


def _x(hour: int, overdue: bool, age: float, priority: int) -> list[float]:
    angle = 2 * math.pi * hour / 24
    return [math.sin(angle), math.cos(angle), float(overdue), min(age, 30) / 30, (priority - 1) / 3]


def test_export_holds_the_model_and_every_decision(client: httpx.Client, user_id: str) -> None:
    first = _score(client, user_id, hour=9)
    _reward(client, user_id, first["tip_id"], 1.0, first["event_id"])
    second = _score(client, user_id, hour=18)

    r = client.get(f"/users/{user_id}/export")
    assert r.status_code == 200, r.text
    export = r.json()
    stats = client.get(f"/stats/{user_id}").json()

    assert export["user_id"] == user_id
    assert TS_MS_RE.match(export["exported_at"])
    model = export["model"]
    assert model["policy"] == "linucb-v1"
    assert (model["pulls"], model["reward_count"], model["cumulative_reward"]) == (2, 1, 1.0)
    assert np.allclose(model["theta"], stats["theta"], rtol=0, atol=1e-12)
    # θ is A⁻¹b, and the exported A⁻¹ is the inverse of I + x xᵀ for the rewarded vector.
    assert model["feature_names"] == [
        "hour_sin",
        "hour_cos",
        "is_overdue",
        "task_age_days",
        "priority_norm",
    ]
    assert model["state_version"] == 1
    A_inv = np.array(model["state"]["A_inv"])
    assert np.allclose(A_inv @ np.array(model["state"]["b"]), model["theta"], atol=1e-12)
    chosen_x = np.array(export["decisions"][0]["x"])
    assert np.allclose(closed_form([(chosen_x, 0.0)]).A_inv, A_inv)

    decisions = export["decisions"]
    assert [d["event_id"] for d in decisions] == [first["event_id"], second["event_id"]]
    assert [d["seq"] for d in decisions] == [1, 2]
    assert [d["tip_id"] for d in decisions] == [first["tip_id"], second["tip_id"]]
    assert [d["reward"] for d in decisions] == [1.0, None]
    assert TS_MS_RE.match(decisions[0]["rewarded_at"])
    assert decisions[1]["rewarded_at"] is None
    assert [d["model_version"] for d in decisions] == [0, 1]
    assert [(d["reward_n"], d["learned"], d["reward_source"]) for d in decisions] == [
        (1, True, "client"),
        (0, False, None),
    ]
    for d, hour in zip(decisions, (9, 18), strict=True):
        assert TS_MS_RE.match(d["ts"])
        assert d["propensity"] == 1.0
        # Deterministic (no exploration by default): the chosen tip had probability 1.
        assert [c["probability"] for c in d["candidates"]] == [
            1.0 if c["id"] == d["tip_id"] else 0.0 for c in d["candidates"]
        ]
        assert d["candidates"][d["greedy"]]["id"] == d["tip_id"]
        assert d["shadow"] == {}
        assert [c["id"] for c in d["candidates"]] == ["t1", "t2"]
        expected = [_x(hour, False, 0.0, 4), _x(hour, True, 0.0, 1)]
        assert np.allclose([c["x"] for c in d["candidates"]], expected, rtol=0, atol=1e-12)
        chosen = next(c for c in d["candidates"] if c["id"] == d["tip_id"])
        assert d["x"] == chosen["x"]
        assert d["features"]["hour_of_day"] == hour
        assert d["features"] == chosen["features"]
        assert d["context"] == {"hour_of_day": hour, "day_of_week": 0}
        assert [c["features"] for c in d["candidates"]] == [
            {"hour_of_day": hour, "is_overdue": False, "task_age_days": 0.0, "priority": 4},
            {"hour_of_day": hour, "is_overdue": True, "task_age_days": 0.0, "priority": 1},
        ]
    # The export agrees with what /features shows.
    history = client.get(f"/features/{user_id}").json()["history"]
    assert [h["event_id"] for h in history] == [d["event_id"] for d in decisions]


def test_export_of_an_unknown_user_is_empty(client: httpx.Client, user_id: str) -> None:
    r = client.get(f"/users/{user_id}/export")
    assert r.status_code == 200
    assert r.json()["model"] is None
    assert r.json()["decisions"] == []


def test_delete_erases_the_user_and_nobody_else(client: httpx.Client, user_id: str) -> None:
    other = f"{user_id}-other"
    decision = _score(client, user_id)
    _score(client, other)
    other_before = client.get(f"/users/{other}/export").json()

    r = client.delete(f"/users/{user_id}")
    assert r.status_code == 200
    assert r.json() == {"ok": True, "deleted": True}

    assert client.get(f"/users/{user_id}/export").json()["model"] is None
    assert client.get(f"/users/{user_id}/export").json()["decisions"] == []
    assert client.get(f"/features/{user_id}").json()["history"] == []
    assert client.get(f"/stats/{user_id}").json()["pulls"] == 0
    # Its logged decisions are gone too: their event ids no longer join.
    body = {
        "user_id": user_id,
        "tip_id": decision["tip_id"],
        "reward": 1.0,
        "features": {},
        "event_id": decision["event_id"],
    }
    assert error_locs(client.post("/reward", json=body), 404) == [["body", "event_id"]]
    other_after = client.get(f"/users/{other}/export").json()
    other_before.pop("exported_at")
    other_after.pop("exported_at")
    assert other_after == other_before

    assert client.delete(f"/users/{user_id}").json() == {"ok": True, "deleted": False}


def test_bad_user_ids_are_refused_by_name(client: httpx.Client) -> None:
    for path in ("/users/a%2Fb/export", "/users/" + "x" * 257 + "/export", "/users/a%20b"):
        method = "DELETE" if not path.endswith("/export") else "GET"
        r = client.request(method, path)
        assert error_locs(r, 422) == [["path", "user_id"]], path


def test_the_export_is_its_own_resource(client: httpx.Client, user_id: str) -> None:
    """A method the export does not have is 405, not a delete of the id "<id>/export"."""
    _score(client, user_id)
    for method in ("DELETE", "POST"):
        r = client.request(method, f"/users/{user_id}/export")
        assert r.status_code == 405, r.text
        assert r.headers["allow"] == "GET"
    assert client.get(f"/stats/{user_id}").json()["pulls"] == 1


# Ids that are also words of the API's paths, or end like one, and the edge characters.
ROUTE_WORD_IDS = [
    "export",
    "users",
    "reset",
    "stats",
    "features",
    "score",
    "reward",
    "metrics",
    "x.export",
    "export.x",
    "a:b@c",
    "~",
    "-",
    "...",
    "=+",
]


@pytest.mark.parametrize("uid", ROUTE_WORD_IDS)
def test_every_valid_id_works_on_every_per_user_route(client: httpx.Client, uid: str) -> None:
    """`DELETE /users/export` once answered 307 then 422: the route's pattern looked past
    the id into the "/users" prefix for "/export". Every valid id must reach every route."""
    assert client.post(f"/reset/{uid}").json() == {"ok": True}  # isolate from other runs
    decision = _score(client, uid)
    _reward(client, uid, decision["tip_id"], 1.0, decision["event_id"])

    stats = client.get(f"/stats/{uid}")
    assert stats.status_code == 200, stats.text
    assert stats.json()["user_id"] == uid
    assert (stats.json()["pulls"], stats.json()["reward_count"]) == (1, 1)
    features = client.get(f"/features/{uid}")
    assert features.status_code == 200, features.text
    assert [h["event_id"] for h in features.json()["history"]] == [decision["event_id"]]
    export = client.get(f"/users/{uid}/export")
    assert export.status_code == 200, export.text
    assert export.json()["user_id"] == uid
    assert [d["event_id"] for d in export.json()["decisions"]] == [decision["event_id"]]

    r = client.delete(f"/users/{uid}")
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "deleted": True}
    after = client.get(f"/stats/{uid}").json()
    assert (after["pulls"], after["reward_count"], after["cumulative_reward"]) == (0, 0, 0.0)
    assert after["last_updated"] is None
    assert client.get(f"/users/{uid}/export").json()["decisions"] == []
    assert client.delete(f"/users/{uid}").json() == {"ok": True, "deleted": False}

    _score(client, uid)
    assert client.post(f"/reset/{uid}").json() == {"ok": True}
    assert client.get(f"/stats/{uid}").json()["pulls"] == 0

    # The export stays its own resource for this id too.
    for method in ("DELETE", "POST"):
        r = client.request(method, f"/users/{uid}/export")
        assert r.status_code == 405, (method, r.text)
