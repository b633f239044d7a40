"""The fast decoder of /score and /reward accepts only what the strict one accepts, with
the same values; and it does accept the bodies clients send, or it would be no faster."""

from __future__ import annotations

import copy
import math
from typing import Any

import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oo_serving.api.bodies import Bodies

MAX_CANDIDATES = 5
bodies = Bodies(MAX_CANDIDATES)

# Values near every edge the schema draws: types, bounds, integral floats, NUL, newlines.
_numbers = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0.0, 1.0, 9.0, 23.0, 23.5, -0.0, 1e300, 2.0**53, 2**53 + 1, 2**64, -1.5]),
    st.floats(-2, 40, allow_nan=False),
)
_strings = st.one_of(
    st.sampled_from(["u", "user-42", ".", "..", "u\n", "a b", "é", "x\x00", "", "t" * 257]),
    st.text(max_size=6),
)
_values = st.one_of(_numbers, _strings, st.booleans(), st.none(), st.builds(list), st.builds(dict))


_hour = st.integers(0, 23)
_valid_features = st.fixed_dictionaries(
    {},
    optional={
        "hour_of_day": _hour,
        "is_overdue": st.booleans(),
        "task_age_days": st.one_of(st.integers(0, 60), st.floats(0, 60)),
        "priority": st.integers(1, 4),
    },
)
_valid_candidate = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["a", "b", "c", "d", "e", "f"]),
        "content": st.text(max_size=4),
        "source": st.just("todoist"),
    },
    optional={"source_id": st.one_of(st.none(), st.text(max_size=4)), "features": _valid_features},
)
_valid_score = st.fixed_dictionaries(
    {
        "user_id": st.sampled_from(["u", "user-1", "a.b", "x@y", "..."]),
        "candidates": st.lists(
            _valid_candidate, min_size=1, max_size=MAX_CANDIDATES, unique_by=lambda c: c["id"]
        ),
    },
    optional={
        "context": st.fixed_dictionaries(
            {}, optional={"hour_of_day": _hour, "day_of_week": st.integers(0, 6)}
        ),
        "explain": st.booleans(),
    },
)
_valid_reward = st.fixed_dictionaries(
    {
        "user_id": st.sampled_from(["u", "user-1"]),
        "reward": st.one_of(st.integers(-1, 1), st.floats(-1, 1)),
        "tip_id": st.sampled_from(["a", "b"]),
        "features": _valid_features,
    },
    optional={"event_id": st.one_of(st.none(), st.just("e-1"))},
)


@st.composite
def _mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid body, or one with a value somewhere replaced, dropped or added."""
    body = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(0, 2))):
        # Walk to a random object inside the body.
        node = body
        while True:
            children = [v for v in node.values() if isinstance(v, dict)] + [
                item for v in node.values() if isinstance(v, list) for item in v
            ]
            if not children or draw(st.booleans()):
                break
            node = draw(st.sampled_from(children))
        key = draw(st.sampled_from([*node.keys(), "extra"]))
        if draw(st.integers(0, 4)) == 0:
            node.pop(key, None)
        else:
            node[key] = draw(_values)
    return body


_score = _mutated(_valid_score)
_reward = _mutated(_valid_reward)


def _encode(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits: write it by hand
        return str(body).encode()


def _strict(parse: Any, raw: bytes) -> Any:
    try:
        return parse(raw)
    except RequestValidationError:
        return None


def _same(fast: Any, strict: Any) -> bool:
    """Equal values, with floats compared exactly and types of numbers alike."""
    if isinstance(fast, float) or isinstance(strict, float):
        return type(fast) is type(strict) and (fast == strict or math.isnan(fast))
    if isinstance(fast, tuple | list):
        return len(fast) == len(strict) and all(
            _same(a, b) for a, b in zip(fast, strict, strict=True)
        )
    if isinstance(fast, dict):
        return fast.keys() == strict.keys() and all(_same(fast[k], strict[k]) for k in fast)
    return type(fast) is type(strict) and fast == strict


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_score)
def test_what_the_fast_score_decoder_accepts_the_strict_one_accepts_alike(body: Any) -> None:
    raw = _encode(body)
    fast = bodies.fast_score(raw)
    if fast is None:
        return
    strict = _strict(bodies.strict_score, raw)
    assert strict is not None, raw
    assert not strict.unknown
    assert _same(tuple(fast[:4]), tuple(strict[:4])), raw


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_reward)
def test_what_the_fast_reward_decoder_accepts_the_strict_one_accepts_alike(body: Any) -> None:
    raw = _encode(body)
    fast = bodies.fast_reward(raw)
    if fast is None:
        return
    strict = _strict(bodies.strict_reward, raw)
    assert strict is not None, raw
    assert not strict.unknown
    assert _same(tuple(fast[:5]), tuple(strict[:5])), raw


SCORE = {
    "user_id": "user-42",
    "candidates": [
        {
            "id": "task-1",
            "content": "Renew passport",
            "source": "todoist",
            "features": {"is_overdue": True, "task_age_days": 3, "priority": 4},
        },
        {"id": "task-2", "content": "Water the plants", "source": "todoist", "source_id": None},
    ],
    "context": {"hour_of_day": 9, "day_of_week": 1},
}


@pytest.mark.parametrize(
    "body",
    [
        SCORE,
        {**SCORE, "explain": True},
        {"user_id": "u", "candidates": [{"id": "a", "content": "", "source": ""}]},
    ],
)
def test_the_bodies_clients_send_take_the_fast_decoder(body: dict[str, Any]) -> None:
    fast = bodies.fast_score(orjson.dumps(body))
    assert fast is not None
    assert fast.candidates[0].features.hour_of_day == body.get("context", {}).get("hour_of_day", 12)


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u", "reward": 1, "event_id": "e"},
        {"user_id": "u", "reward": -0.5, "tip_id": "a", "features": {"priority": 2}},
        {"user_id": "u", "reward": 0, "tip_id": "a", "features": {}, "event_id": None},
    ],
)
def test_the_rewards_clients_send_take_the_fast_decoder(body: dict[str, Any]) -> None:
    fast = bodies.fast_reward(orjson.dumps(body))
    assert fast is not None
    assert type(fast.reward) is float


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": "u\\n", "candidates": [{"id": "a", "content": "", "source": ""}]}',
        b'{"user_id": "..", "candidates": [{"id": "a", "content": "", "source": ""}]}',
        b'{"user_id": "u", "candidates": [{"id": "a", "content": "", "source": ""},'
        b' {"id": "a", "content": "", "source": ""}]}',
        b'{"user_id": "u", "candidates": [{"id": "a", "content": "", "source": "", "x": 1}]}',
        b'{"user_id": "u", "candidates": [{"id": "a\\u0000", "content": "", "source": ""}]}',
        b'{"user_id": "u", "candidates": [{"id": "a", "content": "", "source": "",'
        b' "features": {"task_age_days": 1e400}}]}',
    ],
)
def test_what_only_the_strict_decoder_may_judge_goes_to_it(raw: bytes) -> None:
    assert bodies.fast_score(raw) is None


def test_a_reward_without_event_id_needs_tip_and_features_on_either_path() -> None:
    raw = b'{"user_id": "u", "reward": 1, "tip_id": "a"}'
    assert bodies.fast_reward(raw) is None
    with pytest.raises(RequestValidationError) as refused:
        bodies.reward(raw)
    assert [e["loc"] for e in refused.value.errors()] == [("body", "features")]
