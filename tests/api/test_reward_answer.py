"""A repeated reward for one decision is answered explicitly, under each aggregation rule.

The answer says it was a repeat (`repeat`, `reward_n`), which rule applied
(`aggregation`), the value sent (`received`) and the value the decision keeps (`kept`),
so that a client sees when its second value is not the one kept.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from tests.conftest import Server

CANDIDATES = [
    {"id": "t1", "content": "Renew passport", "source": "todoist", "features": {"priority": 4}},
    {"id": "t2", "content": "Water plants", "source": "todoist"},
]
SENT = (-0.5, 1.0, 0.5)
# What the decision keeps after each reward of SENT, and whether the model changed.
KEPT = {
    "first": [(-0.5, True), (-0.5, False), (-0.5, False)],
    "latest": [(-0.5, True), (1.0, True), (0.5, True)],
    "sum": [(-0.5, True), (0.5, True), (1.0, True)],
    "max": [(-0.5, True), (1.0, True), (1.0, False)],
}


def decide(client: httpx.Client, user_id: str) -> dict[str, Any]:
    r = client.post("/score", json={"user_id": user_id, "candidates": CANDIDATES})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def reward(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/reward", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.parametrize("rule", list(KEPT))
def test_repeats_answer_what_each_rule_keeps(server_factory: Any, user_id: str, rule: str) -> None:
    server: Server = server_factory(env={"OO_REWARD_AGGREGATION": rule})
    with server.client() as client:
        event_id = decide(client, user_id)["event_id"]
        for n, (value, (kept, learned)) in enumerate(zip(SENT, KEPT[rule], strict=True), 1):
            body = {"user_id": user_id, "reward": value, "event_id": event_id}
            assert reward(client, body) == {
                "ok": True,
                "learned": learned,
                "event_id": event_id,
                "kept": kept,
                "late": False,
                "received": value,
                "repeat": n > 1,
                "reward_n": n,
                "aggregation": rule if n > 1 else None,
            }
        stats = client.get(f"/stats/{user_id}").json()
        # One decision, one reward learned: the kept one.
        assert (stats["reward_count"], stats["cumulative_reward"]) == (1, KEPT[rule][-1][0])
        [decision] = client.get(f"/users/{user_id}/export").json()["decisions"]
        assert (decision["reward"], decision["reward_n"]) == (KEPT[rule][-1][0], len(SENT))


def test_a_retried_reward_says_it_was_a_repeat(client: httpx.Client, user_id: str) -> None:
    """The default rule, `first`: the same value twice, as a retry sends it."""
    event_id = decide(client, user_id)["event_id"]
    body = {"user_id": user_id, "tip_id": "t1", "reward": 1.0, "event_id": event_id}
    first, again = reward(client, body), reward(client, body)
    assert (first["repeat"], first["reward_n"], first["learned"]) == (False, 1, True)
    assert (again["repeat"], again["reward_n"], again["learned"]) == (True, 2, False)
    assert (again["kept"], again["received"], again["aggregation"]) == (1.0, 1.0, "first")


def test_without_event_id_each_reward_is_a_new_observation(
    client: httpx.Client, user_id: str
) -> None:
    """The prototype's clients: a second reward for the tip is learned again (as the
    prototype learned every reward), so it is not a repeat, and no decision counts it."""
    decision = decide(client, user_id)
    body = {"user_id": user_id, "tip_id": decision["tip_id"], "reward": 1.0, "features": {}}
    first = reward(client, body)
    second = reward(client, {**body, "reward": -1.0})
    assert (first["event_id"], first["reward_n"], first["repeat"]) == (
        decision["event_id"],
        1,
        False,
    )
    assert second == {
        "ok": True,
        "learned": True,
        "event_id": decision["event_id"],
        "kept": -1.0,
        "late": False,
        "received": -1.0,
        "repeat": False,
        "reward_n": None,
        "aggregation": None,
    }
    assert client.get(f"/stats/{user_id}").json()["reward_count"] == 2


def test_after_the_window_a_repeat_keeps_what_was_learned(
    server_factory: Any, user_id: str
) -> None:
    """Under `latest` a repeat inside the window replaces the value; after it, the answer
    says late, and kept stays the value learned, whatever the rule."""
    server: Server = server_factory(env={"OO_REWARD_AGGREGATION": "latest", "OO_REWARD_WAIT": "3s"})
    with server.client() as client:
        event_id = decide(client, user_id)["event_id"]
        body = {"user_id": user_id, "reward": 1.0, "event_id": event_id}
        first = reward(client, body)
        assert (first["learned"], first["late"], first["kept"]) == (True, False, 1.0)
        time.sleep(3.5)  # the window closes
        late = reward(client, {**body, "reward": -1.0})
        assert late == {
            "ok": True,
            "learned": False,
            "event_id": event_id,
            "kept": 1.0,
            "late": True,
            "received": -1.0,
            "repeat": True,
            "reward_n": 2,
            "aggregation": "latest",
        }


def test_the_schema_describes_the_answer(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    answer = schemas["RewardResponse"]["properties"]
    for old in ("ok", "learned", "event_id", "kept", "late"):
        assert old in answer
    assert answer["received"]["type"] == "number"
    assert answer["repeat"]["type"] == "boolean"
    assert {s.get("type") for s in answer["reward_n"]["anyOf"]} == {"integer", "null"}
    assert {s.get("type") for s in answer["aggregation"]["anyOf"]} == {"string", "null"}
