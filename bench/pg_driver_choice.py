"""Which PostgreSQL driver for the store: psycopg 3 (pipeline mode) or asyncpg?

Runs the /score write (ensure the user's row, lock it, update it, log the decision, prune)
as the store does it with each driver, on one database, alternating the contenders in
rounds so that machine drift hits both alike, and prints transactions per second and
their ratio. Usage:

    .venv/bin/pip install -c requirements.lock -e ".[bench]"
    .venv/bin/python bench/pg_driver_choice.py postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg  # type: ignore[import-not-found]
import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool

from oo_serving.settings import Settings
from oo_serving.store.factory import open_store

CONCURRENCY = (1, 16)
ROUNDS = 3
SECONDS = 3.0
USERS = 1000
A = np.identity(5).tobytes()
B = np.zeros(5).tobytes()
X = np.zeros((10, 5)).tobytes()


async def psycopg_pipeline(pool: AsyncConnectionPool, user: str, seq: int) -> None:
    """The statements as the store sends them: two pipelined round trips."""
    async with pool.connection() as conn:
        async with conn.pipeline() as p:
            await conn.execute("BEGIN")
            await conn.execute(
                "INSERT INTO user_model (user_id) VALUES (%s) ON CONFLICT (user_id) DO NOTHING",
                (user,),
            )
            cur = await conn.execute(
                "SELECT policy, a_inv, b, pulls, reward_count, cumulative_reward, last_updated_ms"
                " FROM user_model WHERE user_id = %s FOR UPDATE",
                (user,),
            )
            await p.sync()
            row = await cur.fetchone()
        assert row is not None
        pulls = int(row[3]) + 1
        async with conn.pipeline():
            await conn.execute(
                "UPDATE user_model SET policy = %s, a_inv = %s, b = %s, pulls = %s,"
                " last_updated_ms = %s WHERE user_id = %s",
                ("linucb-v1", A, B, pulls, 0, user),
            )
            await conn.execute(
                "INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score,"
                " policy, propensity, model_version, candidate_ids, candidate_x)"
                " VALUES (%s, %s, %s, 0, 't0', '{}'::jsonb, %s, 1.0, 'linucb-v1', 1.0, 0, %s, %s)",
                (user, pulls, str(uuid.uuid4()), B, [f"t{i}" for i in range(10)], X),
            )
            await conn.execute(
                "DELETE FROM decision WHERE user_id = %s AND seq < %s", (user, pulls - 999)
            )
            await conn.execute("COMMIT")


async def asyncpg_tx(pool: asyncpg.Pool, user: str, seq: int) -> None:
    """The same statements with asyncpg: one round trip each (it has no pipeline)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO user_model (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING", user
        )
        row = await conn.fetchrow(
            "SELECT policy, a_inv, b, pulls, reward_count, cumulative_reward, last_updated_ms"
            " FROM user_model WHERE user_id = $1 FOR UPDATE",
            user,
        )
        pulls = int(row["pulls"]) + 1
        await conn.execute(
            "UPDATE user_model SET policy = $1, a_inv = $2, b = $3, pulls = $4,"
            " last_updated_ms = $5 WHERE user_id = $6",
            "linucb-v1", A, B, pulls, 0, user,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score,"
            " policy, propensity, model_version, candidate_ids, candidate_x)"
            " VALUES ($1, $2, $3, 0, 't0', '{}'::jsonb, $4, 1.0, 'linucb-v1', 1.0, 0, $5, $6)",
            user, pulls, str(uuid.uuid4()), B, [f"t{i}" for i in range(10)], X,
        )  # fmt: skip
        await conn.execute(
            "DELETE FROM decision WHERE user_id = $1 AND seq < $2", user, pulls - 999
        )


async def measure(op: Callable[[str, int], Awaitable[None]], concurrency: int) -> float:
    done = 0
    deadline = time.perf_counter() + SECONDS

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            await op(f"bench-{(w * 7919 + n) % USERS}", n)
            n += 1
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - start)


async def main(admin_url: str) -> None:
    name = f"oo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        store = open_store(Settings(database_url=url))
        await store.open()  # creates the schema
        await store.close()
        pg_pool = AsyncConnectionPool(url, min_size=16, max_size=16, open=False,
                                      kwargs={"autocommit": True})  # fmt: skip
        await pg_pool.open(wait=True)
        pool = await asyncpg.create_pool(url, min_size=16, max_size=16)
        contenders = {
            "psycopg 3, pipelined (2 trips)": lambda u, s: psycopg_pipeline(pg_pool, u, s),
            "asyncpg (6 trips)": lambda u, s: asyncpg_tx(pool, u, s),
        }
        print("| concurrency | " + " | ".join(contenders) + " | psycopg ÷ asyncpg |")
        print("|---|---|---|---|")
        for c in CONCURRENCY:
            results: dict[str, list[float]] = {k: [] for k in contenders}
            for _ in range(ROUNDS):
                for label, op in contenders.items():
                    results[label].append(await measure(op, c))
            medians = [statistics.median(v) for v in results.values()]
            cells = " | ".join(f"{m:,.0f} tx/s" for m in medians)
            print(f"| {c} | {cells} | {medians[0] / medians[1]:.2f} |")
        await pool.close()
        await pg_pool.close()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres")
    )
