"""Several `oo-serving` replicas on one PostgreSQL database: no lost update across them."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

N = 500


async def _spread(
    servers: list[Server], requests: list[tuple[str, dict[str, object]]]
) -> list[int]:
    """Send every request at once, round-robin over the servers; the statuses."""
    clients = [
        httpx.AsyncClient(
            base_url=s.base_url,
            timeout=60.0,
            limits=httpx.Limits(max_connections=len(requests) // len(servers) + 1),
        )
        for s in servers
    ]
    try:

        async def send(i: int, path: str, body: dict[str, object]) -> int:
            return (await clients[i % len(clients)].post(path, json=body)).status_code

        return await asyncio.gather(*(send(i, p, b) for i, (p, b) in enumerate(requests)))
    finally:
        for c in clients:
            await c.aclose()


def _reward(user: str, value: float) -> dict[str, object]:
    return {"user_id": user, "tip_id": "t", "reward": value, "features": {"priority": 2}}


def _score(user: str) -> dict[str, object]:
    return {
        "user_id": user,
        "candidates": [{"id": f"c{i}", "content": "c", "source": "s"} for i in range(4)],
    }


@pytest.fixture
def replicas(server_factory, postgres_url: str) -> list[Server]:
    return [server_factory(database_url=postgres_url, workers=1) for _ in range(2)]


def test_500_concurrent_rewards_across_two_replicas_all_count(replicas, user_id) -> None:
    rng = random.Random(3)
    values = [rng.choice((1.0, 0.5, 0.0, -0.5, -1.0)) for _ in range(N)]
    statuses = asyncio.run(_spread(replicas, [("/reward", _reward(user_id, v)) for v in values]))

    assert statuses == [200] * N
    for server in replicas:  # both replicas read the same model
        with server.client() as client:
            stats = client.get(f"/stats/{user_id}").json()
        assert stats["reward_count"] == N
        assert stats["cumulative_reward"] == pytest.approx(sum(values), abs=1e-9)


def test_mixed_burst_across_two_replicas_counts_exactly(replicas, user_id) -> None:
    requests = [("/reward", _reward(user_id, 0.5)) for _ in range(N // 2)]
    requests += [("/score", _score(user_id)) for _ in range(N // 2)]
    random.Random(5).shuffle(requests)

    statuses = asyncio.run(_spread(replicas, requests))

    assert statuses == [200] * N
    with replicas[0].client() as client:
        stats = client.get(f"/stats/{user_id}").json()
        history = client.get(f"/features/{user_id}").json()["history"]
    assert stats["pulls"] == N // 2
    assert stats["reward_count"] == N // 2
    assert len(history) == 100
    assert len({h["event_id"] for h in history}) == 100
