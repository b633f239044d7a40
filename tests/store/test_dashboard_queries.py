"""What the dashboard reads from the store, on every backend (the `store` fixture), with
decisions made by hand: the counts per policy and time bucket, a user's recent
decisions, and saved reports. The query plans are each SQL backend's own.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from typing import Any, TypeVar

import numpy as np
import psycopg
import pytest
from tests.store.support import execute, reopened, run

from oo_serving.core.features import D
from oo_serving.evaluation import saved
from oo_serving.store.base import (
    REPORTS_KEPT,
    BucketStats,
    DecisionLookup,
    DecisionMark,
    DecisionRecord,
    DecisionRef,
    Replay,
    RewardWrite,
    ScoreWrite,
    Store,
    UserRecord,
)
from oo_serving.store.memory import MemoryStore
from oo_serving.store.postgres import PostgresStore
from oo_serving.store.sql import STATS_SQL_POSTGRES, STATS_SQL_SQLITE
from oo_serving.store.sqlite import SQLiteStore

T = TypeVar("T")
BUCKET = 1_000
SINCE = 100_000


# ── decisions made by hand ───────────────────────────────────────────────────


def decision(
    user_id: str,
    seq: int,
    ts_ms: int,
    *,
    policy: str = "linucb-v1",
    shown: int = 0,
    greedy: int | None = 0,
    ids: tuple[str, ...] = ("a", "b", "c"),
) -> DecisionRecord:
    n = len(ids)
    X = np.arange(n * D, dtype=np.float64).reshape(n, D) / 10
    p = np.full(n, 0.1 / n)
    p[greedy if greedy is not None else shown] += 0.9
    return DecisionRecord(
        user_id=user_id,
        seq=seq,
        event_id=f"{user_id}-e{seq}",
        ts_ms=ts_ms,
        tip_id=ids[shown],
        features={"hour_of_day": 9, "is_overdue": False, "task_age_days": 1.0, "priority": 2},
        x=X[shown],
        score=0.5,
        policy=policy,
        propensity=float(p[shown]),
        model_version=0,
        candidate_ids=ids,
        candidate_X=X,
        candidate_features=np.tile([9.0, 0.0, 1.0, 2.0], (n, 1)),
        context={"hour_of_day": 9, "day_of_week": 2},
        candidate_p=p if greedy is not None else None,
        greedy=greedy,
    )


async def log(store: Store, d: DecisionRecord) -> None:
    user = UserRecord(d.user_id, d.policy, b"state", 1, d.seq, 0, 0.0, d.ts_ms)
    write = ScoreWrite(user, d, keep_from_seq=1)
    await store.score_tx(d.user_id, lambda _u, _r: write)


async def reward(store: Store, d: DecisionRecord, value: float, *, source: str = "client") -> None:
    mark = DecisionMark(d.event_id, value, d.ts_ms + 5, 1, True, 1, source, reward_n_before=0)

    def fn(_u: UserRecord | None, ref: DecisionRef | None, _r: Replay | None) -> RewardWrite:
        assert ref is not None
        return RewardWrite(None, mark, d.event_id)

    await store.reward_tx(d.user_id, DecisionLookup(None, d.event_id), fn)


# ── decision_stats ───────────────────────────────────────────────────────────


def test_decision_stats_counts_each_policy_and_bucket_exactly(store: Store) -> None:
    v1, v2 = "linucb-v1", "linucb-v2"
    # (user, seq, ts, policy, shown, greedy, reward, source)
    rows: list[tuple[str, int, int, str, int, int | None, float | None, str]] = [
        ("u1", 1, SINCE, v1, 0, 0, 1.0, "client"),  # the range's first instant: bucket 0
        ("u1", 2, SINCE + 999, v1, 1, 0, 0.0, "client"),  # explored
        ("u2", 1, SINCE + 500, v1, 2, 2, None, ""),
        ("u2", 2, SINCE + 1_000, v1, 0, 0, 0.5, "client"),  # bucket 1
        ("u3", 1, SINCE + 1_200, v2, 1, 2, -1.0, "client"),  # explored
        ("u3", 2, SINCE + 2_100, v2, 0, None, 0.0, "default"),  # no greedy: not explored
        ("u4", 1, SINCE + 2_999, v2, 2, 2, 1.0, "client"),
        ("u1", 3, SINCE - 1, v1, 0, 0, 1.0, "client"),  # before the range
        ("u4", 2, SINCE + 3_000, v2, 0, 1, 1.0, "client"),  # at `until`: excluded
    ]

    async def body(store: Store) -> Any:
        for user, seq, ts, policy, shown, greedy, value, source in sorted(
            rows, key=lambda r: r[:2]
        ):
            d = decision(user, seq, ts, policy=policy, shown=shown, greedy=greedy)
            await log(store, d)
            if value is not None:
                await reward(store, d, value, source=source)
        return await store.decision_stats(SINCE, SINCE + 3_000, BUCKET)

    stats = run(body(store))

    assert stats.buckets == (
        BucketStats(v1, 0, decisions=3, rewarded=2, defaulted=0, reward_sum=1.0,
                    reward_sq_sum=1.0, explored=1, reward_min=0.0, reward_max=1.0),
        BucketStats(v1, 1, decisions=1, rewarded=1, defaulted=0, reward_sum=0.5,
                    reward_sq_sum=0.25, explored=0, reward_min=0.5, reward_max=0.5),
        BucketStats(v2, 1, decisions=1, rewarded=1, defaulted=0, reward_sum=-1.0,
                    reward_sq_sum=1.0, explored=1, reward_min=-1.0, reward_max=-1.0),
        BucketStats(v2, 2, decisions=2, rewarded=2, defaulted=1, reward_sum=1.0,
                    reward_sq_sum=1.0, explored=0, reward_min=0.0, reward_max=1.0),
    )  # fmt: skip
    assert dict(stats.users) == {v1: 2, v2: 2}


def test_exploration_compares_the_shown_tip_with_the_greedy_candidate_by_id(
    store: Store,
) -> None:
    """The shown tip is told by id, as the service does: with an id offered twice, showing
    the other copy is not exploring; ids with quotes and brackets are read whole."""
    odd = ('x"]', "<b>&", 'x"]')

    async def body(store: Store) -> Any:
        await log(store, decision("u", 1, SINCE, shown=2, greedy=0, ids=odd))  # same id
        await log(store, decision("u", 2, SINCE + 1, shown=1, greedy=0, ids=odd))  # explored
        await log(store, decision("u", 3, SINCE + 2, shown=1, greedy=1, ids=odd))
        return await store.decision_stats(SINCE, SINCE + 10, BUCKET)

    stats = run(body(store))

    assert [(b.decisions, b.explored) for b in stats.buckets] == [(3, 1)]


def test_decision_stats_of_an_empty_range_is_empty(store: Store) -> None:
    async def body(store: Store) -> Any:
        await log(store, decision("u", 1, SINCE + 50))
        return await store.decision_stats(SINCE + 100, SINCE + 200, BUCKET)

    stats = run(body(store))

    assert stats.buckets == ()
    assert dict(stats.users) == {}


@pytest.mark.parametrize(("since", "until", "bucket"), [(0, 10, 0), (0, 10, -5), (10, 0, 5)])
def test_decision_stats_refuses_a_range_that_makes_no_sense(
    store: Store, since: int, until: int, bucket: int
) -> None:
    async def body(store: Store) -> None:
        await store.decision_stats(since, until, bucket)

    with pytest.raises(ValueError, match=r"bucket_ms|before it starts"):
        run(body(store))


def test_decision_stats_reads_through_the_time_index_on_sqlite(sqlite_store: SQLiteStore) -> None:
    """The range is found by the index on ts_ms (migration 0002), not by a scan of the log."""
    with closing(sqlite3.connect(sqlite_store.path)) as conn:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {STATS_SQL_SQLITE}", (0, BUCKET, 0, 10)).fetchall()
    assert any("decision_ts" in str(step) for step in plan), plan


def test_decision_stats_reads_through_the_time_index_on_postgres(
    postgres_store: PostgresStore,
) -> None:
    """As on SQLite, with a log large enough for the planner to prefer the index."""

    def explain() -> str:
        with psycopg.connect(postgres_store.dsn, autocommit=True) as conn:
            # A log of 20,000 decisions over 20,000 s, and a range of one minute of it.
            conn.execute(
                "INSERT INTO decision (user_id, seq, event_id, ts_ms, tip_id, features, x,"
                " score, policy, propensity, model_version, candidate_ids, candidate_x)"
                " SELECT 'u' || (i % 100), i, 'e' || i, i * 1000, 'a', '{}', '\\x00', 0,"
                " 'linucb-v1', 1, 0, ARRAY['a'], '\\x00' FROM generate_series(1, 20000) i"
            )
            conn.execute("ANALYZE decision")
            query = STATS_SQL_POSTGRES.replace("?", "%s")
            rows = conn.execute(f"EXPLAIN {query}", (5_000_000, BUCKET, 5_000_000, 5_060_000))
            return "\n".join(str(r[0]) for r in rows)

    plan = run(asyncio.to_thread(explain))
    assert "decision_ts" in plan, plan


# ── recent_decisions ─────────────────────────────────────────────────────────


def test_recent_decisions_are_the_users_newest_first_with_every_column(store: Store) -> None:
    async def body(store: Store) -> Any:
        for seq in range(1, 6):
            await log(store, decision("me", seq, SINCE + seq, shown=seq % 3, greedy=0))
        await log(store, decision("other", 1, SINCE + 100))
        await reward(store, decision("me", 4, SINCE + 4, shown=1, greedy=0), 0.25)
        return (
            await store.recent_decisions("me", 3),
            await store.recent_decisions("me", 100),
            await store.recent_decisions("nobody", 3),
        )

    three, every, none = run(body(store))

    assert [d.seq for d in three] == [5, 4, 3]
    assert [d.seq for d in every] == [5, 4, 3, 2, 1]
    assert none == []
    fourth = three[1]
    expected = decision("me", 4, SINCE + 4, shown=1, greedy=0)
    assert (fourth.tip_id, fourth.greedy, fourth.candidate_ids) == ("b", 0, ("a", "b", "c"))
    assert fourth.candidate_p is not None
    assert expected.candidate_p is not None
    assert fourth.candidate_p.tolist() == expected.candidate_p.tolist()
    assert fourth.context == {"hour_of_day": 9, "day_of_week": 2}
    assert (fourth.reward, fourth.reward_n, fourth.reward_source) == (0.25, 1, "client")
    assert three[0].reward is None


# ── reports ──────────────────────────────────────────────────────────────────


def test_a_saved_report_reads_back_as_it_was_and_the_latest_wins(store: Store) -> None:
    body_a = {"verdict": "é ✓ <b>", "nested": {"list": [1, 2.5, None, True]}, "n": 3}
    body_b = {"verdict": "second"}

    async def body(store: Store) -> Any:
        first = await store.save_report("evaluate", 2_000, body_a)
        older = await store.save_report("evaluate", 1_000, body_b)  # computed earlier
        other = await store.save_report("other-kind", 9_000, {"x": 1})
        return (
            (first, older, other),
            await store.latest_report("evaluate"),
            await store.latest_report("other-kind"),
            await store.latest_report("never-saved"),
        )

    ids, latest, other, never = run(body(store))

    assert len(set(ids)) == 3
    assert latest is not None
    assert (latest.id, latest.kind, latest.created_ms, latest.body) == (
        ids[0], "evaluate", 2_000, body_a,
    )  # fmt: skip
    assert other is not None
    assert other.body == {"x": 1}
    assert never is None


def test_only_the_newest_reports_of_a_kind_are_kept(store: Store) -> None:
    async def body(store: Store) -> Any:
        for i in range(REPORTS_KEPT + 3):
            await store.save_report("evaluate", 1_000 + i, {"i": i})
        await store.save_report("other-kind", 1, {"i": -1})
        return await store.latest_report("evaluate")

    latest = run(body(store))
    assert latest is not None
    assert latest.body == {"i": REPORTS_KEPT + 2}
    assert reports_kept(store) == [("evaluate", REPORTS_KEPT, 1_003), ("other-kind", 1, 1)]


def reports_kept(store: Store) -> list[tuple[str, int, int]]:
    """Per kind, the reports the database holds and the oldest's created_ms, by kind."""
    if isinstance(store, MemoryStore):
        kinds = sorted({r.kind for r in store.database.reports.values()})
        of = {k: [r for r in store.database.reports.values() if r.kind == k] for k in kinds}
        return [(k, len(of[k]), min(r.created_ms for r in of[k])) for k in kinds]
    query = "SELECT kind, count(*), min(created_ms) FROM report GROUP BY kind ORDER BY kind"
    return [(r[0], r[1], r[2]) for r in execute(store, query)]


