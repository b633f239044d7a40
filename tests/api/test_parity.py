"""The server reproduces the prototype's maths, decision by decision.

`Reference` restates the prototype's LinUCB in the prototype's own way (A kept, inverted
with numpy at each score, candidates scored in order with a strict `>`), and a seeded
random sequence of /score and /reward is played against it and against the real server.
"""

from __future__ import annotations

import math
import random
from typing import Any

import httpx
import numpy as np
import pytest
from tests.oracle import closed_form, vector_of

ALPHA = 1.0
D = 5
REWARDS = (1.0, 0.5, 0.0, -0.5, -1.0)
# Two scores closer than this are a tie of the maths, not of the rounding.
NUMERICAL_TIE = 1e-12


class Reference:
    """One user of the prototype: A = I, b = 0, θ = A⁻¹b, ties to the first candidate."""

    def __init__(self) -> None:
        self.observed: list[tuple[np.ndarray, float]] = []
        self.pulls = 0
        self.reward_count = 0
        self.cumulative_reward = 0.0

    def scores(self, candidates: list[dict[str, Any]], hour: int) -> list[float]:
        model = closed_form(self.observed)
        return [
            model.score(vector_of({**c["features"], "hour_of_day": hour}), ALPHA)
            for c in candidates
        ]

    def choose(self, scores: list[float]) -> int:
        best, best_score = 0, -math.inf
        for i, s in enumerate(scores):
            if s > best_score:
                best, best_score = i, s
        self.pulls += 1
        return best

    def reward(self, features: dict[str, Any], r: float) -> None:
        self.observed.append((vector_of(features), r))
        self.reward_count += 1
        self.cumulative_reward += r

    @property
    def theta(self) -> np.ndarray:
        return closed_form(self.observed).theta


def random_features(rng: random.Random) -> dict[str, Any]:
    age = rng.choice([0.0, 0.5, 30.0, 45.0, round(rng.uniform(0.0, 40.0), 3)])
    return {
        "hour_of_day": rng.randrange(24),  # validated, never scored
        "is_overdue": rng.random() < 0.5,
        "task_age_days": age,
        "priority": rng.randint(1, 4),
    }


def random_candidates(rng: random.Random, step: int) -> list[dict[str, Any]]:
    ids = rng.sample([f"tip-{i}" for i in range(12)], rng.randint(3, 8))
    candidates = [
        {"id": tip, "content": f"task {tip}", "source": "todoist", "features": random_features(rng)}
        for tip in ids
    ]
    if rng.random() < 0.5:  # a later candidate copies an earlier one's features: a tie
        i = rng.randrange(len(candidates) - 1)
        j = rng.randrange(i + 1, len(candidates))
        copied = dict(candidates[i]["features"])
        if rng.random() < 0.5:
            copied["hour_of_day"] = (copied["hour_of_day"] + 5) % 24
        candidates[j]["features"] = copied
    if step == 0:  # the very first decision: every candidate the same
        for c in candidates[1:]:
            c["features"] = dict(candidates[0]["features"])
    return candidates


def scored_vector(candidate: dict[str, Any], hour: int) -> tuple[float, ...]:
    return tuple(vector_of({**candidate["features"], "hour_of_day": hour}))


def expected_choice(
    ref: Reference, candidates: list[dict[str, Any]], hour: int, tip_id: str
) -> tuple[int, float]:
    """The reference's choice, and its score.

    Candidates with the same vector must go to the first of them. Only when two
    *different* vectors score equal up to rounding may the server pick either.
    """
    scores = ref.scores(candidates, hour)
    index = ref.choose(scores)
    served = next((i for i, c in enumerate(candidates) if c["id"] == tip_id), None)
    assert served is not None, f"server chose {tip_id!r}, not a candidate"
    if served != index:
        vectors = [scored_vector(c, hour) for c in candidates]
        first_of_its_vector = vectors.index(vectors[served]) == served
        near_tie = abs(scores[served] - scores[index]) <= NUMERICAL_TIE
        assert first_of_its_vector, f"server chose a later duplicate: {served} vs {index}"
        assert near_tie, (
            f"server chose {served} scoring {scores[served]!r}, reference {index} {scores[index]!r}"
        )
        index = served
    return index, scores[index]


