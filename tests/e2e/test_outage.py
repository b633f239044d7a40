"""PostgreSQL goes away and comes back: 503s in the meantime, recovery without a restart,
and nothing acknowledged is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from tests.conftest import Server
from tests.e2e.pgproxy import CuttableProxy
from tests.support import metric

pytestmark = pytest.mark.slow

RECOVERY_DEADLINE_S = 60.0


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[CuttableProxy]:
    parts = urlsplit(postgres_url)
    p = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield p
    p.close()


def _through(postgres_url: str, proxy: CuttableProxy) -> str:
    parts = urlsplit(postgres_url)
    netloc = (
        f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


def _reward(client: httpx.Client, user: str) -> httpx.Response:
    body = {"user_id": user, "tip_id": "t", "reward": 1.0, "features": {}}
    return client.post("/reward", json=body)


def _until_recovered(client: httpx.Client, user: str) -> int:
    """Send rewards until one is acknowledged; how many were refused before it."""
    refused = 0
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while time.monotonic() < deadline:
        r = _reward(client, user)
        if r.status_code == 200:
            return refused
        assert r.status_code == 503, r.text
        refused += 1
        time.sleep(0.2)
    raise AssertionError(f"no recovery within {RECOVERY_DEADLINE_S}s")


def test_database_outage_answers_503_then_recovers(
    server_factory, postgres_url: str, proxy: CuttableProxy, user_id: str
) -> None:
    server: Server = server_factory(database_url=_through(postgres_url, proxy))
    acked = 0
    with server.client(timeout=15.0) as client:
        for _ in range(20):
            assert _reward(client, user_id).status_code == 200
            acked += 1

        proxy.cut()
        during = [_reward(client, user_id) for _ in range(5)]
        health = client.get("/health")
        ready = client.get("/ready")
        proxy.restore()

        # Alive, but not ready: an orchestrator keeps the process and stops routing to it.
        assert health.status_code == 200
        assert ready.status_code == 503, ready.text
        assert ready.json()["detail"][0]["type"].startswith("store_")
        # Every request during the outage is refused with a JSON 503 (not a 500, not a hang).
        assert [r.status_code for r in during] == [503] * 5
        assert all(r.json()["detail"][0]["type"].startswith("store_") for r in during)
        assert all(r.headers.get("retry-after") == "1" for r in during)

        _until_recovered(client, user_id)
        acked += 1
        for _ in range(20):
            assert _reward(client, user_id).status_code == 200
            acked += 1
        stats = client.get(f"/stats/{user_id}").json()
        assert client.get("/ready").status_code == 200
        metrics = client.get("/metrics").text
    # The failures were counted where an operator looks for them.
    assert metric(metrics, "oo_store_errors_total", op="reward_tx") >= 5
    # Refused requests wrote nothing: the count is exactly what was acknowledged.
    assert stats["reward_count"] == acked


def test_terminated_backends_are_replaced_without_a_restart(
    server_factory, postgres_url: str, user_id: str
) -> None:
    server: Server = server_factory(database_url=postgres_url)
    acked = 0
    statuses: list[int] = []
    with server.client(timeout=15.0) as client:
        for _ in range(10):
            assert _reward(client, user_id).status_code == 200
            acked += 1
        dbname = urlsplit(postgres_url).path.lstrip("/")
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()) AS t",
                (dbname,),
            ).fetchone()
        assert killed is not None
        assert killed[0] >= 1
        for _ in range(30):
            r = _reward(client, user_id)
            statuses.append(r.status_code)
            acked += r.status_code == 200
        stats = client.get(f"/stats/{user_id}").json()
    assert set(statuses) <= {200, 503}
    assert statuses[-10:] == [200] * 10  # recovered by itself
    assert stats["reward_count"] == acked


def test_a_silent_network_answers_503_within_the_deadline_not_a_hang(
    server_factory, postgres_url: str, proxy: CuttableProxy, user_id: str
) -> None:
    # Deadline for one database call: pool wait 1 s + two statements of 1 s + 1 s = 4 s.
    server: Server = server_factory(
        database_url=_through(postgres_url, proxy),
        env={"OO_PG_POOL_TIMEOUT_S": "1", "OO_PG_STATEMENT_TIMEOUT_MS": "1000"},
    )
    with server.client(timeout=30.0) as client:
        assert _reward(client, user_id).status_code == 200
        proxy.freeze()
        frozen = _reward(client, user_id)
        assert client.get("/health").status_code == 200
        proxy.restore()
        assert frozen.status_code == 503, frozen.text
        _until_recovered(client, user_id)
