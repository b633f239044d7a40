"""Bad requests are refused with 422 (or 413) naming the field, and change nothing.

Every case first seeds a user with one decision and one reward, then sends the bad
request about that user, and checks that the user's /stats and /features answer with
exactly the same bytes afterwards.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from tests.conftest import Server, free_port
from tests.support import error_locs

MAX_BODY_BYTES = 1_048_576
MISSING = object()  # as a value: delete the field
WHOLE_BODY: tuple[str | int, ...] = ()


def features(**changes: Any) -> dict[str, Any]:
    return {"hour_of_day": 8, "is_overdue": True, "task_age_days": 2.5, "priority": 3, **changes}


def score_body(uid: str) -> dict[str, Any]:
    return {
        "user_id": uid,
        "candidates": [
            {"id": "t1", "content": "Renew passport", "source": "todoist", "features": features()},
            {"id": "t2", "content": "Water plants", "source": "todoist", "source_id": "42"},
        ],
        "context": {"hour_of_day": 9, "day_of_week": 2},
    }


def reward_body(uid: str) -> dict[str, Any]:
    return {"user_id": uid, "tip_id": "t1", "reward": 1.0, "features": features()}


BODIES = {"/score": score_body, "/reward": reward_body}


def mutated(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> Any:
    if path == WHOLE_BODY:
        return value
    out = copy.deepcopy(body)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    if value is MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def snapshot(client: httpx.Client, uid: str) -> tuple[bytes, bytes]:
    stats = client.get(f"/stats/{uid}")
    history = client.get(f"/features/{uid}")
    assert stats.status_code == 200
    assert history.status_code == 200
    return stats.content, history.content


@dataclass(frozen=True)
class Seeded:
    """A user with one decision and one reward, and what /stats and /features said."""

    uid: str
    before: tuple[bytes, bytes]

    def assert_unchanged(self, client: httpx.Client) -> None:
        assert snapshot(client, self.uid) == self.before


@pytest.fixture
def seeded(client: httpx.Client, user_id: str) -> Seeded:
    return seed(client, user_id)


def seed(client: httpx.Client, user_id: str) -> Seeded:
    r = client.post("/score", json=score_body(user_id))
    assert r.status_code == 200
    out = r.json()
    r = client.post(
        "/reward",
        json={**reward_body(user_id), "tip_id": out["tip_id"], "event_id": out["event_id"]},
    )
    assert r.status_code == 200
    before = snapshot(client, user_id)
    assert json.loads(before[0])["pulls"] == 1
    assert json.loads(before[0])["reward_count"] == 1
    assert len(json.loads(before[1])["history"]) == 1
    return Seeded(user_id, before)


# ── field cases: (endpoint, path of the field, bad value) ──────────────────────
def _cases() -> list[Any]:
    cases: list[Any] = []

    def add(endpoint: str, path: tuple[str | int, ...], value: Any, name: str) -> None:
        cases.append(pytest.param(endpoint, path, value, id=f"{endpoint[1:]}-{name}"))

    feature_bad: list[tuple[str, Any, str]] = [
        ("hour_of_day", -1, "hour-neg"),
        ("hour_of_day", 24, "hour-24"),
        ("hour_of_day", 12.5, "hour-fraction"),
        ("hour_of_day", "noon", "hour-str"),
        ("hour_of_day", None, "hour-null"),
        ("priority", 0, "priority-0"),
        ("priority", 5, "priority-5"),
        ("priority", 2.5, "priority-fraction"),
        ("priority", "high", "priority-str"),
        ("task_age_days", -0.001, "age-neg"),
        ("task_age_days", "old", "age-str"),
        ("task_age_days", [], "age-list"),
        ("is_overdue", "maybe", "overdue-str"),
        ("is_overdue", {}, "overdue-object"),
    ]
    for field, value, name in feature_bad:
        add("/score", ("candidates", 0, "features", field), value, f"candidate-{name}")
        add("/reward", ("features", field), value, name)
    add("/score", ("candidates", 0, "features"), "none", "candidate-features-str")
    add("/reward", ("features",), None, "features-null")
    add("/reward", ("features",), MISSING, "features-missing")

    for value, name in [
        (-1, "neg"),
        (24, "24"),
        (9.5, "fraction"),
        ("nine", "str"),
        (None, "null"),
    ]:
        add("/score", ("context", "hour_of_day"), value, f"context-hour-{name}")
    for value, name in [(-1, "neg"), (7, "7"), ("mon", "str")]:
        add("/score", ("context", "day_of_week"), value, f"context-day-{name}")
    add("/score", ("context",), [9, 2], "context-list")

    for value, name in [
        (1.0001, "above-1"),
        (-1.0001, "below-minus-1"),
        (2, "2"),
        (-100, "minus-100"),
        ("lots", "str"),
        (None, "null"),
        ([1], "list"),
        (MISSING, "missing"),
    ]:
        add("/reward", ("reward",), value, f"reward-{name}")
    for value, name in [("", "empty"), ("t" * 257, "257"), (7, "int"), (MISSING, "missing")]:
        add("/reward", ("tip_id",), value, f"tip-id-{name}")
    for value, name in [("", "empty"), ("e" * 65, "65"), (12, "int")]:
        add("/reward", ("event_id",), value, f"event-id-{name}")

    bad_users: list[tuple[Any, str]] = [
        ("", "empty"),
        ("a/b", "slash"),
        ("a b", "space"),
        ("ü", "non-ascii"),
        ("u" * 257, "257"),
        ("a%2Fb", "percent"),
        ("a\nb", "newline"),
        ("u\n", "trailing-newline"),
        (".", "dot"),
        ("..", "dot-dot"),
        (42, "int"),
        (None, "null"),
        (MISSING, "missing"),
    ]
    for endpoint in ("/score", "/reward"):
        for value, name in bad_users:
            add(endpoint, ("user_id",), value, f"user-id-{name}")
        add(endpoint, WHOLE_BODY, [], "body-list")
        add(endpoint, WHOLE_BODY, "text", "body-str")

    candidate = {"id": "t9", "content": "c", "source": "s"}
    add("/score", ("candidates",), [], "candidates-empty")
    add("/score", ("candidates",), MISSING, "candidates-missing")
    add("/score", ("candidates",), None, "candidates-null")
    add("/score", ("candidates",), candidate, "candidates-object")
    add("/score", ("candidates",), [candidate, {**candidate, "content": "x"}], "candidates-dup-ids")
    too_many = [{"id": f"t{i}", "content": "c", "source": "s"} for i in range(1001)]
    add("/score", ("candidates",), too_many, "candidates-1001")
    add("/score", ("candidates", 0, "id"), "", "candidate-id-empty")
    add("/score", ("candidates", 0, "id"), "t" * 257, "candidate-id-257")
    add("/score", ("candidates", 0, "id"), MISSING, "candidate-id-missing")
    add("/score", ("candidates", 0, "id"), None, "candidate-id-null")
    add("/score", ("candidates", 0, "content"), MISSING, "candidate-content-missing")
    add("/score", ("candidates", 0, "content"), "c" * 16_385, "candidate-content-too-long")
    add("/score", ("candidates", 0, "source"), MISSING, "candidate-source-missing")
    add("/score", ("candidates", 0, "source"), 3, "candidate-source-int")
    add("/score", ("candidates", 1, "source_id"), 42, "candidate-source-id-int")
    add("/score", ("candidates", 1), "t2", "candidate-str")
    cases += _type_cases()
    return cases


def _type_cases() -> list[Any]:
    """A value of another JSON type than the field's, which the prototype coerced: a string
    or a boolean for a number, a number or a string for a boolean, a number for a string."""
    cases: list[Any] = []

    def add(endpoint: str, path: tuple[str | int, ...], value: Any, name: str) -> None:
        cases.append(pytest.param(endpoint, path, value, id=f"{endpoint[1:]}-type-{name}"))

    for value, name in [(True, "true"), (False, "false"), ("1", "str-1"), ("1.0", "str-1.0")]:
        add("/reward", ("reward",), value, f"reward-{name}")
    wrong_for_feature: list[tuple[str, Any, str]] = [
        ("hour_of_day", "9", "hour-str-9"),
        ("hour_of_day", True, "hour-true"),
        ("hour_of_day", 1e300, "hour-huge-float"),
        ("priority", "4", "priority-str-4"),
        ("priority", True, "priority-true"),
        ("task_age_days", "3", "age-str-3"),
        ("task_age_days", True, "age-true"),
        ("is_overdue", "yes", "overdue-yes"),
        ("is_overdue", "true", "overdue-str-true"),
        ("is_overdue", 1, "overdue-1"),
        ("is_overdue", 0, "overdue-0"),
        ("is_overdue", 1.0, "overdue-1.0"),
    ]
    for field, value, name in wrong_for_feature:
        add("/score", ("candidates", 0, "features", field), value, f"candidate-{name}")
        add("/reward", ("features", field), value, name)
    for value, name in [("9", "str-9"), (True, "true"), (9.5, "fraction")]:
        add("/score", ("context", "hour_of_day"), value, f"context-hour-{name}")
    add("/score", ("context", "day_of_week"), False, "context-day-false")
    add("/score", ("context", "day_of_week"), "1", "context-day-str")
    add("/score", ("explain",), 1, "explain-1")
    add("/score", ("explain",), "true", "explain-str")
    add("/score", ("candidates", 0, "id"), 1, "candidate-id-int")
    add("/score", ("candidates", 0, "content"), True, "candidate-content-true")
    add("/reward", ("tip_id",), True, "tip-id-true")
    add("/reward", ("user_id",), 42.0, "user-id-float")
    return cases


def _expected_loc(path: tuple[str | int, ...]) -> list[str | int]:
    return ["body", *path]


@pytest.mark.parametrize(("endpoint", "path", "value"), _cases())
def test_bad_field_is_422_naming_it_and_changes_nothing(
    client: httpx.Client, seeded: Seeded, endpoint: str, path: tuple[str | int, ...], value: Any
) -> None:
    body = mutated(BODIES[endpoint](seeded.uid), path, value)
    r = client.post(endpoint, json=body)
    locs = error_locs(r, 422)
    assert _expected_loc(path) in locs, locs
    seeded.assert_unchanged(client)


@pytest.mark.parametrize("endpoint", ["/score", "/reward"])
def test_the_unmutated_bodies_are_valid(client: httpx.Client, user_id: str, endpoint: str) -> None:
    # Each case above differs from these bodies in one field only.
    r = client.post(endpoint, json=BODIES[endpoint](user_id))
    assert r.status_code == 200, r.text


# ── strings PostgreSQL's text cannot hold, on both backends ────────────────────
@pytest.fixture(scope="module")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("postgres-server")
    srv = Server(
        db_path=folder / "unused.db",
        port=free_port(),
        workers=1,
        log_path=folder / "server.log",
        url=postgres_url,
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, server: Server) -> Iterator[httpx.Client]:
    """A client of a server on SQLite, then of one on PostgreSQL."""
    srv = server if request.param == "sqlite" else request.getfixturevalue("postgres_server")
    with srv.client() as c:
        yield c


NUL_CASES = [
    pytest.param("/score", ("candidates", 0, "id"), "t\x001", id="candidate-id"),
    pytest.param("/score", ("candidates", 0, "content"), "Renew\x00", id="candidate-content"),
    pytest.param("/score", ("candidates", 0, "source"), "\x00", id="candidate-source"),
    pytest.param("/score", ("candidates", 1, "source_id"), "4\x002", id="candidate-source-id"),
    pytest.param("/reward", ("tip_id",), "t1\x00", id="tip-id"),
    pytest.param("/reward", ("event_id",), "\x00", id="event-id"),
]


@pytest.mark.parametrize(("endpoint", "path", "value"), NUL_CASES)
def test_a_nul_character_is_refused_the_same_on_every_backend(
    any_backend: httpx.Client, user_id: str, endpoint: str, path: tuple[str | int, ...], value: str
) -> None:
    """It was 200 on SQLite and 503 on PostgreSQL, whose text cannot hold U+0000."""
    seeded = seed(any_backend, user_id)
    body = mutated(BODIES[endpoint](user_id), path, value)
    r = any_backend.post(endpoint, json=body)
    assert error_locs(r, 422) == [_expected_loc(path)]
    assert r.json()["detail"][0]["type"] == "string_pattern_mismatch"
    seeded.assert_unchanged(any_backend)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ud800x", "\\udc00\\ud800"])
@pytest.mark.parametrize("endpoint", ["/score", "/reward"])
def test_a_lone_surrogate_is_refused_as_broken_json(
    any_backend: httpx.Client, user_id: str, endpoint: str, escape: str
) -> None:
    """Neither backend could store it (it is not Unicode text); orjson refuses it."""
    seeded = seed(any_backend, user_id)
    raw = json.dumps(BODIES[endpoint](user_id)).replace('"t1"', f'"t1{escape}"', 1)
    assert escape in raw
    r = any_backend.post(endpoint, content=raw, headers={"content-type": "application/json"})
    assert error_locs(r, 422)[0][0] == "body"
    assert r.json()["detail"][0]["type"] == "json_invalid"
    seeded.assert_unchanged(any_backend)


def test_the_schema_states_that_nul_is_refused(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    candidate = schemas["Candidate-Input"]["properties"]
    reward = schemas["RewardRequest"]["properties"]
    for field in (candidate["id"], candidate["content"], candidate["source"], reward["tip_id"]):
        assert field["pattern"] == "^[^\\x00]*$", field
    for field in (candidate["source_id"], reward["event_id"]):
        assert any(s.get("pattern") == "^[^\\x00]*$" for s in field["anyOf"]), field


# ── JSON that is not JSON: NaN, Infinity, out-of-range numbers, broken text ───
RAW_SCORE = (
    '{"user_id": "%s", "context": {"hour_of_day": 9},'
    ' "candidates": [{"id": "t1", "content": "c", "source": "s",'
    ' "features": {"task_age_days": %s}}]}'
)
RAW_SCORE_HOUR = (
    '{"user_id": "%s", "context": {"hour_of_day": %s},'
    ' "candidates": [{"id": "t1", "content": "c", "source": "s"}]}'
)
RAW_REWARD = '{"user_id": "%s", "tip_id": "t1", "reward": %s, "features": {}}'
RAW_REWARD_AGE = '{"user_id": "%s", "tip_id": "t1", "reward": 1, "features": {"task_age_days": %s}}'
LITERALS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "nan", "inf"]


def _raw_cases() -> list[Any]:
    cases = []
    for literal in LITERALS:
        for endpoint, template, name in [
            ("/score", RAW_SCORE, "age"),
            ("/score", RAW_SCORE_HOUR, "hour"),
            ("/reward", RAW_REWARD, "reward"),
            ("/reward", RAW_REWARD_AGE, "age"),
        ]:
            cases.append(
                pytest.param(endpoint, template, literal, id=f"{endpoint[1:]}-{name}-{literal}")
            )
    return cases


@pytest.mark.parametrize(("endpoint", "template", "literal"), _raw_cases())
def test_non_finite_json_literals_are_refused(
    client: httpx.Client, seeded: Seeded, endpoint: str, template: str, literal: str
) -> None:
    raw = (template % (seeded.uid, literal)).encode()
    r = client.post(endpoint, content=raw, headers={"content-type": "application/json"})
    locs = error_locs(r, 422)
    assert locs[0][0] == "body"
    assert r.json()["detail"][0]["type"] == "json_invalid"
    seeded.assert_unchanged(client)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": ',
        b"{'user_id': 'x'}",
        b'{"user_id": "x",}',
        b"\xff\xfe\x00",
        b"[1, 2",
    ],
    ids=["truncated", "single-quotes", "trailing-comma", "not-utf8", "unclosed-list"],
)
@pytest.mark.parametrize("endpoint", ["/score", "/reward"])
def test_broken_json_is_422(
    client: httpx.Client, seeded: Seeded, endpoint: str, raw: bytes
) -> None:
    r = client.post(endpoint, content=raw, headers={"content-type": "application/json"})
    locs = error_locs(r, 422)
    assert locs[0][0] == "body"
    assert r.json()["detail"][0]["type"] == "json_invalid"
    seeded.assert_unchanged(client)


@pytest.mark.parametrize("endpoint", ["/score", "/reward"])
def test_empty_body_is_422(client: httpx.Client, seeded: Seeded, endpoint: str) -> None:
    r = client.post(endpoint, content=b"", headers={"content-type": "application/json"})
    assert ["body"] in error_locs(r, 422)
    seeded.assert_unchanged(client)


# ── user ids in paths ────────────────────────────────────────────────────────
def _path_cases() -> list[Any]:
    cases = []
    for method, prefix in [("GET", "/stats/"), ("GET", "/features/"), ("POST", "/reset/")]:
        name = prefix.strip("/")
        for suffix, case in [
            ("", "empty"),
            ("a%20b", "space"),
            ("a%2Fb", "encoded-slash"),
            ("{uid}%2Fx", "user-encoded-slash"),
            ("{uid}/x", "user-slash"),
            ("{uid}/", "user-trailing-slash"),
            ("{uid}%20", "user-trailing-space"),
            ("{uid}%0A", "user-trailing-newline"),
            ("{uid}%00", "user-nul"),
            ("%C3%BC", "non-ascii"),
            ("%2E", "encoded-dot"),
            ("%2E%2E", "encoded-dot-dot"),
            ("u" * 257, "257"),
        ]:
            cases.append(pytest.param(method, prefix + suffix, id=f"{name}-{case}"))
    return cases


@pytest.mark.parametrize(("method", "path"), _path_cases())
def test_bad_user_id_in_path_is_422(
    client: httpx.Client, seeded: Seeded, method: str, path: str
) -> None:
    r = client.request(method, path.replace("{uid}", seeded.uid))
    seeded.assert_unchanged(client)  # first: a reset of the seeded user shows here
    assert ["path", "user_id"] in error_locs(r, 422)


# ── limits ───────────────────────────────────────────────────────────────────
def _padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes, padded with a field the API ignores."""
    empty = json.dumps({**body, "pad": ""}, separators=(",", ":")).encode()
    assert len(empty) <= size
    return json.dumps({**body, "pad": "x" * (size - len(empty))}, separators=(",", ":")).encode()


