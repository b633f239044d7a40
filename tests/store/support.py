"""What the store tests share: one event loop for every store call, records made by hand,
and reads and writes behind a store's back (SQL on the SQL backends, the tables of a
memory store's database).

A store is bound to the loop that opened it (a PostgreSQL pool's tasks live there), so
every fixture and test drives its store through `run`, on one loop of its own thread.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Coroutine
from contextlib import AsyncExitStack, closing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import psycopg
import pytest
from psycopg.types.json import Jsonb

from oo_serving.core.features import D, TaskFeatures
from oo_serving.core.linucb import LinUCBState
from oo_serving.core.registry import DEFAULTS
from oo_serving.errors import StoreBusy
from oo_serving.service import Candidate, Service
from oo_serving.settings import Settings
from oo_serving.store import migrations
from oo_serving.store.base import (
    EXPORTS_AT_ONCE,
    DecisionLookup,
    DecisionMark,
    DecisionRecord,
    DecisionRef,
    Replay,
    RewardWrite,
    ScoreFn,
    ScoreWrite,
    Store,
    UserRecord,
)
from oo_serving.store.factory import open_store
from oo_serving.store.memory import MemoryStore
from oo_serving.store.postgres import _SCHEMA_TABLE
from oo_serving.store.sqlite import SQLiteStore

T = TypeVar("T")


class _LoopThread:
    """One event loop on its own thread for the whole module.

    A store is bound to the loop that opened it (a PostgreSQL pool's tasks live there), so
    every call a test makes runs on this one loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)


_loop: _LoopThread | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    global _loop
    if _loop is None:
        _loop = _LoopThread()
    return _loop.run(coro)


def loop() -> asyncio.AbstractEventLoop:
    """The loop every store call runs on."""
    run(asyncio.sleep(0))
    assert _loop is not None
    return _loop.loop


def sqlite_store_at(path: Path, busy_timeout_ms: int = 5000) -> SQLiteStore:
    """A SQLite store on `path`, not yet opened."""
    store = open_store(
        Settings(database_url=f"sqlite:///{path}", sqlite_busy_timeout_ms=busy_timeout_ms)
    )
    assert isinstance(store, SQLiteStore)
    return store


# ── records made by hand ─────────────────────────────────────────────────────

FEATURES = {"hour_of_day": 9, "is_overdue": True, "task_age_days": 2.5, "priority": 3}
CONTEXT = {"hour_of_day": 9, "day_of_week": 1}
V1 = DEFAULTS["linucb-v1"]


def v1_state(A_inv: np.ndarray | None = None, b: np.ndarray | None = None) -> bytes:
    """A linucb-v1 state as stored: A⁻¹ (identity by default), then b (zeros)."""
    return V1.encode(
        LinUCBState(
            A_inv=np.identity(D) if A_inv is None else A_inv, b=np.zeros(D) if b is None else b
        )
    )


def v1_arrays(user: UserRecord | None) -> LinUCBState:
    """A stored linucb-v1 model's (A⁻¹, b)."""
    assert user is not None
    assert (user.policy, user.state_version) == ("linucb-v1", 1)
    state: LinUCBState = V1.decode(user.state, user.state_version)
    return state


def make_user(
    user_id: str,
    *,
    pulls: int = 1,
    reward_count: int = 0,
    cumulative_reward: float = 0.0,
    state: bytes | None = None,
    ts: int = 1_000,
) -> UserRecord:
    return UserRecord(
        user_id=user_id,
        policy="linucb-v1",
        state=v1_state() if state is None else state,
        state_version=1,
        pulls=pulls,
        reward_count=reward_count,
        cumulative_reward=cumulative_reward,
        last_updated_ms=ts,
    )


def make_decision(
    user_id: str,
    seq: int,
    event_id: str,
    *,
    tip_id: str = "tip-a",
    x: np.ndarray | None = None,
    score: float = 0.5,
    features: dict[str, Any] | None = None,
) -> DecisionRecord:
    x = np.full(D, seq / 8.0) if x is None else x
    features = dict(FEATURES) if features is None else features
    raw = np.array([list(features.values()), [seq % 24, 0, 0.5, 1]], dtype=np.float64)
    return DecisionRecord(
        user_id=user_id,
        seq=seq,
        event_id=event_id,
        ts_ms=1_000 + seq,
        tip_id=tip_id,
        features=features,
        x=x,
        score=score,
        policy="linucb-v1",
        propensity=1.0,
        model_version=0,
        candidate_ids=(tip_id, "other"),
        candidate_X=np.stack([x, -x]),
        candidate_features=raw,
        context=dict(CONTEXT),
    )


