"""`kill -9` of the whole server under load: nothing acknowledged is lost, nothing is torn."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

USERS = [f"durable-{i}" for i in range(8)]
KILL_AFTER_ACKS = 400
MAX_SECONDS = 60.0


async def _load_until_killed(server: Server) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Score then reward in loops for every user; kill -9 the server mid-load.

    Returns, per user, the rewards acknowledged and the event_ids acknowledged by /reward.
    """
    acked_rewards = dict.fromkeys(USERS, 0)
    acked_events: dict[str, list[str]] = {u: [] for u in USERS}
    total_acks = 0
    stop = asyncio.Event()
    deadline = time.monotonic() + MAX_SECONDS

    async def worker(client: httpx.AsyncClient, user: str) -> None:
        nonlocal total_acks
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                scored = await client.post(
                    "/score",
                    json={
                        "user_id": user,
                        "candidates": [
                            {"id": "a", "content": "a", "source": "t", "features": {"priority": 4}},
                            {"id": "b", "content": "b", "source": "t"},
                        ],
                    },
                )
                if scored.status_code != 200:
                    continue
                decision = scored.json()
                rewarded = await client.post(
                    "/reward",
                    json={
                        "user_id": user,
                        "tip_id": decision["tip_id"],
                        "reward": 1.0,
                        "features": {},
                        "event_id": decision["event_id"],
                    },
                )
            except httpx.TransportError:
                continue  # the server is gone: this request was never acknowledged
            if rewarded.status_code == 200:
                acked_rewards[user] += 1
                acked_events[user].append(decision["event_id"])
                total_acks += 1
                if total_acks >= KILL_AFTER_ACKS and not stop.is_set():
                    server.kill9()  # mid-load: other workers' requests are in flight
                    stop.set()

    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
        await asyncio.gather(*(worker(client, u) for u in USERS for _ in range(4)))
    assert stop.is_set(), "the load ended before the server was killed"
    return acked_rewards, acked_events


def test_kill9_under_load_loses_no_acknowledged_reward(server_factory, tmp_path) -> None:
    db_path = tmp_path / "durable.db"
    server: Server = server_factory(workers=2, db_path=db_path)
    acked_rewards, acked_events = asyncio.run(_load_until_killed(server))

    restarted: Server = server_factory(workers=1, db_path=db_path)
    with restarted.client() as client:
        for user in USERS:
            stats = client.get(f"/stats/{user}")
            assert stats.status_code == 200, stats.text
            body = stats.json()
            # In-flight rewards may have committed without their answer arriving: >=.
            assert body["reward_count"] >= acked_rewards[user], (user, body)
            assert body["pulls"] >= body["reward_count"]
            assert client.get(f"/features/{user}").status_code == 200
            # Every acknowledged event is stored as rewarded: a repeat is not learned again.
            for event_id in acked_events[user][-5:]:
                again = client.post(
                    "/reward",
                    json={
                        "user_id": user,
                        "tip_id": _tip_of(client, user, event_id),
                        "reward": 1.0,
                        "features": {},
                        "event_id": event_id,
                    },
                )
                assert again.status_code == 200, again.text
                assert again.json()["learned"] is False
            # The user is still writable after the crash.
            assert client.post(f"/reset/{user}").status_code == 200


def _tip_of(client: httpx.Client, user: str, event_id: str) -> str:
    history = client.get(f"/features/{user}").json()["history"]
    return next(h["tip_id"] for h in history if h["event_id"] == event_id)
