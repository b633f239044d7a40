"""JSON types are taken as they are, and unknown fields are accepted but named.

The prototype coerced: `"reward": true` and `"reward": "1"` were learned as 1.0,
`"hour_of_day": "9"` and `"is_overdue": "yes"` were accepted, and a misspelt field was
scored on defaults without a trace. Here a value of the wrong JSON type is a 422 naming
the field and the type that came (test_validation.py runs every field through that), an
integral number is an integer whichever way it is written, and a field the API does not
know is accepted, counted in `oo_requests_with_unknown_fields_total` and named in
`X-Unknown-Fields`.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support import error_locs, metric

UNKNOWN = "oo_requests_with_unknown_fields_total"


def features(**changes: Any) -> dict[str, Any]:
    return {"hour_of_day": 8, "is_overdue": True, "task_age_days": 2.5, "priority": 3, **changes}


def candidate(tip: str) -> dict[str, Any]:
    return {"id": tip, "content": "Renew passport", "source": "todoist", "features": features()}


def score_body(uid: str, **changes: Any) -> dict[str, Any]:
    body = {
        "user_id": uid,
        "candidates": [candidate("t1"), candidate("t2")],
        "context": {"hour_of_day": 9, "day_of_week": 2},
    }
    return {**body, **changes}


def state(client: httpx.Client, uid: str) -> tuple[bytes, bytes]:
    return client.get(f"/stats/{uid}").content, client.get(f"/features/{uid}").content


def unknown_count(client: httpx.Client, route: str) -> float:
    return metric(client.get("/metrics").text, UNKNOWN, route=route)


def header_names(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return r.headers["x-unknown-fields"].split(", ")


# ── the issue's examples ─────────────────────────────────────────────────────
ISSUE_EXAMPLES = [
    pytest.param("/reward", ("reward",), True, "Input should be a valid number, got a boolean"),
    pytest.param("/reward", ("reward",), "1", "Input should be a valid number, got a string"),
    pytest.param(
        "/score",
        ("context", "hour_of_day"),
        "9",
        "Input should be a valid integer, got a string",
    ),
    pytest.param(
        "/reward",
        ("features", "is_overdue"),
        "yes",
        "Input should be a valid boolean, got a string",
    ),
    pytest.param(
        "/score",
        ("candidates", 0, "features", "priority"),
        True,
        "Input should be a valid integer, got a boolean",
    ),
    pytest.param(
        "/score",
        ("candidates", 0, "features", "is_overdue"),
        1,
        "Input should be a valid boolean, got a number",
    ),
    pytest.param(
        "/score",
        ("context", "hour_of_day"),
        1e300,
        "Input should be a valid integer, got a number too large to be an exact integer",
    ),
    pytest.param("/reward", ("tip_id",), 7, "Input should be a valid string, got a number"),
    pytest.param("/reward", ("tip_id",), None, "Input should be a valid string, got null"),
]


@pytest.mark.parametrize(("endpoint", "path", "value", "msg"), ISSUE_EXAMPLES)
def test_a_wrong_json_type_is_refused_saying_what_was_expected(
    client: httpx.Client,
    user_id: str,
    endpoint: str,
    path: tuple[str | int, ...],
    value: Any,
    msg: str,
) -> None:
    client.post("/score", json=score_body(user_id)).raise_for_status()
    before = state(client, user_id)
    if endpoint == "/score":
        body: dict[str, Any] = score_body(user_id)
    else:
        body = {"user_id": user_id, "tip_id": "t1", "reward": 1.0, "features": features()}
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value

    r = client.post(endpoint, json=body)
    assert error_locs(r, 422) == [["body", *path]]
    assert r.json()["detail"][0]["msg"] == msg
    assert state(client, user_id) == before


def test_the_prototype_coerced_where_the_service_refuses(
    client: httpx.Client, user_id: str
) -> None:
    """The documented difference: each of these was a 200 from the prototype (pydantic's
    lax mode), which learned `true` and `"1"` as 1.0."""
    coerced = [
        {"reward": True},
        {"reward": "1"},
        {"features": features(hour_of_day="9")},
        {"features": features(is_overdue="yes")},
        {"features": features(priority=4.0, task_age_days="3")},
    ]
    for change in coerced:
        body = {"user_id": user_id, "tip_id": "t1", "reward": 1.0, "features": features()}
        r = client.post("/reward", json={**body, **change})
        assert r.status_code == 422, (change, r.text)
    stats = client.get(f"/stats/{user_id}").json()
    assert (stats["reward_count"], stats["cumulative_reward"]) == (0, 0.0)


# ── what is accepted: JSON numbers, however written ──────────────────────────
def test_an_integral_number_is_an_integer_however_written(
    client: httpx.Client, user_id: str
) -> None:
    """`9.0` is the integer 9 (JSON has one number type; JSON Schema's `integer` is any
    number without a fractional part): scored exactly as `9`."""
    as_int = client.post("/score", json=score_body(f"{user_id}-int"))
    as_float = client.post(
        "/score",
        json=score_body(
            f"{user_id}-float",
            candidates=[
                {**candidate("t1"), "features": features(hour_of_day=8.0, priority=3.0)},
                candidate("t2"),
            ],
            context={"hour_of_day": 9.0, "day_of_week": 2.0},
        ),
    )
    assert as_int.status_code == as_float.status_code == 200, as_float.text
    assert as_float.json()["tip_id"] == as_int.json()["tip_id"]
    assert as_float.json()["score"] == as_int.json()["score"]
    [logged] = client.get(f"/features/{user_id}-float").json()["history"]
    assert logged["features"] == {
        "hour_of_day": 9,
        "is_overdue": True,
        "task_age_days": 2.5,
        "priority": 3,
    }
    assert isinstance(logged["features"]["priority"], int)


def test_an_integer_is_a_number(client: httpx.Client, user_id: str) -> None:
    decision = client.post("/score", json=score_body(user_id)).json()
    body = {"user_id": user_id, "reward": 1, "event_id": decision["event_id"]}
    r = client.post("/reward", json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["kept"], r.json()["received"]) == (1.0, 1.0)
    assert client.get(f"/stats/{user_id}").json()["cumulative_reward"] == 1.0


def test_the_schema_states_the_json_types(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    feats = schemas["CandidateFeatures-Input"]["properties"]
    assert feats["hour_of_day"]["type"] == "integer"
    assert (feats["hour_of_day"]["minimum"], feats["hour_of_day"]["maximum"]) == (0, 23)
    assert feats["priority"]["type"] == "integer"
    assert feats["is_overdue"]["type"] == "boolean"
    assert feats["task_age_days"]["type"] == "number"
    context = schemas["Context-Input"]["properties"]
    assert context["hour_of_day"]["type"] == context["day_of_week"]["type"] == "integer"
    assert schemas["RewardRequest"]["properties"]["reward"]["type"] == "number"
    assert schemas["ScoreRequest"]["properties"]["explain"]["type"] == "boolean"
    # Unknown fields are accepted, and the schema says so.
    for name in ("ScoreRequest", "RewardRequest", "Candidate-Input", "CandidateFeatures-Input"):
        assert schemas[name]["additionalProperties"] is True, name


# ── unknown fields: accepted, counted, named ─────────────────────────────────
def test_a_misspelt_field_is_named_and_counted(client: httpx.Client, user_id: str) -> None:
    """The issue's `featrues`: still scored on the defaults, but no longer silently."""
    before = unknown_count(client, "/score")
    typo = {"id": "t1", "content": "c", "source": "s", "featrues": features(priority=4)}
    r = client.post("/score", json={"user_id": user_id, "candidates": [typo, typo | {"id": "t2"}]})
    assert header_names(r) == ["candidates[].featrues"]  # once, for both candidates
    assert unknown_count(client, "/score") == before + 1
    [logged] = client.get(f"/features/{user_id}").json()["history"]
    assert logged["features"]["priority"] == 1  # the default: the typo's value was not used


