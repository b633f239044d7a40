"""Which PostgreSQL driver for the store: psycopg 3 (pipeline mode) or asyncpg?

Runs the /score write (ensure the user's row, lock it, update it, log the decision, prune)
as the store does it with each driver, on one database, alternating the contenders in
rounds so that machine drift hits both alike, and prints writes per second and their
ratio: first one write a transaction (a reward's path, and a score write made alone),
then the store's group commit, BATCH users' writes a transaction (two batches in flight,
as the store runs them). Usage:

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
from typing import Any

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
BATCH = 32
BATCHES_AT_ONCE = 2
STATE = np.concatenate([np.identity(5).ravel(), np.zeros(5)]).tobytes()
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
                "SELECT policy, state, state_version, pulls, reward_count, cumulative_reward,"
                " last_updated_ms FROM user_model WHERE user_id = %s FOR UPDATE",
                (user,),
            )
            await p.sync()
            row = await cur.fetchone()
        assert row is not None
        pulls = int(row[3]) + 1
        async with conn.pipeline():
            await conn.execute(
                "UPDATE user_model SET policy = %s, state = %s, state_version = 1, pulls = %s,"
                " last_updated_ms = %s WHERE user_id = %s",
                ("linucb-v1", STATE, pulls, 0, user),
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
            "SELECT policy, state, state_version, pulls, reward_count, cumulative_reward,"
            " last_updated_ms FROM user_model WHERE user_id = $1 FOR UPDATE",
            user,
        )
        pulls = int(row["pulls"]) + 1
        await conn.execute(
            "UPDATE user_model SET policy = $1, state = $2, state_version = 1, pulls = $3,"
            " last_updated_ms = $4 WHERE user_id = $5",
            "linucb-v1", STATE, pulls, 0, user,
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


_ENSURE = (
    "INSERT INTO user_model (user_id) SELECT u FROM unnest({}::text[]) AS u ORDER BY u"
    " ON CONFLICT (user_id) DO NOTHING RETURNING user_id"
)
_LOCK = (
    "SELECT user_id, pulls FROM user_model WHERE user_id = ANY({}) ORDER BY user_id"
    " FOR UPDATE SKIP LOCKED"
)
_UPDATE = (
    "UPDATE user_model SET policy = {}, state = {}, state_version = 1, pulls = {},"
    " last_updated_ms = 0 WHERE user_id = {}"
)
_INSERT = (
    "INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score,"
    " policy, propensity, model_version, candidate_ids, candidate_x)"
    " VALUES ({}, {}, {}, 0, 't0', '{{}}'::jsonb, {}, 1.0, 'linucb-v1', 1.0, 0, {}, {})"
)
_PRUNE = "DELETE FROM decision WHERE user_id = {} AND seq < {}"
_PG = ("%s",) * 6
_APG = tuple(f"${i}" for i in range(1, 7))


def batch_params(rows: list[tuple[str, int]]) -> tuple[list[Any], list[Any], list[Any]]:
    """The second round trip's parameters for locked (user_id, pulls) rows."""
    ids = [f"t{i}" for i in range(10)]
    updates = [("linucb-v1", STATE, p + 1, u) for u, p in rows]
    inserts = [(u, p + 1, str(uuid.uuid4()), B, ids, X) for u, p in rows]
    prunes = [(u, p + 1 - 999) for u, p in rows]
    return updates, inserts, prunes


async def psycopg_batch(pool: AsyncConnectionPool, users: list[str]) -> int:
    """The store's group commit: BATCH users in one transaction, two round trips."""
    async with pool.connection() as conn:
        async with conn.pipeline() as p:
            await conn.execute("BEGIN")
            await conn.execute(_ENSURE.format(*_PG), (users,))
            cur = await conn.execute(_LOCK.format(*_PG), (users,))
            await p.sync()
            rows = [(r[0], int(r[1])) for r in await cur.fetchall()]
        updates, inserts, prunes = batch_params(rows)
        async with conn.cursor() as c, conn.pipeline():
            await c.executemany(_UPDATE.format(*_PG), updates)
            await c.executemany(_INSERT.format(*_PG), inserts)
            await c.executemany(_PRUNE.format(*_PG), prunes)
            await c.execute("COMMIT")
    return len(rows)


async def asyncpg_batch(pool: asyncpg.Pool, users: list[str]) -> int:
    """The same with asyncpg: a round trip per statement (executemany sends its rows at
    once), seven a batch."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_ENSURE.format(*_APG), users)
        found = await conn.fetch(_LOCK.format(*_APG), users)
        rows = [(r["user_id"], int(r["pulls"])) for r in found]
        updates, inserts, prunes = batch_params(rows)
        await conn.executemany(_UPDATE.format(*_APG), updates)
        await conn.executemany(_INSERT.format(*_APG), inserts)
        await conn.executemany(_PRUNE.format(*_APG), prunes)
    return len(rows)


Op = Callable[[int, int], Awaitable[int]]


async def measure(op: Op, concurrency: int) -> float:
    """Writes per second: `concurrency` tasks each calling op(task, n) in a loop; op
    answers how many writes it made."""
    done = 0
    deadline = time.perf_counter() + SECONDS

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            done += await op(w, n)
            n += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - start)


def one(write: Callable[[str, int], Awaitable[None]]) -> Op:
    async def op(w: int, n: int) -> int:
        await write(f"bench-{(w * 7919 + n) % USERS}", n)
        return 1

    return op


def batched(write: Callable[[list[str]], Awaitable[int]]) -> Op:
    """Each task writes its own share of the users, BATCH at a time: the batches in flight
    hold distinct users, as one process's do."""
    share = USERS // BATCHES_AT_ONCE

    async def op(w: int, n: int) -> int:
        first = w * share
        users = [f"bench-{first + (n * BATCH + i) % share}" for i in range(BATCH)]
        return await write(sorted(set(users)))

    return op


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
        cells: list[tuple[str, int, dict[str, Op]]] = [
            (
                "one write a transaction",
                c,
                {
                    "psycopg": one(lambda u, s: psycopg_pipeline(pg_pool, u, s)),
                    "asyncpg": one(lambda u, s: asyncpg_tx(pool, u, s)),
                },
            )
            for c in CONCURRENCY
        ]
        cells.append(
            (
                f"{BATCH} writes a transaction",
                BATCHES_AT_ONCE,
                {
                    "psycopg": batched(lambda users: psycopg_batch(pg_pool, users)),
                    "asyncpg": batched(lambda users: asyncpg_batch(pool, users)),
                },
            )
        )
        print("| path | tasks | psycopg 3, pipelined | asyncpg | psycopg ÷ asyncpg |")
        print("|---|---|---|---|---|")
        for path, c, contenders in cells:
            results: dict[str, list[float]] = {k: [] for k in contenders}
            for _ in range(ROUNDS):
                for label, op in contenders.items():
                    results[label].append(await measure(op, c))
            medians = [statistics.median(v) for v in results.values()]
            text = " | ".join(f"{m:,.0f} writes/s" for m in medians)
            print(f"| {path} | {c} | {text} | {medians[0] / medians[1]:.2f} |")
        await pool.close()
        await pg_pool.close()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres")
    )