def test_an_evaluation_is_saved_with_its_command_and_range(store: Store) -> None:
    result = {"events": 10, "users": 2, "estimates": [], "verdict": "too few"}

    async def body(store: Store) -> Any:
        await saved.save_report(
            store, result, command="oo-serving evaluate", since_ms=0, until_ms=86_400_000,
            created_ms=5,
        )  # fmt: skip
        return await saved.latest(store)

    report = run(body(store))

    assert report is not None
    assert (report.kind, report.created_ms) == (saved.KIND, 5)
    assert report.body == {
        "result": result,
        "command": "oo-serving evaluate",
        "since": "1970-01-01T00:00:00.000Z",
        "until": "1970-01-02T00:00:00.000Z",
    }


def test_what_is_not_an_evaluation_result_is_refused_and_nothing_saved(store: Store) -> None:
    async def body(store: Store) -> Any:
        with pytest.raises(ValueError, match="estimates, verdict"):
            await saved.save_report(store, {"events": 1, "users": 1})
        return await saved.latest(store)

    assert run(body(store)) is None


def test_a_report_survives_reopening_the_database(store: Store) -> None:
    run(store.save_report("evaluate", 7, {"ok": True}))
    run(store.close())
    other = reopened(store)
    try:
        report = run(other.latest_report("evaluate"))
    finally:
        run(other.close())
    assert report is not None
    assert report.body == {"ok": True}