def log_decision(
    store: Store,
    user_id: str,
    seq: int,
    event_id: str,
    *,
    tip_id: str = "tip-a",
    x: np.ndarray | None = None,
    keep_from_seq: int = 1,
    features: dict[str, Any] | None = None,
) -> ScoreWrite:
    """One score transaction that writes the user at pulls=seq and logs one decision."""
    write = ScoreWrite(
        user=make_user(user_id, pulls=seq),
        decision=make_decision(user_id, seq, event_id, tip_id=tip_id, x=x, features=features),
        keep_from_seq=keep_from_seq,
    )
    return run(store.score_tx(user_id, lambda _user, _replay: write))


def reward_decision(
    store: Store, user_id: str, event_id: str, reward: float, ts: int
) -> RewardWrite:
    """One reward transaction that marks event_id rewarded (and writes the user as is)."""

    def fn(user: UserRecord | None, ref: DecisionRef | None, _replay: Replay | None) -> RewardWrite:
        assert user is not None
        assert ref is not None
        return RewardWrite(user, mark(event_id, reward, ts), event_id)

    return run(store.reward_tx(user_id, DecisionLookup(tip_id=None, event_id=event_id), fn))


def mark(event_id: str, reward: float, ts: int) -> DecisionMark:
    """The columns of a decision's first reward, learned as the user's first update."""
    return DecisionMark(event_id, reward, ts, 1, True, 1, "client", reward_n_before=0)


def peek(store: Store, user_id: str, lookup: DecisionLookup) -> DecisionRef | None:
    """The decision a reward would join to, through a reward transaction that writes nothing."""
    seen: list[DecisionRef | None] = []

    def look(
        _user: UserRecord | None, ref: DecisionRef | None, _replay: Replay | None
    ) -> RewardWrite:
        seen.append(ref)
        return RewardWrite(None, None, None)

    run(store.reward_tx(user_id, lookup, look))
    return seen[0]


def event_ids_of(store: Store, user_id: str) -> list[str]:
    return [h.event_id for h in run(store.history(user_id, 1_000_000))]


def assert_same_user(a: UserRecord | None, b: UserRecord | None) -> None:
    assert a is not None
    assert b is not None
    assert a.user_id == b.user_id
    assert a.policy == b.policy
    assert type(a.state) is bytes
    assert a.state == b.state
    assert a.state_version == b.state_version
    assert (a.pulls, a.reward_count, a.cumulative_reward, a.last_updated_ms) == (
        b.pulls,
        b.reward_count,
        b.cumulative_reward,
        b.last_updated_ms,
    )


def execute(store: Store, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on the store's database, behind the store's back (`?` placeholders on
    both SQL backends); its rows."""
    assert not isinstance(store, MemoryStore), "a memory store has no SQL"
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path, isolation_level=None)) as conn:
            return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    dsn = store.dsn  # type: ignore[attr-defined]
    with psycopg.connect(dsn, autocommit=True) as pg:
        cur = pg.execute(sql.replace("?", "%s").encode(), params)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def reopened(store: Store) -> Store:
    """A second store on the same database, opened."""
    other: Store
    if isinstance(store, MemoryStore):
        other = MemoryStore(store.database)
    elif isinstance(store, SQLiteStore):
        other = sqlite_store_at(store.path)
    else:
        other = open_store(Settings(database_url=store.dsn))  # type: ignore[attr-defined]
    run(other.open())
    return other


def assert_write_locked(store: Store, user_id: str) -> None:
    """Another connection cannot take the user's lock now: a transaction holds it (of
    a memory store: its database's one lock)."""
    if isinstance(store, MemoryStore):
        assert store.database.lock.locked()
        return
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path, timeout=0, isolation_level=None)
        with closing(conn), pytest.raises(sqlite3.OperationalError, match="locked"):
            conn.execute("BEGIN IMMEDIATE")
        return
    dsn = store.dsn  # type: ignore[attr-defined]
    with (
        psycopg.connect(dsn, autocommit=True) as pg,
        pytest.raises(psycopg.errors.LockNotAvailable),
    ):
        pg.execute("SELECT 1 FROM user_model WHERE user_id = %s FOR UPDATE NOWAIT", (user_id,))


def export_all(store: Store, user_id: str) -> tuple[UserRecord | None, list[DecisionRecord]]:
    async def read() -> tuple[UserRecord | None, list[DecisionRecord]]:
        async with store.export_user(user_id) as export:
            return export.user, [d async for page in export.pages for d in page]

    return run(read())


def make_write(
    user_id: str, seq: int, event_id: str | None = None, keep_from_seq: int = 1
) -> ScoreWrite:
    """A /score write: the user at `seq` pulls, its decision at `seq`."""
    decision = make_decision(user_id, seq, event_id or f"e{seq}")
    return ScoreWrite(make_user(user_id, pulls=seq), decision, keep_from_seq)


