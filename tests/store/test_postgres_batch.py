"""PostgreSQL's group commit: concurrent score writes of different users in one transaction.

Each test runs on a database of its own, its stores opened and closed inside one
`asyncio.run`. Whether writes shared a transaction is read from the decisions' xmin (the
id of the transaction that inserted them): fewer ids than decisions means batches.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from tests.e2e.pgproxy import CuttableProxy
from tests.store.support import make_write, next_pull

from oo_serving.errors import StoreUnavailable, Unavailable
from oo_serving.settings import Settings
from oo_serving.store.base import Replay, ScoreWrite, UserRecord
from oo_serving.store.factory import open_store
from oo_serving.store.postgres import PostgresStore


class Boom(Exception):
    pass


@pytest.fixture
def pg_url(fresh_postgres_url: str) -> str:
    """A database of this test's own, its schema made."""

    async def migrate() -> None:
        store = open_store(Settings(database_url=fresh_postgres_url))
        await store.open()
        await store.close()

    asyncio.run(migrate())
    return fresh_postgres_url


def postgres_store(url: str) -> PostgresStore:
    store = open_store(Settings(database_url=url))
    assert isinstance(store, PostgresStore)
    return store


def decisions(url: str) -> dict[str, list[tuple[int, str]]]:
    """Every user's logged (seq, event_id), in seq order."""
    out: dict[str, list[tuple[int, str]]] = {}
    with psycopg.connect(url) as conn:
        for user_id, seq, event_id in conn.execute(
            "SELECT user_id, seq, event_id FROM decision ORDER BY user_id, seq"
        ):
            out.setdefault(user_id, []).append((seq, event_id))
    return out