def _chunks(data: bytes, size: int = 65_536) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("endpoint", ["/score", "/reward"])
def test_body_over_the_limit_is_413(
    client: httpx.Client, seeded: Seeded, endpoint: str, chunked: bool
) -> None:
    raw = _padded(BODIES[endpoint](seeded.uid), MAX_BODY_BYTES + 1)
    content: bytes | Iterator[bytes] = _chunks(raw) if chunked else raw
    r = client.post(endpoint, content=content, headers={"content-type": "application/json"})
    if chunked:
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.request.headers
    else:
        assert r.request.headers["content-length"] == str(MAX_BODY_BYTES + 1)
    assert error_locs(r, 413) == [["body"]]
    assert r.json()["detail"][0]["type"] == "body_too_large"
    seeded.assert_unchanged(client)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_at_the_limit_is_accepted(client: httpx.Client, user_id: str, chunked: bool) -> None:
    raw = _padded(score_body(user_id), MAX_BODY_BYTES)
    content: bytes | Iterator[bytes] = _chunks(raw) if chunked else raw
    r = client.post("/score", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert client.get(f"/stats/{user_id}").json()["pulls"] == 1


def test_candidate_limit_follows_the_setting(server_factory: Any, user_id: str) -> None:
    small = server_factory(env={"OO_MAX_CANDIDATES": "5"})
    with small.client() as client:
        six = [{"id": f"t{i}", "content": "c", "source": "s"} for i in range(6)]
        r = client.post("/score", json={"user_id": user_id, "candidates": six})
        assert ["body", "candidates"] in error_locs(r, 422)
        assert client.get(f"/stats/{user_id}").json()["pulls"] == 0

        r = client.post("/score", json={"user_id": user_id, "candidates": six[:5]})
        assert r.status_code == 200, r.text
        assert client.get(f"/stats/{user_id}").json()["pulls"] == 1

        spec = client.get("/openapi.json").json()
        score_schema = spec["components"]["schemas"]["ScoreRequest"]
        assert score_schema["properties"]["candidates"]["maxItems"] == 5


# ── whatever the values, a 200 or a 422, never a 5xx ─────────────────────────
ODD_VALUES: list[Any] = [None, [], {}, "", "x", True, -1, 0, 10**6, 1.5, -0.0, 2**63, "9" * 400]


def _field_paths(body: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(body, dict):
        items: Any = body.items()
    elif isinstance(body, list):
        items = enumerate(body)
    else:
        return [prefix]
    paths = [prefix] if prefix else []
    for key, value in items:
        paths += _field_paths(value, (*prefix, key))
    return paths


@pytest.mark.parametrize("endpoint", ["/score", "/reward"])
def test_odd_values_anywhere_never_fail_the_server(
    client: httpx.Client, user_id: str, endpoint: str
) -> None:
    body = BODIES[endpoint](user_id)
    answers: dict[int, int] = {}
    for path in _field_paths(body):
        if path == ("user_id",):
            continue  # keep every accepted request on this test's user
        for value in ODD_VALUES:
            r = client.post(endpoint, json=mutated(body, path, value))
            answers[r.status_code] = answers.get(r.status_code, 0) + 1
            assert r.status_code in (200, 422), (path, value, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json")
            if r.status_code == 422:
                assert any(loc[0] == "body" for loc in error_locs(r, 422))
    assert answers.get(422, 0) > 0
    assert answers.get(200, 0) > 0