def test_unknown_fields_at_every_level_are_named_by_path(
    client: httpx.Client, user_id: str
) -> None:
    body = score_body(user_id, extra=1, context={"hour_of_day": 9, "timezone": "UTC"})
    body["candidates"][0]["due"] = "2026-12-01"
    body["candidates"][1]["due"] = "2026-12-02"
    body["candidates"][1]["features"]["estimate_minutes"] = {"nested": ["not", "walked"]}
    r = client.post("/score", json=body)
    assert header_names(r) == [
        "extra",
        "context.timezone",
        "candidates[].due",
        "candidates[].features.estimate_minutes",
    ]


def test_unknown_fields_of_a_reward_are_named_and_counted(
    client: httpx.Client, user_id: str
) -> None:
    decision = client.post("/score", json=score_body(user_id)).json()
    before = unknown_count(client, "/reward")
    body = {
        "user_id": user_id,
        "reward": 0.5,
        "event_id": decision["event_id"],
        "features": {"hour_of_day": 9, "sentiment": "happy"},
        "rewrad": 1.0,
    }
    r = client.post("/reward", json=body)
    assert header_names(r) == ["rewrad", "features.sentiment"]
    assert r.json()["kept"] == 0.5
    assert unknown_count(client, "/reward") == before + 1


def test_a_body_without_unknown_fields_has_no_header_and_is_not_counted(
    client: httpx.Client, user_id: str
) -> None:
    before = (unknown_count(client, "/score"), unknown_count(client, "/reward"))
    r = client.post("/score", json=score_body(user_id))
    assert r.status_code == 200
    assert "x-unknown-fields" not in r.headers
    body = {"user_id": user_id, "reward": 1.0, "event_id": r.json()["event_id"]}
    r = client.post("/reward", json=body)
    assert r.status_code == 200
    assert "x-unknown-fields" not in r.headers
    assert (unknown_count(client, "/score"), unknown_count(client, "/reward")) == before