@pytest.mark.parametrize("seed", [7, 2024, 31337])
def test_random_sequence_matches_reference(client: httpx.Client, user_id: str, seed: int) -> None:
    rng = random.Random(seed)
    ref = Reference()
    decisions: list[tuple[str, float, str]] = []
    for step in range(60):
        hour = rng.randrange(24)
        candidates = random_candidates(rng, step)
        body = {
            "user_id": user_id,
            "candidates": candidates,
            "context": {"hour_of_day": hour, "day_of_week": rng.randrange(7)},
        }
        r = client.post("/score", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        index, ref_score = expected_choice(ref, candidates, hour, out["tip_id"])
        assert out["tip_id"] == candidates[index]["id"], f"step {step}"
        assert out["score"] == pytest.approx(ref_score, rel=0, abs=1e-9), f"step {step}"
        decisions.append((out["tip_id"], out["score"], out["event_id"]))

        if rng.random() < 0.75:
            # The chosen tip's features as scored: the context hour replaces its own.
            features = {**candidates[index]["features"], "hour_of_day": hour}
            value = rng.choice(REWARDS)
            r = client.post(
                "/reward",
                json={
                    "user_id": user_id,
                    "tip_id": out["tip_id"],
                    "reward": value,
                    "features": features,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json() == {
                "ok": True,
                "learned": True,
                "event_id": out["event_id"],
                "kept": value,
                "late": False,
                "received": value,
                "repeat": False,
                "reward_n": 1,
                "aggregation": None,
            }
            ref.reward(features, value)
        if rng.random() < 0.1:
            # A tip never decided on: learned on the request's features.
            features = random_features(rng)
            value = rng.choice(REWARDS)
            r = client.post(
                "/reward",
                json={
                    "user_id": user_id,
                    "tip_id": f"unseen-{step}",
                    "reward": value,
                    "features": features,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json() == {
                "ok": True,
                "learned": True,
                "event_id": None,
                "kept": value,
                "late": False,
                "received": value,
                "repeat": False,
                "reward_n": None,
                "aggregation": None,
            }
            ref.reward(features, value)

    r = client.get(f"/stats/{user_id}")
    assert r.status_code == 200
    stats = r.json()
    assert stats["pulls"] == ref.pulls == 60
    assert stats["reward_count"] == ref.reward_count
    assert stats["cumulative_reward"] == pytest.approx(ref.cumulative_reward, rel=0, abs=1e-9)
    mean = ref.cumulative_reward / ref.reward_count if ref.reward_count else 0.0
    assert stats["estimated_mean"] == pytest.approx(mean, rel=0, abs=1e-9)
    assert stats["estimated_mean_reward"] == stats["estimated_mean"]
    np.testing.assert_allclose(stats["theta"], ref.theta, rtol=0, atol=1e-9)

    r = client.get(f"/features/{user_id}")
    assert r.status_code == 200
    history = r.json()["history"]
    assert [(h["tip_id"], h["score"], h["event_id"]) for h in history] == decisions


def test_all_equal_candidates_choose_the_first(client: httpx.Client, user_id: str) -> None:
    # Learn something first, so that scores are not the plain norm of x.
    features = {"hour_of_day": 9, "is_overdue": True, "task_age_days": 3.0, "priority": 2}
    r = client.post(
        "/reward",
        json={"user_id": user_id, "tip_id": "x", "reward": 0.5, "features": features},
    )
    assert r.status_code == 200
    ref = Reference()
    ref.reward(features, 0.5)
    for n in (2, 5, 8, 33):
        candidates = [
            {"id": f"c{i}", "content": "", "source": "s", "features": dict(features)}
            for i in range(n)
        ]
        r = client.post(
            "/score",
            json={"user_id": user_id, "candidates": candidates, "context": {"hour_of_day": 9}},
        )
        assert r.status_code == 200
        assert r.json()["tip_id"] == "c0"
        assert r.json()["score"] == pytest.approx(ref.scores(candidates, 9)[0], abs=1e-9)
