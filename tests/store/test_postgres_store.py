"""What only the PostgreSQL store does: its per-user turns in the process, the row lock
that orders an erasure and a write, and its indexes."""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
from tests.store.support import event_ids_of, log_decision, loop, make_write, run

from oo_serving.core.features import TaskFeatures
from oo_serving.service import Candidate, Service
from oo_serving.settings import Settings
from oo_serving.store.base import Replay, ScoreWrite, UserRecord
from oo_serving.store.factory import open_store
from oo_serving.store.postgres import PostgresStore


def test_postgres_keeps_no_per_user_state_after_a_burst(postgres_url: str) -> None:
    """The in-process queue per user (PostgreSQL's) empties: memory does not grow with users."""
    store = open_store(Settings(database_url=postgres_url))
    run(store.open())
    service = Service(store)
    candidates = [Candidate(id="a", features=TaskFeatures(9, False, 0.0, 1))]
    users = [f"burst-{uuid.uuid4().hex[:8]}-{i}" for i in range(7)]

    async def burst() -> None:
        await asyncio.gather(
            *(service.score(users[i % 7], candidates) for i in range(70)),
            *(service.reward(users[i % 7], "a", 1.0, candidates[0].features) for i in range(70)),
        )

    try:
        run(burst())
        assert [run(store.get_user(u)).pulls for u in users] == [10] * 7  # type: ignore[union-attr]
        assert [run(store.get_user(u)).reward_count for u in users] == [10] * 7  # type: ignore[union-attr]
        assert store._turns == {}  # type: ignore[attr-defined]
    finally:
        run(store.close())


def test_postgres_erasure_between_a_writes_insert_and_its_lock_starts_a_fresh_user(
    postgres_url: str,
) -> None:
    """The race that left users stuck: a write's INSERT … ON CONFLICT finds the row, an
    erasure commits, then the write's SELECT … FOR UPDATE finds none. Made deterministic
    by holding the row lock from another connection while the erasure is prepared."""
    store = open_store(Settings(database_url=postgres_url))
    run(store.open())
    user = f"race-{uuid.uuid4().hex[:8]}"
    try:
        log_decision(store, user, 1, "old-1")
        with psycopg.connect(postgres_url, autocommit=False) as eraser:
            eraser.execute("SELECT 1 FROM user_model WHERE user_id = %s FOR UPDATE", (user,))
            seen: list[UserRecord | None] = []

            def fn(u: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
                seen.append(u)
                return make_write(user, (u.pulls if u else 0) + 1)

            pending = asyncio.run_coroutine_threadsafe(store.score_tx(user, fn), loop())
            time.sleep(0.5)  # the write has made sure the row exists and waits for its lock
            assert not pending.done()
            eraser.execute("DELETE FROM user_model WHERE user_id = %s", (user,))
            eraser.execute("DELETE FROM decision WHERE user_id = %s", (user,))
            eraser.commit()
            pending.result(timeout=30)
        assert seen == [None]  # ordered after the erasure: a fresh user
        stored = run(store.get_user(user))
        assert stored is not None
        assert stored.pulls == 1
        assert event_ids_of(store, user) == ["e1"]
        log_decision(store, user, 2, "next")  # not stuck: the next write works
        assert event_ids_of(store, user) == ["e1", "next"]
    finally:
        run(store.close())


# ── pruning by time uses an index ────────────────────────────────────────────


def test_pruning_by_time_uses_the_decision_time_index(postgres_store: PostgresStore) -> None:
    with psycopg.connect(postgres_store.dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
    assert "decision_ts" in names
