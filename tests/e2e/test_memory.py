"""A worker keeps no per-user state: its memory does not grow with the number of users."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

WARM_USERS = 1_000
MORE_USERS = 10_000
# The prototype kept about 1.5 KB per user in memory: 10,000 users would be ~15 MB.
# Allowed here: SQLite's page cache filling (2 MiB per connection) and allocator noise.
MAX_GROWTH_BYTES = 8 * 1024 * 1024


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _touch_users(base_url: str, first: int, count: int) -> None:
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(first, first + count):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                body = {
                    "user_id": f"mem-{n}",
                    "candidates": [{"id": "a", "content": "a", "source": "t"}],
                }
                response = await client.post("/score", json=body)
                assert response.status_code == 200, response.text

        await asyncio.gather(*(worker() for _ in range(32)))


def test_worker_memory_does_not_grow_with_users(server_factory) -> None:
    server: Server = server_factory(workers=1, env={"OO_SQLITE_SYNCHRONOUS": "normal"})
    assert server.proc is not None
    asyncio.run(_touch_users(server.base_url, 0, WARM_USERS))
    before = _rss_bytes(server.proc.pid)
    asyncio.run(_touch_users(server.base_url, WARM_USERS, MORE_USERS))
    after = _rss_bytes(server.proc.pid)
    with server.client() as client:
        assert client.get(f"/stats/mem-{WARM_USERS + MORE_USERS - 1}").json()["pulls"] == 1
    assert after - before < MAX_GROWTH_BYTES, (before, after)