def pulls(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT user_id, pulls FROM user_model").fetchall())


def transactions(url: str, user_ids: list[str]) -> int:
    """How many transactions inserted these users' decisions."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM decision WHERE user_id = ANY(%s)", (user_ids,)
        ).fetchone()
    assert row is not None
    return int(row[0])


async def with_stores(
    urls: list[str], scenario: Callable[[list[PostgresStore]], Awaitable[None]]
) -> None:
    stores = [postgres_store(url) for url in urls]
    for s in stores:
        await s.open(migrate=False)
    try:
        await scenario(stores)
    finally:
        for s in stores:
            await s.close()


def test_concurrent_writes_of_distinct_and_repeated_users_count_exactly(pg_url: str) -> None:
    users = [f"u{i:02d}" for i in range(24)]
    per_user = 8
    events = {u: [f"{u}-e{k}" for k in range(per_user)] for u in users}
    acked: list[ScoreWrite] = []

    async def scenario(stores: list[PostgresStore]) -> None:
        store = stores[0]
        writes = [
            store.score_tx(u, next_pull(u, events[u][k])) for k in range(per_user) for u in users
        ]
        acked.extend(await asyncio.gather(*writes))
        assert store._turns == {}  # the per-user queues emptied
        assert not store._queue

    asyncio.run(with_stores([pg_url], scenario))

    assert pulls(pg_url) == {u: per_user for u in users}
    logged = decisions(pg_url)
    for u in users:
        assert [seq for seq, _ in logged[u]] == list(range(1, per_user + 1))
        # A user's writes ran in the order they were made, one after another.
        assert [event for _, event in logged[u]] == events[u]
    assert sorted(w.decision.event_id for w in acked) == sorted(e for u in users for e in events[u])
    assert transactions(pg_url, users) < len(users) * per_user  # some writes shared one


def test_a_write_whose_function_raises_fails_alone_in_its_batch(pg_url: str) -> None:
    users = [f"b{i}" for i in range(10)]
    old, new = "b3", "b7"  # b3 has a model already; b7 is new

    def boom(_user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        raise Boom

    async def scenario(stores: list[PostgresStore]) -> None:
        store = stores[0]
        await store.score_tx(old, next_pull(old, "old-1"))
        outcomes = await asyncio.gather(
            *(
                store.score_tx(u, boom if u in (old, new) else next_pull(u, uuid.uuid4().hex))
                for u in users
            ),
            return_exceptions=True,
        )
        for u, outcome in zip(users, outcomes, strict=True):
            if u in (old, new):
                assert isinstance(outcome, Boom), outcome
            else:
                assert isinstance(outcome, ScoreWrite), outcome
                assert outcome.user.user_id == u

    asyncio.run(with_stores([pg_url], scenario))

    others = [u for u in users if u not in (old, new)]
    assert pulls(pg_url) == {**{u: 1 for u in others}, old: 1}  # no row made for b7
    assert decisions(pg_url)[old] == [(1, "old-1")]
    assert transactions(pg_url, others) < len(others)  # they did share a transaction


def test_a_write_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_stored(
    pg_url: str,
) -> None:
    """One write's decision clashes with a logged one (its seq is taken): the batch's
    transaction is refused, rolled back, and each write made again alone."""
    users = [f"c{i}" for i in range(8)]
    clasher = "c5"

    def clash(user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        write = next_pull(clasher, "clash")(user, None)
        return ScoreWrite(write.user, make_write(clasher, 1, "clash").decision, 1)  # seq 1

    async def scenario(stores: list[PostgresStore]) -> None:
        store = stores[0]
        await store.score_tx(clasher, next_pull(clasher, "first"))
        outcomes = await asyncio.gather(
            *(
                store.score_tx(u, clash if u == clasher else next_pull(u, uuid.uuid4().hex))
                for u in users
            ),
            return_exceptions=True,
        )
        for u, outcome in zip(users, outcomes, strict=True):
            if u == clasher:
                assert isinstance(outcome, StoreUnavailable), outcome
            else:
                assert isinstance(outcome, ScoreWrite), outcome

    asyncio.run(with_stores([pg_url], scenario))

    assert pulls(pg_url) == {u: 1 for u in users}
    assert decisions(pg_url)[clasher] == [(1, "first")]


def test_two_replicas_writing_the_same_users_lose_no_update(pg_url: str) -> None:
    """Two stores (two pools, as two replicas) write the same few users at once: their
    batches overlap on every user, and every write is counted once, in some order."""
    users = [f"h{i}" for i in range(12)]
    per_store = 150
    acked: list[ScoreWrite] = []

    async def scenario(stores: list[PostgresStore]) -> None:
        writes = [
            store.score_tx(u, next_pull(u, uuid.uuid4().hex))
            for k in range(per_store)
            for store in stores
            for u in [users[(k * 5 + stores.index(store)) % len(users)]]
        ]
        acked.extend(await asyncio.gather(*writes))

    asyncio.run(with_stores([pg_url, pg_url], scenario))

    assert len(acked) == 2 * per_store
    written: dict[str, int] = {}
    for w in acked:
        written[w.user.user_id] = written.get(w.user.user_id, 0) + 1
    assert pulls(pg_url) == written
    logged = decisions(pg_url)
    for u, n in written.items():
        assert [seq for seq, _ in logged[u]] == list(range(1, n + 1))
    assert {e for rows in logged.values() for _, e in rows} == {w.decision.event_id for w in acked}


def through(url: str, proxy: CuttableProxy) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))


def test_a_connection_cut_between_a_batchs_round_trips_acknowledges_nothing_unstored(
    pg_url: str,
) -> None:
    """The network goes while a batch's functions run, its rows locked: every write of it
    is answered 503, none is stored, and the store writes again once the network is back."""
    parts = urlsplit(pg_url)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    users = [f"k{i}" for i in range(16)]
    cutter = users[4]
    outcomes: list[ScoreWrite | BaseException] = []

    def cut_then_write(user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        proxy.cut()  # after the first round trip, before the second
        return next_pull(cutter, "cut")(user, None)

    async def scenario(stores: list[PostgresStore]) -> None:
        store = stores[0]
        for u in users:  # every user has one decision, written before the cut
            await store.score_tx(u, next_pull(u, f"{u}-before"))
        outcomes.extend(
            await asyncio.gather(
                *(
                    store.score_tx(
                        u, cut_then_write if u == cutter else next_pull(u, uuid.uuid4().hex)
                    )
                    for u in users
                ),
                return_exceptions=True,
            )
        )
        proxy.restore()
        after = await store.score_tx(cutter, next_pull(cutter, "after"))  # works again
        assert after.decision.seq == 2

    try:
        asyncio.run(with_stores([through(pg_url, proxy)], scenario))
    finally:
        proxy.close()

    acked = [o for o in outcomes if isinstance(o, ScoreWrite)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert refused, "the cut hit no write"
    assert all(isinstance(o, Unavailable) for o in refused), refused
    logged = decisions(pg_url)
    stored = {e for rows in logged.values() for _, e in rows}
    assert {w.decision.event_id for w in acked} <= stored  # acknowledged => stored
    assert "cut" not in stored
    # Nothing stored that a user's row does not count, and every row counts what is logged.
    assert pulls(pg_url) == {u: len(rows) for u, rows in logged.items()}
    assert logged[cutter] == [(1, f"{cutter}-before"), (2, "after")]
