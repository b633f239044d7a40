"""SQLite runs neighbouring /score writes together: the batch must store exactly what the
writes one by one would have, and fail only the write at fault.

To put writes in one batch, a test holds the writers' flock (as another worker would)
while it queues them: the writer thread waits for the lock with what it has taken, and
every write queued meanwhile goes into its next batch. The statements the writer runs
are traced, so each test also shows that the writes did run together.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.store.support import make_write, next_pull

from oo_serving.core.features import TaskFeatures
from oo_serving.errors import StoreUnavailable
from oo_serving.service import Candidate, Service
from oo_serving.store.base import (
    DecisionLookup,
    DecisionMark,
    Replay,
    ReplayNeeded,
    RewardWrite,
    ScoreWrite,
    UserRecord,
)
from oo_serving.store.sqlite import SQLiteStore

CANDIDATES = [
    Candidate(id="a", features=TaskFeatures(9, False, 0.0, 1)),
    Candidate(id="b", features=TaskFeatures(17, True, 3.0, 4)),
]


class TracedStore(SQLiteStore):
    """The SQLite store, keeping the SQL its writer thread runs (one entry per statement
    run: each row of an executemany is one)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.statements: list[str] = []

    def _new_connection(self, create: bool = False) -> sqlite3.Connection:
        conn = super()._new_connection(create)
        if threading.current_thread().name == "oo-sqlite-write":
            conn.set_trace_callback(self.statements.append)
        return conn

    def ran(self, prefix: str) -> int:
        return sum(1 for s in self.statements if s.lstrip().startswith(prefix))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "batch.db"


