"""Many concurrent requests for one user, on two worker processes sharing one SQLite file.

Every acknowledged update must be counted exactly once: no lost update, no 5xx.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from tests.oracle import closed_form, vector_of

pytestmark = pytest.mark.slow

N_REWARDS = 500
N_SCORES = 500
REWARD_VALUES = (1.0, 0.5, 0.0, -0.5, -1.0)


async def _burst(base_url: str, requests: list[tuple[str, dict[str, object]]]) -> list[int]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:

        async def send(path: str, body: dict[str, object]) -> int:
            return (await client.post(path, json=body)).status_code

        return await asyncio.gather(*(send(path, body) for path, body in requests))


def test_concurrent_rewards_and_scores_on_two_workers_lose_nothing(server_factory) -> None:
    server: Server = server_factory(workers=2)
    rng = random.Random(20261127)
    user = "concurrent-user"
    rewards = []
    for _ in range(N_REWARDS):
        features = {
            "hour_of_day": rng.randrange(24),
            "is_overdue": rng.random() < 0.5,
            "task_age_days": rng.uniform(0, 40),
            "priority": rng.randint(1, 4),
        }
        # The reward's tip is never offered by a /score here, so each one is learned on
        # the features it carries and the expected model is order-independent.
        rewards.append(
            {
                "user_id": user,
                "tip_id": "rewarded-tip",
                "reward": rng.choice(REWARD_VALUES),
                "features": features,
            }
        )
    scores = [
        {
            "user_id": user,
            "candidates": [{"id": f"s-{i}", "content": "task", "source": "test"} for i in range(3)],
            "context": {"hour_of_day": rng.randrange(24)},
        }
        for _ in range(N_SCORES)
    ]
    requests = [("/reward", body) for body in rewards] + [("/score", body) for body in scores]
    rng.shuffle(requests)

    statuses = asyncio.run(_burst(server.base_url, requests))

    assert sorted(set(statuses)) == [200], {s: statuses.count(s) for s in set(statuses)}
    with server.client() as client:
        stats = client.get(f"/stats/{user}").json()
        history = client.get(f"/features/{user}").json()["history"]
    assert stats["reward_count"] == N_REWARDS
    assert stats["pulls"] == N_SCORES
    assert stats["cumulative_reward"] == pytest.approx(sum(r["reward"] for r in rewards), abs=1e-9)
    assert len(history) == 100
    assert len({h["event_id"] for h in history}) == 100

    expected = closed_form((vector_of(r["features"]), r["reward"]) for r in rewards)
    np.testing.assert_allclose(stats["theta"], expected.theta, atol=1e-9)