def test_the_prototypes_extras_change_no_decision(client: httpx.Client, user_id: str) -> None:
    """Clients of the prototype send fields it never read: the same decision, named."""
    plain = client.post("/score", json=score_body(f"{user_id}-plain"))
    body = score_body(f"{user_id}-extras", app_version="3.2.1", locale="de-DE")
    for c in body["candidates"]:
        c.update({"due_date": "2026-12-01", "project": "home", "labels": ["errand"]})
    extras = client.post("/score", json=body)
    assert header_names(extras) == [
        "app_version",
        "locale",
        "candidates[].due_date",
        "candidates[].project",
        "candidates[].labels",
    ]
    assert (extras.json()["tip_id"], extras.json()["score"]) == (
        plain.json()["tip_id"],
        plain.json()["score"],
    )


def test_an_unknown_field_does_not_hide_a_refusal(client: httpx.Client, user_id: str) -> None:
    """Without event_id a misspelt `features` leaves `features` missing: a 422 naming it."""
    body = {"user_id": user_id, "tip_id": "t1", "reward": 1.0, "featrues": features()}
    r = client.post("/reward", json=body)
    assert error_locs(r, 422) == [["body", "features"]]
    assert client.get(f"/stats/{user_id}").json()["reward_count"] == 0


HOSTILE_KEYS = [
    "x\r\nSet-Cookie: session=stolen",
    "\nX-Injected: 1",
    "a, b",
    "dotted.name",
    "ü-umlaut",
    "emoji-\U0001f600",
    "",
    "tab\there",
    "quote\"and'\\",
    "k" * 5000,
    "ü" * 5000,
]


def _safe(value: str) -> None:
    assert value.isascii()
    assert all(" " <= ch <= "~" for ch in value), repr(value)


def test_hostile_field_names_cannot_break_the_header(client: httpx.Client, user_id: str) -> None:
    body: dict[str, Any] = score_body(user_id)
    for key in HOSTILE_KEYS[:10]:
        body[key] = 1
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    assert "set-cookie" not in r.headers
    assert "x-injected" not in r.headers
    raw = dict(r.headers.raw)[b"x-unknown-fields"].decode("ascii")
    _safe(raw)
    names = raw.split(", ")
    assert names == [
        "x%0D%0ASet-Cookie%3A%20session%3Dstolen",
        "%0AX-Injected%3A%201",
        "a%2C%20b",
        "dotted%2Ename",
        "%C3%BC-umlaut",
        "emoji-%F0%9F%98%80",
        '""',
        "tab%09here",
        "quote%22and%27%5C",
        "k" * 37 + "...",
    ]


def test_long_and_many_field_names_are_bounded(client: httpx.Client, user_id: str) -> None:
    body: dict[str, Any] = score_body(user_id)
    body["ü" * 5000] = 1
    for i in range(500):
        body[f"field_{i}"] = i
    for i, c in enumerate(body["candidates"]):
        c[f"own_{i}"] = True  # distinct per candidate: still at most 10 names in all
    r = client.post("/score", json=body)
    raw = dict(r.headers.raw)[b"x-unknown-fields"].decode("ascii")
    _safe(raw)
    names = raw.split(", ")
    assert len(names) == 11
    assert names[-1] == "..."  # there were more
    assert names[0] == "%C3%BC" * 6 + "..."  # cut, and never inside an escape
    assert all(len(name) <= 40 for name in names)
    assert names[1:10] == [f"field_{i}" for i in range(9)]
    assert len(raw) < 1024


def test_the_schema_documents_the_header(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/score", "/reward"):
        ok = paths[path]["post"]["responses"]["200"]
        assert ok["headers"]["X-Unknown-Fields"]["schema"] == {"type": "string"}
        assert "content" in ok  # the answer's own schema is still there


def test_a_refused_body_is_not_counted(client: httpx.Client, user_id: str) -> None:
    before = unknown_count(client, "/score")
    r = client.post("/score", json=score_body(user_id, extra=1, explain="yes"))
    assert error_locs(r, 422) == [["body", "explain"]]
    assert "x-unknown-fields" not in r.headers
    assert unknown_count(client, "/score") == before


def test_the_metric_has_no_label_a_client_chooses(client: httpx.Client, user_id: str) -> None:
    client.post("/score", json=score_body(user_id, **{"hostile-label": 1})).raise_for_status()
    samples = [
        sample
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == UNKNOWN
    ]
    assert samples
    for sample in samples:
        assert sample.labels in ({"route": "/score"}, {"route": "/reward"}), sample