def with_store(path: Path, body: Callable[[TracedStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = TracedStore(path)
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


@contextmanager
def writers_locked(store: SQLiteStore) -> Iterator[None]:
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def in_one_batch(store: SQLiteStore, writes: Sequence[Awaitable[Any]]) -> list[Any]:
    """Each write's result or error, the writes queued while the writer waits for the
    lock with a first write of its own, so that they run as its next batch."""
    with writers_locked(store):
        plug = asyncio.ensure_future(store.set_sweep_mark("plug", 1))
        await asyncio.sleep(0.1)  # the writer has taken it, and waits for the lock
        tasks = [asyncio.ensure_future(w) for w in writes]
        await asyncio.sleep(0)  # every write is queued
    await plug
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def fixed(user_id: str, seq: int, event_id: str, keep_from_seq: int) -> Callable[..., ScoreWrite]:
    def fn(_row: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        return make_write(user_id, seq, event_id, keep_from_seq)

    return fn


async def seqs(store: SQLiteStore, user_id: str) -> list[int]:
    return [d.seq for d in reversed(await store.recent_decisions(user_id, 10_000))]


def test_one_user_several_times_in_a_batch_advances_once_per_write(db: Path) -> None:
    """Users who appear several times in one batch (one of them with a stored model) see
    their own earlier writes: pulls advance by exactly the writes, and every decision
    is logged, in order, with the event id its write returned."""

    async def body(store: TracedStore) -> None:
        service = Service(store)
        await service.score("u0", CANDIDATES)  # a stored model, read by the batch
        order = [f"u{i % 4}" for i in range(40)]
        results = await in_one_batch(store, [service.score(u, CANDIDATES) for u in order])
        assert all(not isinstance(r, BaseException) for r in results)
        for u, writes in (("u0", 11), ("u1", 10), ("u2", 10), ("u3", 10)):
            row = await store.get_user(u)
            assert row is not None
            assert row.pulls == writes
            assert await seqs(store, u) == list(range(1, writes + 1))
            logged = [d.event_id for d in reversed(await store.recent_decisions(u, 100))]
            returned = [r.event_id for r, o in zip(results, order, strict=True) if o == u]
            assert logged[-10:] == returned
        assert store.ran("SAVEPOINT scores") == 1  # the 40 writes ran together
        assert store.ran("SELECT user_id,") == 1
        assert store.ran("SAVEPOINT job") == 2  # the first score, the plug: alone

    with_store(db, body)


def test_pruning_in_a_batch_keeps_exactly_the_newest_decisions(db: Path) -> None:
    async def body(store: TracedStore) -> None:
        writes = [store.score_tx("p", next_pull("p", f"ev-{i}", keep=3)) for i in range(9)]
        results = await in_one_batch(store, writes)
        assert [r.decision.seq for r in results] == list(range(1, 10))
        assert await seqs(store, "p") == [7, 8, 9]
        assert store.ran("SAVEPOINT scores") == 1

    with_store(db, body)


def test_a_function_that_raises_fails_alone_in_its_batch(db: Path) -> None:
    """The write in the middle raises: it gets its error and writes nothing; the same
    user's writes before and after it commit, the later one on the earlier's row."""

    def broken(_row: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        raise ValueError("the policy failed")

    async def body(store: TracedStore) -> None:
        writes = [store.score_tx("m", next_pull("m", f"ev-{i}")) for i in range(3)]
        writes.insert(1, store.score_tx("m", broken))
        writes.append(store.score_tx("other", next_pull("other", "ev-o")))
        results = await in_one_batch(store, writes)
        assert isinstance(results[1], ValueError)
        assert [r.decision.seq for i, r in enumerate(results) if i != 1] == [1, 2, 3, 1]
        row = await store.get_user("m")
        assert row is not None
        assert row.pulls == 3
        assert await seqs(store, "m") == [1, 2, 3]
        assert await seqs(store, "other") == [1]
        assert store.ran("SAVEPOINT scores") == 1
        assert store.ran("ROLLBACK TO scores") == 0

    with_store(db, body)


def test_a_constraint_failure_undoes_only_its_write(db: Path) -> None:
    """A decision whose event id the user already logged breaks a unique index: the
    batch is undone and run again write by write, so only that write fails."""

    async def body(store: TracedStore) -> None:
        await store.score_tx("c", fixed("c", 1, "ev-dup", 1))
        writes = [
            store.score_tx("c", fixed("c", 2, "ev-2", 1)),
            store.score_tx("d", fixed("d", 1, "ev-d", 1)),
            store.score_tx("c", fixed("c", 3, "ev-dup", 1)),  # the same event id again
            store.score_tx("c", fixed("c", 4, "ev-4", 1)),
        ]
        results = await in_one_batch(store, writes)
        assert isinstance(results[2], StoreUnavailable)
        assert [r.decision.seq for i, r in enumerate(results) if i != 2] == [2, 1, 4]
        assert await seqs(store, "c") == [1, 2, 4]
        assert await seqs(store, "d") == [1]
        row = await store.get_user("c")
        assert row is not None
        assert row.pulls == 4
        assert store.ran("ROLLBACK TO scores") == 1

    with_store(db, body)


def test_a_lower_seq_after_a_pruning_write_is_kept_as_one_by_one(db: Path) -> None:
    """One by one, a write's pruning runs before the next write's decision is logged,
    so a later decision below an earlier pruning point stays."""

    async def body(store: TracedStore) -> None:
        writes = [
            store.score_tx("g", fixed("g", 10, "ev-10", 10)),
            store.score_tx("g", fixed("g", 5, "ev-5", 1)),
        ]
        results = await in_one_batch(store, writes)
        assert [r.decision.seq for r in results] == [10, 5]
        assert await seqs(store, "g") == [5, 10]
        assert store.ran("SAVEPOINT scores") == 1

    with_store(db, body)


def test_a_replay_in_a_batch_reads_the_log_as_the_earlier_writes_left_it(db: Path) -> None:
    """A write that needs its user's replay sees the learned rewards that the same
    user's earlier write in the batch has not pruned, and only those."""
    replays: list[list[float]] = []

    def needs_replay(row: UserRecord | None, replay: Replay | None) -> ScoreWrite:
        if replay is None:
            raise ReplayNeeded
        replays.append([r.reward for r in replay])
        assert row is not None
        return make_write("r", row.pulls + 1, "ev-r")

    async def body(store: TracedStore) -> None:
        for seq in (1, 2, 3):
            await store.score_tx("r", fixed("r", seq, f"ev-{seq}", 1))
            mark = DecisionMark(f"ev-{seq}", float(seq), 2_000, 1, True, seq, "client", 0)

            def learn(
                row: UserRecord | None, _ref: Any, _replay: Any, mark: DecisionMark = mark
            ) -> RewardWrite:
                return RewardWrite(row, mark, mark.event_id)

            await store.reward_tx("r", DecisionLookup(None, f"ev-{seq}"), learn)
        writes = [
            store.score_tx("r", fixed("r", 4, "ev-4", 3)),  # prunes seq 1 and 2
            store.score_tx("r", needs_replay),
        ]
        results = await in_one_batch(store, writes)
        assert [r.decision.seq for r in results] == [4, 5]
        assert replays == [[3.0]]
        assert await seqs(store, "r") == [3, 4, 5]
        assert store.ran("SAVEPOINT scores") == 1

    with_store(db, body)


def test_other_writes_between_scores_keep_their_place(db: Path) -> None:
    """A delete between two runs of scores of the same user splits the batch: the
    scores after it start from no model."""

    async def body(store: TracedStore) -> None:
        writes: list[Awaitable[Any]] = [
            store.score_tx("x", next_pull("x", "ev-1")),
            store.score_tx("x", next_pull("x", "ev-2")),
            store.delete_user("x"),
            store.score_tx("x", next_pull("x", "ev-3")),
            store.score_tx("x", next_pull("x", "ev-4")),
        ]
        results = await in_one_batch(store, writes)
        assert results[2] is True
        assert [r.decision.seq for i, r in enumerate(results) if i != 2] == [1, 2, 1, 2]
        assert [d.event_id for d in await store.recent_decisions("x", 10)] == ["ev-4", "ev-3"]
        assert store.ran("SAVEPOINT scores") == 2

    with_store(db, body)
