"""The HTTP contract, endpoint by endpoint, against a real server on loopback.

Field names, defaults and paths are the prototype's; `event_id`, the joins of /reward and
the error statuses are new. Expected numbers are computed here from the LinUCB formulas
(A = I + Σ x xᵀ, b = Σ r x, θ = A⁻¹b, score = θ·x + sqrt(xᵀA⁻¹x)), not by the package.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import numpy as np
import pytest
from tests.oracle import closed_form, feature_vector
from tests.support import error_locs

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
STATS_KEYS = {
    "user_id",
    "pulls",
    "reward_count",
    "cumulative_reward",
    "estimated_mean",
    "estimated_mean_reward",
    "policy",
    "feature_names",
    "theta",
    "last_updated",
}
FEATURE_KEYS = {"hour_of_day", "is_overdue", "task_age_days", "priority"}
PATHS = {
    "/health",
    "/score",
    "/reward",
    "/reset/{user_id}",
    "/stats/{user_id}",
    "/features/{user_id}",
    "/ready",
    "/metrics",
    "/users/{user_id}",
    "/users/{user_id}/export",
}


# ── helpers ──────────────────────────────────────────────────────────────────
def feats(
    hour: int = 12, overdue: bool = False, age: float = 0.0, priority: int = 1
) -> dict[str, Any]:
    return {"hour_of_day": hour, "is_overdue": overdue, "task_age_days": age, "priority": priority}


def cand(tip_id: str, **features: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": tip_id, "content": f"do {tip_id}", "source": "todoist"}
    if features:
        body["features"] = feats(**features)
    return body


def score(
    client: httpx.Client,
    user_id: str,
    candidates: list[dict[str, Any]],
    hour: int | None = None,
    day: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user_id, "candidates": candidates}
    if hour is not None or day is not None:
        body["context"] = {}
        if hour is not None:
            body["context"]["hour_of_day"] = hour
        if day is not None:
            body["context"]["day_of_week"] = day
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def reward(
    client: httpx.Client,
    user_id: str,
    tip_id: str,
    value: float,
    features: dict[str, Any] | None = None,
    event_id: str | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "user_id": user_id,
        "tip_id": tip_id,
        "reward": value,
        "features": features if features is not None else feats(),
    }
    if event_id is not None:
        body["event_id"] = event_id
    return client.post("/reward", json=body)


def stats(client: httpx.Client, user_id: str) -> dict[str, Any]:
    r = client.get(f"/stats/{user_id}")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def history(client: httpx.Client, user_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/features/{user_id}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"user_id", "history"}
    assert body["user_id"] == user_id
    out: list[dict[str, Any]] = body["history"]
    return out


def unknown_stats(user_id: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "pulls": 0,
        "reward_count": 0,
        "cumulative_reward": 0.0,
        "estimated_mean": 0.0,
        "estimated_mean_reward": 0.0,
        "policy": "linucb-v1",
        "feature_names": ["hour_sin", "hour_cos", "is_overdue", "task_age_days", "priority_norm"],
        "theta": [0.0] * 5,
        "last_updated": None,
    }


def assert_error(r: httpx.Response, status: int, loc: list[str | int]) -> None:
    locs = error_locs(r, status)
    assert loc in locs, r.text


# ── /health, /docs, /openapi.json ─────────────────────────────────────────────
def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"ok": True}


def test_docs_page(client: httpx.Client) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "openapi.json" in r.text


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    out: dict[str, Any] = node
    return out


def _body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    content = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return _resolve(spec, content["schema"])


def test_openapi_lists_every_path_and_states_constraints(client: httpx.Client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert set(spec["paths"]) == PATHS
    assert set(spec["paths"]["/score"]) == {"post"}
    assert set(spec["paths"]["/reward"]) == {"post"}
    assert set(spec["paths"]["/reset/{user_id}"]) == {"post"}
    for path in ("/health", "/stats/{user_id}", "/features/{user_id}"):
        assert set(spec["paths"][path]) == {"get"}

    # Every POST passes the body limit: its 413 is documented with the other errors.
    for path in ("/score", "/reward", "/reset/{user_id}"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "413", "422", "503"} <= set(responses)
        assert responses["413"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }

    reward_body = _body_schema(spec, "/reward")
    # tip_id and features may be left out with an event_id, and are required without one.
    assert set(reward_body["required"]) == {"user_id", "reward"}
    assert reward_body["anyOf"] == [
        {"required": ["event_id"], "properties": {"event_id": {"type": "string"}}},
        {"required": ["tip_id", "features"]},
    ]
    assert reward_body["properties"]["reward"]["minimum"] == -1
    assert reward_body["properties"]["reward"]["maximum"] == 1
    assert reward_body["properties"]["user_id"]["pattern"]
    assert reward_body["properties"]["user_id"]["maxLength"] == 256
    assert reward_body["properties"]["user_id"]["minLength"] == 1
    assert reward_body["properties"]["user_id"]["not"] == {"enum": [".", ".."]}

    score_body = _body_schema(spec, "/score")
    assert set(score_body["required"]) == {"user_id", "candidates"}
    candidates = score_body["properties"]["candidates"]
    assert candidates["maxItems"] == 1000
    assert candidates["minItems"] == 1
    assert score_body["properties"]["user_id"]["pattern"]
    assert score_body["properties"]["user_id"]["not"] == {"enum": [".", ".."]}

    context = _resolve(spec, score_body["properties"]["context"])
    assert context["properties"]["hour_of_day"]["minimum"] == 0
    assert context["properties"]["hour_of_day"]["maximum"] == 23
    assert context["properties"]["hour_of_day"]["default"] == 12
    assert context["properties"]["day_of_week"]["minimum"] == 0
    assert context["properties"]["day_of_week"]["maximum"] == 6
    assert context["properties"]["day_of_week"]["default"] == 0

    features = _resolve(spec, reward_body["properties"]["features"])["properties"]
    assert set(features) == FEATURE_KEYS
    assert features["priority"]["minimum"] == 1
    assert features["priority"]["maximum"] == 4
    assert features["priority"]["default"] == 1
    assert features["task_age_days"]["minimum"] == 0
    assert features["task_age_days"]["default"] == 0
    assert features["is_overdue"]["default"] is False
    assert features["hour_of_day"]["default"] == 12

    for path in ("/reset/{user_id}", "/stats/{user_id}", "/features/{user_id}"):
        (op,) = spec["paths"][path].values()
        (param,) = op["parameters"]
        assert param["in"] == "path"
        assert param["name"] == "user_id"
        assert param["schema"]["pattern"]
        assert param["schema"]["maxLength"] == 256
        assert param["schema"]["minLength"] == 1
        assert param["schema"]["not"] == {"enum": [".", ".."]}


# ── /score ───────────────────────────────────────────────────────────────────
def test_score_response_fields_and_defaults(client: httpx.Client, user_id: str) -> None:
    # No features and no context: hour 12, not overdue, age 0, priority 1.
    out = score(client, user_id, [cand("t1")])
    assert set(out) == {"tip_id", "score", "policy", "event_id", "propensity"}
    assert out["propensity"] == 1.0  # no exploration by default
    assert out["tip_id"] == "t1"
    assert out["policy"] == "linucb-v1"
    assert isinstance(out["event_id"], str)
    assert 1 <= len(out["event_id"]) <= 64  # /reward accepts it back
    # A fresh user: A = I, b = 0, so the score is the norm of x.
    assert out["score"] == pytest.approx(float(np.linalg.norm(feature_vector(12))), abs=1e-12)

    (entry,) = history(client, user_id)
    assert set(entry) == {"ts", "features", "score", "tip_id", "event_id"}
    assert entry["features"] == {
        "hour_of_day": 12,
        "is_overdue": False,
        "task_age_days": 0.0,
        "priority": 1,
    }
    assert entry["tip_id"] == "t1"
    assert entry["event_id"] == out["event_id"]
    assert entry["score"] == out["score"]
    assert TS_RE.match(entry["ts"])


def test_score_on_fresh_user_is_norm_of_context_vector(client: httpx.Client, user_id: str) -> None:
    out = score(
        client,
        user_id,
        [cand("low", hour=3, priority=1), cand("high", hour=3, overdue=True, age=10, priority=4)],
        hour=9,
        day=3,
    )
    assert out["tip_id"] == "high"
    expected = float(np.linalg.norm(feature_vector(9, True, 10, 4)))
    assert out["score"] == pytest.approx(expected, abs=1e-12)


def test_candidate_hour_is_ignored_for_scoring(client: httpx.Client, user_id: str) -> None:
    # Same features but the hour: scored at the context hour, they tie, the first wins.
    out = score(client, user_id, [cand("first", hour=0), cand("second", hour=17)], hour=6)
    assert out["tip_id"] == "first"
    assert out["score"] == pytest.approx(float(np.linalg.norm(feature_vector(6))), abs=1e-12)
    (entry,) = history(client, user_id)
    assert entry["features"]["hour_of_day"] == 6


def test_ties_go_to_the_first_candidate(client: httpx.Client, user_id: str) -> None:
    same = {"overdue": True, "age": 4.0, "priority": 3}
    assert score(client, user_id, [cand("a", **same), cand("b", **same)])["tip_id"] == "a"
    assert score(client, user_id, [cand("b", **same), cand("a", **same)])["tip_id"] == "b"
    # Still after learning: identical vectors score identically.
    assert reward(client, user_id, "b", 1.0, feats(**same)).status_code == 200
    ids = [f"c{i}" for i in range(7)]
    out = score(client, user_id, [cand(i, **same) for i in ids], hour=12)
    assert out["tip_id"] == "c0"


def test_task_age_over_30_counts_as_30(client: httpx.Client, user_id: str) -> None:
    out_45 = score(client, f"{user_id}-45", [cand("t", age=45.0)], hour=8)
    out_30 = score(client, f"{user_id}-30", [cand("t", age=30.0)], hour=8)
    assert out_45["score"] == pytest.approx(out_30["score"], abs=1e-12)
    assert out_45["score"] == pytest.approx(
        float(np.linalg.norm(feature_vector(8, age=30))), abs=1e-12
    )
    # The history keeps the features as given, the vector clips them.
    (entry,) = history(client, f"{user_id}-45")
    assert entry["features"]["task_age_days"] == 45.0


def test_event_ids_are_unique_per_decision(client: httpx.Client, user_id: str) -> None:
    seen = [score(client, user_id, [cand("t")])["event_id"] for _ in range(10)]
    seen += [score(client, f"{user_id}-other", [cand("t")])["event_id"] for _ in range(5)]
    assert len(set(seen)) == len(seen)


def test_max_candidates_accepted(client: httpx.Client, user_id: str) -> None:
    candidates = [cand(f"t{i}", priority=1 + i % 4) for i in range(1000)]
    out = score(client, user_id, candidates)
    assert out["tip_id"] == "t3"  # the first with priority 4


# ── /features ────────────────────────────────────────────────────────────────
def test_features_history_order_content_and_cap(client: httpx.Client, user_id: str) -> None:
    decisions = []
    for i in range(105):
        f = {"overdue": i % 2 == 0, "age": 1.5 * (i % 7), "priority": 1 + i % 4}
        out = score(client, user_id, [cand(f"tip-{i}", hour=(i + 7) % 24, **f)], hour=i % 24)
        decisions.append((i, f, out))

    items = history(client, user_id)
    assert len(items) == 100
    for item, (i, f, out) in zip(items, decisions[5:], strict=True):
        assert item["tip_id"] == f"tip-{i}"
        assert item["event_id"] == out["event_id"]
        assert item["score"] == out["score"]
        assert item["features"] == {
            "hour_of_day": i % 24,  # the context hour, not the candidate's own
            "is_overdue": f["overdue"],
            "task_age_days": f["age"],
            "priority": f["priority"],
        }
        assert TS_RE.match(item["ts"])
    assert [item["ts"] for item in items] == sorted(item["ts"] for item in items)
    assert stats(client, user_id)["pulls"] == 105


def test_features_of_unknown_user(client: httpx.Client, user_id: str) -> None:
    r = client.get(f"/features/{user_id}")
    assert r.status_code == 200
    assert r.json() == {"user_id": user_id, "history": []}


# ── /stats ───────────────────────────────────────────────────────────────────
def test_stats_of_unknown_user(client: httpx.Client, user_id: str) -> None:
    r = client.get(f"/stats/{user_id}")
    assert r.status_code == 200
    assert r.json() == unknown_stats(user_id)


def test_stats_counters(client: httpx.Client, user_id: str) -> None:
    e1 = score(client, user_id, [cand("a", priority=4), cand("b")], hour=9)
    e2 = score(client, user_id, [cand("a", priority=4), cand("b")], hour=9)
    score(client, user_id, [cand("c")], hour=20)
    assert reward(client, user_id, "a", 1.0, event_id=e1["event_id"]).status_code == 200
    assert reward(client, user_id, "a", -0.5, event_id=e2["event_id"]).status_code == 200

    s = stats(client, user_id)
    assert set(s) == STATS_KEYS
    assert s["user_id"] == user_id
    assert s["pulls"] == 3
    assert s["reward_count"] == 2
    assert s["cumulative_reward"] == pytest.approx(0.5)
    assert s["estimated_mean"] == pytest.approx(0.25)
    assert s["estimated_mean_reward"] == s["estimated_mean"]
    assert TS_RE.match(s["last_updated"])
    x = feature_vector(9, priority=4)
    expected = closed_form([(x, 1.0), (x, -0.5)]).theta
    assert len(s["theta"]) == 5
    np.testing.assert_allclose(s["theta"], expected, rtol=0, atol=1e-9)


def test_stats_after_score_only(client: httpx.Client, user_id: str) -> None:
    score(client, user_id, [cand("a")])
    s = stats(client, user_id)
    assert s["pulls"] == 1
    assert s["reward_count"] == 0
    assert s["cumulative_reward"] == 0.0
    assert s["estimated_mean"] == 0.0
    assert s["estimated_mean_reward"] == 0.0
    assert s["theta"] == [0.0] * 5
    assert TS_RE.match(s["last_updated"])


# ── /reset ───────────────────────────────────────────────────────────────────
def test_reset_removes_only_that_user(client: httpx.Client, user_id: str) -> None:
    gone, kept = f"{user_id}-gone", f"{user_id}-kept"
    old = score(client, gone, [cand("t", priority=3)], hour=10)
    assert reward(client, gone, "t", 1.0, event_id=old["event_id"]).status_code == 200
    other = score(client, kept, [cand("t", priority=3)], hour=10)
    assert reward(client, kept, "t", 1.0, event_id=other["event_id"]).status_code == 200
    kept_stats = client.get(f"/stats/{kept}").content
    kept_history = client.get(f"/features/{kept}").content

    r = client.post(f"/reset/{gone}")
    assert r.status_code == 200
    assert r.json() == {"ok": True}

    assert stats(client, gone) == unknown_stats(gone)
    assert history(client, gone) == []
    assert client.get(f"/stats/{kept}").content == kept_stats
    assert client.get(f"/features/{kept}").content == kept_history
    # The reset user's old decisions are gone too.
    r = reward(client, gone, "t", 1.0, event_id=old["event_id"])
    assert_error(r, 404, ["body", "event_id"])
    # And the next decision starts from A = I, b = 0.
    out = score(client, gone, [cand("t", priority=3)], hour=10)
    assert out["score"] == pytest.approx(
        float(np.linalg.norm(feature_vector(10, priority=3))), abs=1e-12
    )
    assert stats(client, gone)["pulls"] == 1


def test_reset_unknown_user(client: httpx.Client, user_id: str) -> None:
    r = client.post(f"/reset/{user_id}")
    assert r.status_code == 200
    assert r.json() == {"ok": True}
    assert stats(client, user_id) == unknown_stats(user_id)


# ── /reward ──────────────────────────────────────────────────────────────────
def test_reward_with_event_id_learns_once(client: httpx.Client, user_id: str) -> None:
    out = score(client, user_id, [cand("t", overdue=True, age=2.0, priority=2)], hour=15)
    ev = out["event_id"]
    r = reward(client, user_id, "t", 1.0, event_id=ev)
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "learned": True,
        "event_id": ev,
        "kept": 1.0,
        "late": False,
        "received": 1.0,
        "repeat": False,
        "reward_n": 1,
        "aggregation": None,
    }
    s = stats(client, user_id)
    assert s["reward_count"] == 1
    assert s["cumulative_reward"] == 1.0
    x = feature_vector(15, True, 2.0, 2)
    np.testing.assert_allclose(s["theta"], closed_form([(x, 1.0)]).theta, rtol=0, atol=1e-9)

    before_stats = client.get(f"/stats/{user_id}").content
    before_history = client.get(f"/features/{user_id}").content
    for n, value in [(2, 1.0), (3, -1.0)]:
        r = reward(client, user_id, "t", value, event_id=ev)
        assert r.status_code == 200
        # A repeat says so: the value sent, and the first one, which `first` keeps.
        assert r.json() == {
            "ok": True,
            "learned": False,
            "event_id": ev,
            "kept": 1.0,
            "late": False,
            "received": value,
            "repeat": True,
            "reward_n": n,
            "aggregation": "first",
        }
    assert client.get(f"/stats/{user_id}").content == before_stats
    assert client.get(f"/features/{user_id}").content == before_history


def test_reward_unknown_event_is_404(client: httpx.Client, user_id: str) -> None:
    score(client, user_id, [cand("t")])
    before = client.get(f"/stats/{user_id}").content
    r = reward(client, user_id, "t", 1.0, event_id="00000000-0000-7000-8000-000000000000")
    assert_error(r, 404, ["body", "event_id"])
    assert client.get(f"/stats/{user_id}").content == before


def test_reward_other_users_event_is_404(client: httpx.Client, user_id: str) -> None:
    owner, thief = f"{user_id}-owner", f"{user_id}-thief"
    ev = score(client, owner, [cand("t")])["event_id"]
    score(client, thief, [cand("t")])
    owner_before = client.get(f"/stats/{owner}").content
    thief_before = client.get(f"/stats/{thief}").content
    assert_error(reward(client, thief, "t", 1.0, event_id=ev), 404, ["body", "event_id"])
    assert client.get(f"/stats/{owner}").content == owner_before
    assert client.get(f"/stats/{thief}").content == thief_before
    # The owner's decision was not consumed.
    r = reward(client, owner, "t", 1.0, event_id=ev)
    assert r.json()["learned"] is True
    assert (r.json()["event_id"], r.json()["reward_n"]) == (ev, 1)


def test_reward_wrong_tip_is_409(client: httpx.Client, user_id: str) -> None:
    out = score(client, user_id, [cand("a", priority=4), cand("b")])
    assert out["tip_id"] == "a"
    before = client.get(f"/stats/{user_id}").content
    r = reward(client, user_id, "b", 1.0, event_id=out["event_id"])
    assert_error(r, 409, ["body", "tip_id"])
    assert client.get(f"/stats/{user_id}").content == before
    r = reward(client, user_id, "a", 1.0, event_id=out["event_id"])
    assert r.json() == {
        "ok": True,
        "learned": True,
        "event_id": out["event_id"],
        "kept": 1.0,
        "late": False,
        "received": 1.0,
        "repeat": False,
        "reward_n": 1,
        "aggregation": None,
    }


def test_reward_without_event_id_joins_latest_decision_for_tip(
    client: httpx.Client, user_id: str
) -> None:
    score(client, user_id, [cand("t", priority=2)], hour=3)
    latest = score(client, user_id, [cand("t", priority=2)], hour=15)
    score(client, user_id, [cand("other", priority=4)], hour=22)
    r = reward(client, user_id, "t", 0.5, feats(hour=1, priority=1))
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "learned": True,
        "event_id": latest["event_id"],
        "kept": 0.5,
        "late": False,
        "received": 0.5,
        "repeat": False,
        "reward_n": 1,
        "aggregation": None,
    }
    s = stats(client, user_id)
    assert s["reward_count"] == 1
    expected = closed_form([(feature_vector(15, priority=2), 0.5)]).theta
    np.testing.assert_allclose(s["theta"], expected, rtol=0, atol=1e-9)


def test_reward_without_any_decision_learns_on_body_features(
    client: httpx.Client, user_id: str
) -> None:
    f = feats(hour=7, overdue=True, age=40.0, priority=3)
    r = reward(client, user_id, "never-scored", -1.0, f)
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "learned": True,
        "event_id": None,
        "kept": -1.0,
        "late": False,
        "received": -1.0,
        "repeat": False,
        "reward_n": None,
        "aggregation": None,
    }
    s = stats(client, user_id)
    assert s["pulls"] == 0
    assert s["reward_count"] == 1
    assert s["cumulative_reward"] == -1.0
    assert s["estimated_mean"] == -1.0
    assert TS_RE.match(s["last_updated"])
    expected = closed_form([(feature_vector(7, True, 40.0, 3), -1.0)]).theta
    np.testing.assert_allclose(s["theta"], expected, rtol=0, atol=1e-9)


def test_reward_for_tip_never_chosen_uses_body_features(client: httpx.Client, user_id: str) -> None:
    score(client, user_id, [cand("chosen", priority=4), cand("passed-over")], hour=9)
    r = reward(client, user_id, "passed-over", 1.0, feats(hour=20, priority=2))
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "learned": True,
        "event_id": None,
        "kept": 1.0,
        "late": False,
        "received": 1.0,
        "repeat": False,
        "reward_n": None,
        "aggregation": None,
    }
    expected = closed_form([(feature_vector(20, priority=2), 1.0)]).theta
    np.testing.assert_allclose(stats(client, user_id)["theta"], expected, rtol=0, atol=1e-9)


def test_learning_uses_the_scored_vector(client: httpx.Client, user_id: str) -> None:
    # Scored at context hour 9; the reward's features say 21 and other values.
    score(client, user_id, [cand("t", hour=3, overdue=True, age=5.0, priority=4)], hour=9)
    r = reward(client, user_id, "t", 1.0, feats(hour=21, overdue=False, age=0.0, priority=1))
    assert r.status_code == 200
    assert r.json()["learned"] is True
    scored = feature_vector(9, True, 5.0, 4)
    expected = closed_form([(scored, 1.0)]).theta
    theta = stats(client, user_id)["theta"]
    np.testing.assert_allclose(theta, expected, rtol=0, atol=1e-9)
    wrong = closed_form([(feature_vector(21), 1.0)]).theta
    assert not np.allclose(theta, wrong, rtol=0, atol=1e-6)


def test_learned_model_changes_the_choice(client: httpx.Client, user_id: str) -> None:
    # Fresh: the longer vector wins. After a -1 on it, the other one does.
    candidates = [cand("long", overdue=True, priority=4), cand("short")]
    first = score(client, user_id, candidates, hour=12)
    assert first["tip_id"] == "long"
    reward(client, user_id, "long", -1.0, event_id=first["event_id"])
    second = score(client, user_id, candidates, hour=12)
    assert second["tip_id"] == "short"
    x_long, x_short = feature_vector(12, True, 0, 4), feature_vector(12)
    expected = closed_form([(x_long, -1.0)]).score(x_short)
    assert second["score"] == pytest.approx(expected, abs=1e-9)


# ── user ids ─────────────────────────────────────────────────────────────────
def test_similar_user_ids_keep_distinct_models(client: httpx.Client, user_id: str) -> None:
    ids = [f"{user_id}{suffix}" for suffix in ("a.b", "a_b", "a-b", "A.b")]
    for n, uid in enumerate(ids, start=1):
        for _ in range(n):
            score(client, uid, [cand("t")])
        assert reward(client, uid, "t", n / 10).status_code == 200
    for n, uid in enumerate(ids, start=1):
        s = stats(client, uid)
        assert s["user_id"] == uid
        assert s["pulls"] == n
        assert s["reward_count"] == 1
        assert s["cumulative_reward"] == pytest.approx(n / 10)
        assert len(history(client, uid)) == n


def test_every_allowed_character_round_trips(client: httpx.Client, user_id: str) -> None:
    uid = f"{user_id}-._~:@+=Zz09"
    out = score(client, uid, [cand("t")])
    assert stats(client, uid)["pulls"] == 1
    assert history(client, uid)[0]["event_id"] == out["event_id"]
    assert client.post(f"/reset/{uid}").json() == {"ok": True}
    assert stats(client, uid) == unknown_stats(uid)


def test_user_id_of_256_characters_is_accepted(client: httpx.Client, user_id: str) -> None:
    uid = (user_id * 30)[:256]
    score(client, uid, [cand("t")])
    assert stats(client, uid)["pulls"] == 1
    assert len(history(client, uid)) == 1


@pytest.mark.parametrize("bad", ["a/b", "a b", ""], ids=["slash", "space", "empty"])
def test_score_refuses_bad_user_ids(client: httpx.Client, user_id: str, bad: str) -> None:
    r = client.post("/score", json={"user_id": bad, "candidates": [cand("t")]})
    assert_error(r, 422, ["body", "user_id"])


def test_json_without_content_type_is_read_as_json(client: httpx.Client, user_id: str) -> None:
    """The prototype's clients may omit the Content-Type header."""
    body = {"user_id": user_id, "candidates": [{"id": "t", "content": "c", "source": "s"}]}
    r = client.post("/score", content=json.dumps(body).encode(), headers={"content-type": ""})
    assert r.status_code == 200, r.text
    assert r.json()["tip_id"] == "t"
