"""The reward contract with an event_id: what a client need not repeat, and what is still
checked. Against a real server on loopback; numbers from the closed form
(A = I + x xᵀ, b = r x, θ = A⁻¹b), not from the package.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from tests.oracle import closed_form
from tests.support import error_locs


def _score(client: httpx.Client, user: str) -> dict[str, Any]:
    body = {
        "user_id": user,
        "candidates": [
            {
                "id": "a",
                "content": "c",
                "source": "s",
                "features": {"priority": 4, "is_overdue": True},
            },
            {"id": "b", "content": "c", "source": "s"},
        ],
        "context": {"hour_of_day": 17},
    }
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["tip_id"] == "a"
    return out


def _state(client: httpx.Client, user: str) -> tuple[bytes, dict[str, Any]]:
    """/stats as bytes, and the export without its timestamp: what a refusal must keep."""
    export = client.get(f"/users/{user}/export").json()
    export.pop("exported_at")
    return client.get(f"/stats/{user}").content, export


def _logged_x(client: httpx.Client, user: str, event_id: str) -> np.ndarray:
    decisions = client.get(f"/users/{user}/export").json()["decisions"]
    [decision] = [d for d in decisions if d["event_id"] == event_id]
    return np.array(decision["x"])


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="event-id-only"),
        pytest.param({"tip_id": "a"}, id="with-tip-id"),
        pytest.param({"features": {"hour_of_day": 3, "priority": 1}}, id="with-other-features"),
    ],
)
def test_a_reward_with_event_id_needs_neither_tip_nor_features(
    client: httpx.Client, user_id: str, extra: dict[str, Any]
) -> None:
    decision = _score(client, user_id)
    body = {"user_id": user_id, "reward": -0.5, "event_id": decision["event_id"], **extra}
    r = client.post("/reward", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "ok": True,
        "learned": True,
        "event_id": decision["event_id"],
        "kept": -0.5,
        "late": False,
        "received": -0.5,
        "repeat": False,
        "reward_n": 1,
        "aggregation": None,
    }

    stats = client.get(f"/stats/{user_id}").json()
    assert (stats["pulls"], stats["reward_count"], stats["cumulative_reward"]) == (1, 1, -0.5)
    # Learned on the logged vector, whatever features the body held.
    x = _logged_x(client, user_id, decision["event_id"])
    expected = closed_form([(x, -0.5)]).theta
    np.testing.assert_allclose(stats["theta"], expected, rtol=0, atol=1e-9)

    before = _state(client, user_id)
    again = client.post("/reward", json=body)
    assert again.json() == {
        "ok": True,
        "learned": False,
        "event_id": decision["event_id"],
        "kept": -0.5,
        "late": False,
        "received": -0.5,
        "repeat": True,
        "reward_n": 2,
        "aggregation": "first",
    }
    # The repeat is counted in the log, and changes nothing else: not the model, not the
    # kept reward.
    stats_after, export_after = _state(client, user_id)
    [decision_after] = export_after["decisions"]
    assert decision_after.pop("reward_n") == 2
    assert before[1]["decisions"][0].pop("reward_n") == 1
    assert (stats_after, export_after) == before


def test_a_tip_id_sent_with_event_id_is_still_checked(client: httpx.Client, user_id: str) -> None:
    decision = _score(client, user_id)
    before = _state(client, user_id)
    body = {"user_id": user_id, "tip_id": "b", "reward": 1.0, "event_id": decision["event_id"]}
    assert error_locs(client.post("/reward", json=body), 409) == [["body", "tip_id"]]
    assert _state(client, user_id) == before


@pytest.mark.parametrize(
    ("field", "value", "loc"),
    [
        ("features", {"priority": 9}, ["body", "features", "priority"]),
        ("features", None, ["body", "features"]),
        ("features", "none", ["body", "features"]),
        ("tip_id", None, ["body", "tip_id"]),
        ("tip_id", "", ["body", "tip_id"]),
        ("tip_id", 3, ["body", "tip_id"]),
    ],
)
def test_fields_sent_with_event_id_are_still_validated(
    client: httpx.Client, user_id: str, field: str, value: Any, loc: list[str | int]
) -> None:
    """Left out is fine; sent, even as null, a field must be valid."""
    decision = _score(client, user_id)
    before = _state(client, user_id)
    body = {"user_id": user_id, "reward": 1.0, "event_id": decision["event_id"], field: value}
    assert error_locs(client.post("/reward", json=body), 422) == [loc]
    assert _state(client, user_id) == before


@pytest.mark.parametrize("event_id", [{}, {"event_id": None}], ids=["absent", "null"])
@pytest.mark.parametrize("missing", [("features",), ("tip_id",), ("tip_id", "features")])
def test_without_event_id_tip_and_features_are_required(
    client: httpx.Client, user_id: str, missing: tuple[str, ...], event_id: dict[str, Any]
) -> None:
    _score(client, user_id)
    before = _state(client, user_id)
    body: dict[str, Any] = {"user_id": user_id, "tip_id": "a", "reward": 1.0, "features": {}}
    for field in missing:
        del body[field]
    r = client.post("/reward", json={**body, **event_id})
    assert error_locs(r, 422) == [
        ["body", field] for field in ("tip_id", "features") if field in missing
    ]
    for item in r.json()["detail"]:
        assert (item["type"], item["msg"]) == ("missing", "Field required")
    assert _state(client, user_id) == before


def test_a_missing_field_is_named_with_the_other_errors(client: httpx.Client, user_id: str) -> None:
    r = client.post("/reward", json={"user_id": user_id, "reward": 7})
    assert sorted(error_locs(r, 422)) == [
        ["body", "features"],
        ["body", "reward"],
        ["body", "tip_id"],
    ]


def test_the_schema_states_the_reward_contract(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["components"]["schemas"]["RewardRequest"]
    assert set(body["required"]) == {"user_id", "reward"}
    assert body["anyOf"] == [
        {"required": ["event_id"], "properties": {"event_id": {"type": "string"}}},
        {"required": ["tip_id", "features"]},
    ]
    tip_id, features = body["properties"]["tip_id"], body["properties"]["features"]
    # Optional, but not nullable: null is refused.
    assert tip_id["type"] == "string"
    assert "anyOf" not in tip_id
    assert "default" not in tip_id
    assert features["$ref"] == "#/components/schemas/CandidateFeatures-Input"
    assert "anyOf" not in features
    assert "default" not in features
    for field in (tip_id, features):
        assert "Required without event_id" in field["description"]
