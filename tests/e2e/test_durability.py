"""`kill -9` of every server under load: nothing acknowledged is lost, nothing is torn.

On SQLite: one server with two workers. On PostgreSQL: two replicas on one database,
and the database itself restarted while they are down.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import Server
from tests.e2e.faults_support import local_cluster_version, pg_ctlcluster, wait_for_postgres

pytestmark = pytest.mark.slow

USERS = [f"durable-{i}" for i in range(8)]
KILL_AFTER_ACKS = 400
MAX_SECONDS = 60.0


async def _load_until_killed(servers: list[Server]) -> dict[str, list[str]]:
    """Score then reward in loops for every user, over every server; kill -9 them all
    mid-load. Returns, per user, the event_ids whose reward was acknowledged."""
    acked: dict[str, list[str]] = {u: [] for u in USERS}
    total = 0
    stop = asyncio.Event()
    deadline = time.monotonic() + MAX_SECONDS

    async def worker(client: httpx.AsyncClient, user: str) -> None:
        nonlocal total
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
                acked[user].append(decision["event_id"])
                total += 1
                if total >= KILL_AFTER_ACKS and not stop.is_set():
                    for server in servers:  # mid-load: other requests are in flight
                        server.kill9()
                    stop.set()

    clients = [httpx.AsyncClient(base_url=s.base_url, timeout=10.0) for s in servers]
    try:
        await asyncio.gather(
            *(worker(clients[i % len(clients)], u) for u in USERS for i in range(4))
        )
    finally:
        for c in clients:
            await c.aclose()
    assert stop.is_set(), "the load ended before the servers were killed"
    return acked


def _check_every_acknowledged_reward(server: Server, acked: dict[str, list[str]]) -> None:
    with server.client() as client:
        for user in USERS:
            stats = client.get(f"/stats/{user}")
            assert stats.status_code == 200, stats.text
            body = stats.json()
            # In-flight rewards may have committed without their answer arriving: >=.
            assert body["reward_count"] >= len(acked[user]), (user, body)
            assert body["pulls"] >= body["reward_count"]
            history = client.get(f"/features/{user}").json()["history"]
            tips = {h["event_id"]: h["tip_id"] for h in history}
            # Every acknowledged event is stored as rewarded: a repeat is not learned again.
            for event_id in acked[user][-20:]:
                again = client.post(
                    "/reward",
                    json={"user_id": user, "tip_id": tips[event_id], "reward": 1.0,
                          "features": {}, "event_id": event_id},
                )  # fmt: skip
                assert again.status_code == 200, again.text
                assert again.json()["learned"] is False
            # The user is still writable after the crash.
            assert client.post(f"/reset/{user}").status_code == 200


def test_kill9_under_load_loses_no_acknowledged_reward_on_sqlite(server_factory, tmp_path) -> None:
    db_path = tmp_path / "durable.db"
    acked = asyncio.run(_load_until_killed([server_factory(workers=2, db_path=db_path)]))
    _check_every_acknowledged_reward(server_factory(db_path=db_path), acked)


def _restart_local_postgres(url: str) -> None:
    """Restart the PostgreSQL cluster behind `url`, when it is this machine's own."""
    version = local_cluster_version(url)
    restarted = pg_ctlcluster(version, "restart")
    assert restarted.returncode == 0, restarted.stderr
    assert wait_for_postgres(url), "PostgreSQL did not come back after its restart"


@pytest.mark.alone  # restarts the cluster every other test's database is on
def test_kill9_of_two_replicas_and_a_database_restart_lose_nothing(
    server_factory, fresh_postgres_url: str
) -> None:
    replicas = [server_factory(database_url=fresh_postgres_url) for _ in range(2)]
    acked = asyncio.run(_load_until_killed(replicas))
    _restart_local_postgres(fresh_postgres_url)
    _check_every_acknowledged_reward(server_factory(database_url=fresh_postgres_url), acked)