def next_pull(user_id: str, event_id: str, keep: int = 1000) -> ScoreFn:
    """A score function as the service's: the user's next pull, keeping `keep` decisions."""

    def fn(row: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        seq = (row.pulls if row else 0) + 1
        return make_write(user_id, seq, event_id, keep_from_seq=seq - keep + 1)

    return fn


def f64(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


# ── the service on a real store ──────────────────────────────────────────────


def task(hour: int, overdue: bool, age: float, priority: int) -> TaskFeatures:
    return TaskFeatures(hour_of_day=hour, is_overdue=overdue, task_age_days=age, priority=priority)


def make_service(store: Store, **kwargs: Any) -> Service:
    counter = itertools.count(1)
    clock = itertools.count(1_000)
    return Service(
        store,
        event_ids=lambda: f"ev-{next(counter)}",
        clock_ms=lambda: next(clock),
        **kwargs,
    )


CANDIDATES = [
    Candidate("tip-small", task(12, False, 0, 1)),
    Candidate("tip-big", task(6, True, 30, 4)),
    Candidate("tip-mid", task(18, False, 15, 2)),
]
OTHER_FEATURES = task(3, False, 1, 2)


# ── a database at schema 2 (migration 0003) ──────────────────────────────────


def prototype_models() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """linucb-v1 models as schema 2 stored them, (A⁻¹, b), sound (so the check passes)
    and with bytes that a text conversion would break: NULs (every 0.0), invalid UTF-8,
    subnormals, -0.0."""
    odd = np.frombuffer(bytes([0xC3, 0x28, 0x00, 0xFF, 0x00, 0x80, 0xF0, 0x3F]), dtype="<f8")[0]
    learned = LinUCBState(np.identity(D), np.zeros(D))
    for x, r in [(f64(0.0, 1.0, 1.0, 0.5, 1.0), 1.0), (f64(0.5, 0.0, 0.0, 1 / 3, 0.0), -0.5)]:
        learned = V1.update(learned, x, r)
    return {
        "diagonal": (
            np.diag([1 / 3, 5e-324, 1.0, odd, np.nextafter(1.0, 0.0)]),
            f64(0.0, -0.0, np.pi, -1e308, 1e-310),
        ),
        "learned": (learned.A_inv, learned.b),
        "fresh": (np.identity(D), np.zeros(D)),
    }


def database_at_schema_2(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database made by this project's migrations 1 and 2, applied by hand, holding
    prototype_models() (one decision each), and on PostgreSQL a row never filled."""
    old = migrations.load(backend)[:2]
    user_sql = (
        "INSERT INTO user_model (user_id, policy, a_inv, b, pulls, reward_count,"
        " cumulative_reward, last_updated_ms) VALUES (?, 'linucb-v1', ?, ?, 1, 1, 0.5, 77)"
    )
    decision_sql = (
        "INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x, score,"
        " policy, propensity, model_version, candidate_ids, candidate_x, reward, rewarded_ms)"
        " VALUES (?, 1, ?, 10, 'a', ?, ?, 0.5, 'linucb-v1', 1.0, 0, ?, ?, 0.5, 20)"
    )
    x = f64(0.0, 1.0, 1.0, 0.5, 1.0)
    if backend == "sqlite":
        path = tmp_path / "v2.db"
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            for migration in old:
                conn.executescript(migration.sql)
            conn.execute("PRAGMA user_version = 2")
            for user_id, (A_inv, b) in prototype_models().items():
                conn.execute(user_sql, (user_id, A_inv.tobytes(), b.tobytes()))
                conn.execute(
                    decision_sql,
                    (user_id, f"ev-{user_id}", orjson.dumps(FEATURES).decode(), x.tobytes(),
                     '["a", "b"]', np.stack([x, -x]).tobytes()),
                )  # fmt: skip
        return f"sqlite:///{path}"
    url = str(request.getfixturevalue("fresh_postgres_url"))
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(_SCHEMA_TABLE)
        for migration in old:
            pg.execute(migration.sql.encode())
            pg.execute(
                "INSERT INTO oo_schema_version (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        for user_id, (A_inv, b) in prototype_models().items():
            pg.execute(user_sql.replace("?", "%s"), (user_id, A_inv.tobytes(), b.tobytes()))
            pg.execute(
                decision_sql.replace("?", "%s"),
                (user_id, f"ev-{user_id}", Jsonb(FEATURES), x.tobytes(), ["a", "b"],
                 np.stack([x, -x]).tobytes()),
            )  # fmt: skip
        pg.execute("INSERT INTO user_model (user_id) VALUES ('never-filled')")
    return url


def assert_exports_beyond_the_slots_answer_busy(store: Store) -> None:
    """EXPORTS_AT_ONCE exports of an opened store are held; one more answers StoreBusy
    within the store's (short) wait instead of waiting forever; then the slots are free.
    Closes the store."""

    async def one_too_many() -> None:
        async with AsyncExitStack() as held:
            for _ in range(EXPORTS_AT_ONCE):
                await held.enter_async_context(store.export_user("u1"))
            with pytest.raises(StoreBusy, match="exports"):
                async with asyncio.timeout(10):
                    await held.enter_async_context(store.export_user("u1"))
        async with store.export_user("u1") as export:  # the slots are free again
            assert export.user is None

    try:
        run(one_too_many())
    finally:
        run(store.close())
