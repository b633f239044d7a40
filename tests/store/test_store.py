"""The store contract, run against every store implementation (memory, SQLite,
PostgreSQL) through the `store` fixture, on real databases.

The store API is async; each test drives it with `run`, on the one loop that opened the
store (tests/store/support.py). Tests of one backend are in test_<backend>_store.py;
those that write rows behind the store's back in SQL are in test_sql_store.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest
from tests.store.support import (
    CANDIDATES,
    CONTEXT,
    FEATURES,
    OTHER_FEATURES,
    assert_same_user,
    assert_write_locked,
    event_ids_of,
    execute,
    export_all,
    f64,
    log_decision,
    make_decision,
    make_service,
    make_user,
    make_write,
    mark,
    peek,
    reopened,
    reward_decision,
    run,
    task,
    v1_arrays,
    v1_state,
)

from oo_serving.core.features import D, TaskFeatures, feature_matrix, feature_vector
from oo_serving.errors import StoreUnavailable, TipMismatch, UnknownEvent
from oo_serving.service import Candidate, EventIds, Service
from oo_serving.store.base import (
    EXPORT_PAGE_ROWS,
    FOLDED_SHARD,
    POOLED_FOLD_AFTER_MS,
    POOLED_MAX_SHARDS,
    DecisionLookup,
    DecisionRecord,
    DecisionRef,
    HistoryEntry,
    LoggedReward,
    Replay,
    ReplayNeeded,
    RewardWrite,
    ScoreWrite,
    Store,
    UserRecord,
)
from oo_serving.store.memory import MemoryStore


class Boom(Exception):
    pass


# ── users and decisions ──────────────────────────────────────────────────────


def test_new_user_reads_as_none(store: Store) -> None:
    assert run(store.get_user("nobody")) is None
    assert run(store.history("nobody", 10)) == []
    assert peek(store, "nobody", DecisionLookup(tip_id="tip-a", event_id=None)) is None


def test_ping_answers(store: Store) -> None:
    run(store.ping())


def test_score_tx_creates_the_user_and_logs_the_decision(store: Store) -> None:
    seen: list[UserRecord | None] = []
    x = np.array([0.25, -0.5, 1.0, 0.75, 1 / 3])
    write = ScoreWrite(
        user=make_user("u1", pulls=1, ts=4242),
        decision=make_decision("u1", 1, "ev-1", tip_id="tip-z", x=x, score=1.25),
        keep_from_seq=1,
    )

    def fn(user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        seen.append(user)
        return write

    returned = run(store.score_tx("u1", fn))

    assert seen == [None]
    assert returned is write
    user = run(store.get_user("u1"))
    assert_same_user(user, write.user)
    history = run(store.history("u1", 10))
    assert history == [
        HistoryEntry(ts_ms=1_001, features=FEATURES, score=1.25, tip_id="tip-z", event_id="ev-1")
    ]
    assert type(history[0].features["is_overdue"]) is bool
    assert type(history[0].features["task_age_days"]) is float
    ref = peek(store, "u1", DecisionLookup(tip_id="tip-z", event_id="ev-1"))
    assert ref is not None
    assert (ref.seq, ref.event_id, ref.tip_id, ref.reward) == (1, "ev-1", "tip-z", None)
    assert ref.x.tobytes() == x.tobytes()
    assert (ref.policy, ref.features) == ("linucb-v1", FEATURES)
    assert type(ref.features["is_overdue"]) is bool


def test_score_tx_passes_the_stored_row_to_fn(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    stored = run(store.get_user("u1"))
    seen: list[UserRecord | None] = []

    def fn(user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        seen.append(user)
        return ScoreWrite(make_user("u1", pulls=2), make_decision("u1", 2, "ev-2"), 1)

    run(store.score_tx("u1", fn))
    assert len(seen) == 1
    assert_same_user(seen[0], stored)
    assert run(store.get_user("u1")).pulls == 2  # type: ignore[union-attr]
    assert event_ids_of(store, "u1") == ["ev-1", "ev-2"]


def test_state_and_arrays_round_trip_bit_exactly(store: Store) -> None:
    rng = np.random.default_rng(99)
    A_inv = rng.standard_normal((D, D)) * 10.0 ** rng.integers(-300, 300, (D, D))
    A_inv[0, 0] = -0.0
    A_inv[0, 1] = 5e-324  # the smallest subnormal
    A_inv[0, 2] = np.nextafter(1.0, 2.0)
    A_inv[0, 3] = np.finfo(np.float64).max
    A_inv[0, 4] = 1 / 3
    b = np.array([np.pi, -np.e, 1e-310, -1e308, 0.1])
    x = np.array([np.nextafter(0.5, 0.0), 2 / 3, -0.0, 1e-17, 0.7])
    write = ScoreWrite(
        user=make_user("u1", state=v1_state(A_inv, b), cumulative_reward=0.1 + 0.2),
        decision=make_decision("u1", 1, "ev-1", x=x, score=np.nextafter(0.3, 1.0)),
        keep_from_seq=1,
    )
    run(store.score_tx("u1", lambda _user, _replay: write))

    user = run(store.get_user("u1"))
    assert user is not None
    assert user.state == write.user.state
    state = v1_arrays(user)
    assert state.A_inv.tobytes() == A_inv.tobytes()
    assert state.b.tobytes() == b.tobytes()
    assert user.cumulative_reward == 0.1 + 0.2
    ref = peek(store, "u1", DecisionLookup(tip_id="tip-a", event_id="ev-1"))
    assert ref is not None
    assert ref.x.dtype == np.float64
    assert ref.x.tobytes() == x.tobytes()
    assert run(store.history("u1", 1))[0].score == np.nextafter(0.3, 1.0)


def test_a_state_is_opaque_bytes_of_any_policy_and_version(store: Store) -> None:
    """The store reads nothing inside a state: every byte value, NULs and invalid UTF-8
    included, of any length (none too), comes back as written, with its version."""
    for i, state in enumerate([bytes(range(256)) * 3, b"\x00", b"", b"\xc3\x28\x00\xff"]):
        user = UserRecord(f"u{i}", "some-policy", state, 7 + i, 1, 0, 0.0, 5)
        write = ScoreWrite(user, make_decision(f"u{i}", 1, "ev-1"), 1)
        run(store.score_tx(f"u{i}", functools.partial(lambda w, _user, _replay: w, write)))
        stored = run(store.get_user(f"u{i}"))
        assert stored is not None
        assert (stored.policy, stored.state, stored.state_version) == ("some-policy", state, 7 + i)
        assert type(stored.state) is bytes


# ── nothing is written when fn raises ────────────────────────────────────────


def test_score_fn_that_raises_writes_nothing_for_a_new_user(store: Store) -> None:
    def fn(_user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        raise Boom

    with pytest.raises(Boom):
        run(store.score_tx("u1", fn))
    assert run(store.get_user("u1")) is None
    assert run(store.history("u1", 10)) == []


def test_score_fn_that_raises_writes_nothing_for_an_existing_user(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    before = run(store.get_user("u1"))

    def fn(_user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        raise Boom("no")

    with pytest.raises(Boom, match="no"):
        run(store.score_tx("u1", fn))
    assert_same_user(run(store.get_user("u1")), before)
    assert event_ids_of(store, "u1") == ["ev-1"]


def test_a_score_write_that_fails_midway_is_rolled_back(store: Store) -> None:
    """The user row is written before the decision; a refused decision undoes both."""
    log_decision(store, "u1", 1, "ev-1")
    log_decision(store, "u1", 2, "ev-2")
    before = run(store.get_user("u1"))
    clash = ScoreWrite(
        user=make_user("u1", pulls=99, reward_count=7, cumulative_reward=3.0),
        decision=make_decision("u1", 2, "ev-new"),  # seq 2 is already logged
        keep_from_seq=2,  # would prune seq 1
    )
    with pytest.raises(StoreUnavailable):
        run(store.score_tx("u1", lambda _user, _replay: clash))
    assert_same_user(run(store.get_user("u1")), before)
    assert event_ids_of(store, "u1") == ["ev-1", "ev-2"]


def test_reward_fn_that_raises_writes_nothing(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    before = run(store.get_user("u1"))
    calls: list[DecisionRef | None] = []

    def fn(
        _user: UserRecord | None, ref: DecisionRef | None, _replay: Replay | None
    ) -> RewardWrite:
        calls.append(ref)
        raise Boom

    with pytest.raises(Boom):
        run(store.reward_tx("u1", DecisionLookup(tip_id="tip-a", event_id="ev-1"), fn))
    assert len(calls) == 1
    assert calls[0] is not None
    assert_same_user(run(store.get_user("u1")), before)
    ref = peek(store, "u1", DecisionLookup(tip_id="tip-a", event_id="ev-1"))
    assert ref is not None
    assert ref.reward is None
    assert event_ids_of(store, "u1") == ["ev-1"]


def test_reward_fn_that_raises_for_a_new_user_writes_nothing(store: Store) -> None:
    def fn(
        _user: UserRecord | None, _ref: DecisionRef | None, _replay: Replay | None
    ) -> RewardWrite:
        raise Boom

    with pytest.raises(Boom):
        run(store.reward_tx("u1", DecisionLookup(tip_id="tip-a", event_id=None), fn))
    assert run(store.get_user("u1")) is None


def test_the_store_keeps_working_after_a_failed_transaction(store: Store) -> None:
    def fn(_user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        raise Boom

    with pytest.raises(Boom):
        run(store.score_tx("u1", fn))
    log_decision(store, "u1", 1, "ev-1")
    assert event_ids_of(store, "u1") == ["ev-1"]


# ── history and pruning ──────────────────────────────────────────────────────


def test_history_is_the_last_limit_decisions_oldest_first(store: Store) -> None:
    for seq in range(1, 7):
        log_decision(store, "u1", seq, f"ev-{seq}", tip_id=f"tip-{seq}")
    log_decision(store, "u2", 1, "other-1")

    last3 = run(store.history("u1", 3))
    assert [h.event_id for h in last3] == ["ev-4", "ev-5", "ev-6"]
    assert [h.tip_id for h in last3] == ["tip-4", "tip-5", "tip-6"]
    assert [h.ts_ms for h in last3] == [1_004, 1_005, 1_006]
    assert [h.event_id for h in run(store.history("u1", 100))] == [f"ev-{i}" for i in range(1, 7)]
    assert [h.event_id for h in run(store.history("u1", 1))] == ["ev-6"]
    assert run(store.history("u1", 0)) == []


def test_pruning_deletes_older_decisions_of_that_user_only(store: Store) -> None:
    for seq in range(1, 6):
        log_decision(store, "u1", seq, f"a-{seq}")
        log_decision(store, "u2", seq, f"b-{seq}")

    log_decision(store, "u1", 6, "a-6", keep_from_seq=4)

    assert event_ids_of(store, "u1") == ["a-4", "a-5", "a-6"]
    assert event_ids_of(store, "u2") == [f"b-{i}" for i in range(1, 6)]
    assert peek(store, "u1", DecisionLookup(tip_id="tip-a", event_id="a-3")) is None
    assert peek(store, "u2", DecisionLookup(tip_id="tip-a", event_id="b-3")) is not None


def test_pruning_point_at_the_new_decision_keeps_only_it(store: Store) -> None:
    for seq in range(1, 4):
        log_decision(store, "u1", seq, f"a-{seq}")
    log_decision(store, "u1", 4, "a-4", keep_from_seq=4)
    assert event_ids_of(store, "u1") == ["a-4"]


# ── delete ───────────────────────────────────────────────────────────────────


def test_delete_user_removes_that_user_only(store: Store) -> None:
    for seq in range(1, 4):
        log_decision(store, "u1", seq, f"a-{seq}")
        log_decision(store, "u2", seq, f"b-{seq}")
    log_decision(store, "u1", 4, "shared")
    log_decision(store, "u2", 4, "shared")
    u2_before = run(store.get_user("u2"))

    assert run(store.delete_user("u1")) is True

    assert run(store.get_user("u1")) is None
    assert run(store.history("u1", 100)) == []
    assert peek(store, "u1", DecisionLookup(tip_id="tip-a", event_id="shared")) is None
    assert_same_user(run(store.get_user("u2")), u2_before)
    assert event_ids_of(store, "u2") == ["b-1", "b-2", "b-3", "shared"]

    assert run(store.delete_user("u1")) is False
    assert run(store.delete_user("never-seen")) is False


def test_a_deleted_user_starts_over(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    assert run(store.delete_user("u1")) is True
    seen: list[UserRecord | None] = []

    def fn(user: UserRecord | None, _replay: Replay | None) -> ScoreWrite:
        seen.append(user)
        return ScoreWrite(make_user("u1"), make_decision("u1", 1, "ev-again"), 1)

    run(store.score_tx("u1", fn))
    assert seen == [None]
    assert event_ids_of(store, "u1") == ["ev-again"]


# ── export ───────────────────────────────────────────────────────────────────


def test_export_holds_the_model_and_every_kept_decision_of_that_user_only(store: Store) -> None:
    for seq in range(1, 4):
        log_decision(store, "u1", seq, f"a-{seq}", keep_from_seq=2)
        log_decision(store, "u2", seq, f"b-{seq}")
    run(
        store.reward_tx(
            "u1",
            DecisionLookup(tip_id="tip-a", event_id="a-3"),
            lambda user, ref, replay: RewardWrite(
                make_user("u1", pulls=3, reward_count=1, cumulative_reward=0.5),
                mark=mark("a-3", 0.5, 9_000),
                matched_event="a-3",
            ),
        )
    )

    user, decisions = export_all(store, "u1")

    assert_same_user(user, run(store.get_user("u1")))
    assert [d.event_id for d in decisions] == ["a-2", "a-3"]  # a-1 was pruned
    for d in decisions:
        expected = make_decision("u1", d.seq, d.event_id)
        assert d.user_id == "u1"
        assert (d.ts_ms, d.tip_id, d.features, d.score) == (
            expected.ts_ms, expected.tip_id, expected.features, expected.score,
        )  # fmt: skip
        assert d.candidate_ids == expected.candidate_ids
        assert d.candidate_X.tobytes() == expected.candidate_X.tobytes()
        assert d.x.tobytes() == expected.x.tobytes()
        assert d.candidate_features is not None
        assert expected.candidate_features is not None
        assert d.candidate_features.shape == (2, 4)
        assert d.candidate_features.tobytes() == expected.candidate_features.tobytes()
        assert d.context == CONTEXT
        assert (d.policy, d.propensity, d.model_version) == ("linucb-v1", 1.0, 0)
    assert [(d.reward, d.rewarded_ms) for d in decisions] == [(None, None), (0.5, 9_000)]


def test_new_decision_columns_round_trip_through_export(store: Store) -> None:
    """Raw features bit for bit (is_overdue as 0.0/1.0), in candidate order; the context
    as given, an empty one included."""
    raw = np.array([[23, 1.0, np.nextafter(2.5, 3.0), 4], [0, 0.0, 0.0, 1], [12, 1.0, 1e-300, 2]])
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    X = np.stack([x, 2 * x, 3 * x])
    d = DecisionRecord(
        user_id="u1", seq=1, event_id="ev-1", ts_ms=5, tip_id="c", features=dict(FEATURES),
        x=X[2], score=0.25, policy="linucb-v1", propensity=0.5, model_version=0,
        candidate_ids=("a", "b", "c"), candidate_X=X, candidate_features=raw,
        context={"hour_of_day": 23, "day_of_week": 6},
    )  # fmt: skip
    run(store.score_tx("u1", lambda _user, _replay: ScoreWrite(make_user("u1"), d, 1)))
    empty = DecisionRecord(
        user_id="u1", seq=2, event_id="ev-2", ts_ms=6, tip_id="a", features=dict(FEATURES),
        x=x, score=0.25, policy="linucb-v1", propensity=1.0, model_version=0,
        candidate_ids=("a",), candidate_X=x[None, :], candidate_features=raw[:1], context={},
    )  # fmt: skip
    run(store.score_tx("u1", lambda _u, _r: ScoreWrite(make_user("u1", pulls=2), empty, 1)))

    _, decisions = export_all(store, "u1")

    first, second = decisions
    assert first.candidate_features is not None
    assert first.candidate_features.dtype == np.float64
    assert first.candidate_features.tobytes() == raw.tobytes()
    assert first.context == {"hour_of_day": 23, "day_of_week": 6}
    assert (first.propensity, first.candidate_ids) == (0.5, ("a", "b", "c"))
    assert second.candidate_features is not None
    assert second.candidate_features.tobytes() == raw[:1].tobytes()
    assert second.context == {}


def test_export_of_an_unknown_user_is_empty(store: Store) -> None:
    assert export_all(store, "nobody") == (None, [])


def test_export_comes_in_bounded_pages_of_one_snapshot(store: Store) -> None:
    """Pages hold at most EXPORT_PAGE_ROWS decisions, and what is written or erased after
    the export began shows in none of them."""
    total = 3 * EXPORT_PAGE_ROWS + 1
    for seq in range(1, total + 1):
        log_decision(store, "u1", seq, f"a-{seq}")

    async def export_while_writing() -> tuple[UserRecord | None, list[list[DecisionRecord]]]:
        async with store.export_user("u1") as export:
            first = await anext(export.pages)
            # Written and erased after the snapshot was taken, while the export streams.
            late = ScoreWrite(
                make_user("u1", pulls=total + 1), make_decision("u1", total + 1, "late"), 1
            )
            await store.score_tx("u1", lambda _user, _replay: late)
            assert await store.delete_user("u1")
            return export.user, [first] + [page async for page in export.pages]

    user, pages = run(export_while_writing())
    assert user is not None
    assert user.pulls == total
    assert all(1 <= len(page) <= EXPORT_PAGE_ROWS for page in pages)
    assert len(pages) == 4
    assert [d.seq for page in pages for d in page] == list(range(1, total + 1))
    assert run(store.get_user("u1")) is None  # the erasure did happen


# ── reward lookup ────────────────────────────────────────────────────────────


def test_lookup_by_event_id_finds_this_users_decision_only(store: Store) -> None:
    xa = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    xb = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    log_decision(store, "u1", 1, "ev-first")
    log_decision(store, "u1", 2, "shared", tip_id="tip-a", x=xa)
    log_decision(store, "u2", 1, "shared", tip_id="tip-b", x=xb)

    ref = peek(store, "u1", DecisionLookup(tip_id="ignored", event_id="shared"))
    assert ref is not None
    assert (ref.seq, ref.event_id, ref.tip_id) == (2, "shared", "tip-a")
    assert ref.x.tobytes() == xa.tobytes()

    ref = peek(store, "u2", DecisionLookup(tip_id="ignored", event_id="shared"))
    assert ref is not None
    assert (ref.seq, ref.tip_id) == (1, "tip-b")
    assert ref.x.tobytes() == xb.tobytes()

    assert peek(store, "u2", DecisionLookup(tip_id="tip-a", event_id="ev-first")) is None
    assert peek(store, "u3", DecisionLookup(tip_id="tip-a", event_id="shared")) is None


def test_lookup_without_event_id_finds_the_latest_decision_for_the_tip(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1", tip_id="t1")
    log_decision(store, "u1", 2, "ev-2", tip_id="t2")
    log_decision(store, "u1", 3, "ev-3", tip_id="t1")
    log_decision(store, "u1", 4, "ev-4", tip_id="t2")
    log_decision(store, "u2", 5, "ev-5", tip_id="t1")  # a later seq, but another user

    ref = peek(store, "u1", DecisionLookup(tip_id="t1", event_id=None))
    assert ref is not None
    assert (ref.seq, ref.event_id) == (3, "ev-3")
    assert ref.x.tobytes() == np.full(D, 3 / 8).tobytes()
    ref = peek(store, "u1", DecisionLookup(tip_id="t2", event_id=None))
    assert ref is not None
    assert ref.event_id == "ev-4"
    assert peek(store, "u1", DecisionLookup(tip_id="t9", event_id=None)) is None


def test_reward_tx_passes_the_user_row_and_writes_it(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    stored = run(store.get_user("u1"))
    seen: list[UserRecord | None] = []
    new_user = make_user(
        "u1", reward_count=1, cumulative_reward=0.5, state=v1_state(b=np.full(D, 0.5)), ts=9
    )

    def fn(
        user: UserRecord | None, _ref: DecisionRef | None, _replay: Replay | None
    ) -> RewardWrite:
        seen.append(user)
        return RewardWrite(new_user, mark("ev-1", 0.5, 9), "ev-1")

    returned = run(store.reward_tx("u1", DecisionLookup(tip_id="tip-a", event_id="ev-1"), fn))
    assert returned.user is new_user
    assert_same_user(seen[0], stored)
    assert_same_user(run(store.get_user("u1")), new_user)
    ref = peek(store, "u1", DecisionLookup(tip_id="tip-a", event_id="ev-1"))
    assert ref is not None
    assert ref.reward == 0.5


def test_reward_event_is_marked_only_once(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    log_decision(store, "u2", 1, "ev-1")
    lookup = DecisionLookup(tip_id="tip-a", event_id="ev-1")

    run(
        store.reward_tx(
            "u1", lookup, lambda _u, _r, _replay: RewardWrite(None, mark("ev-1", 0.75, 10), "ev-1")
        )
    )
    first = peek(store, "u1", lookup)
    assert first is not None
    assert first.reward == 0.75

    # Asked to mark it again, the store changes no row, so it refuses the whole write.
    again = RewardWrite(make_user("u1", reward_count=2), mark("ev-1", -1.0, 20), "ev-1")
    with pytest.raises(StoreUnavailable):
        run(store.reward_tx("u1", lookup, lambda _u, _r, _replay: again))
    assert run(store.get_user("u1")).reward_count == 0  # type: ignore[union-attr]
    second = peek(store, "u1", lookup)
    assert second is not None
    assert second.reward == 0.75

    other = peek(store, "u2", lookup)
    assert other is not None
    assert other.reward is None


# ── replay: a function that needs the user's learned rewards ────────────────


def features_of(i: int) -> dict[str, Any]:
    return {"hour_of_day": i, "is_overdue": i % 2 == 1, "task_age_days": i / 4, "priority": 1}


def as_tuples(replay: Replay | None) -> list[tuple[dict[str, Any], float]] | None:
    return None if replay is None else [(r.features, r.reward) for r in replay]


def log_and_reward(store: Store) -> list[tuple[dict[str, Any], float]]:
    """u1 with 5 decisions, 4 rewarded out of seq order (and 2 at the same time), and u2
    with one; u1's Replay, as it must come: by rewarded_ms, then seq."""
    for seq in range(1, 6):
        log_decision(store, "u1", seq, f"ev-{seq}", features=features_of(seq))
    log_decision(store, "u2", 1, "other", features=features_of(20))
    reward_decision(store, "u1", "ev-4", 0.25, 100)
    reward_decision(store, "u1", "ev-3", -1.0, 200)
    reward_decision(store, "u1", "ev-1", 0.5, 200)
    reward_decision(store, "u1", "ev-2", 1.0, 150)
    reward_decision(store, "u2", "other", 1.0, 50)
    return [
        (features_of(4), 0.25),
        (features_of(2), 1.0),
        (features_of(1), 0.5),
        (features_of(3), -1.0),
    ]


def test_score_fn_that_needs_a_replay_gets_the_learned_rewards_in_order(store: Store) -> None:
    expected = log_and_reward(store)
    before = run(store.get_user("u1"))
    calls: list[tuple[UserRecord | None, Replay | None]] = []
    write = ScoreWrite(make_user("u1", pulls=6, reward_count=4), make_decision("u1", 6, "ev-6"), 1)

    def fn(user: UserRecord | None, replay: Replay | None) -> ScoreWrite:
        calls.append((user, replay))
        if replay is None:
            raise ReplayNeeded
        assert_write_locked(store, "u1")  # the same transaction, the row still locked
        return write

    assert run(store.score_tx("u1", fn)) is write

    assert [as_tuples(replay) for _, replay in calls] == [None, expected]
    second = calls[1][1]
    assert second is not None
    assert all(type(r) is LoggedReward for r in second)
    assert [type(r.features["is_overdue"]) for r in second] == [bool] * 4
    assert [type(r.features["task_age_days"]) for r in second] == [float] * 4
    for user, _ in calls:
        assert_same_user(user, before)
    assert run(store.get_user("u1")).reward_count == 4  # type: ignore[union-attr]
    assert event_ids_of(store, "u1")[-1] == "ev-6"


def test_reward_fn_that_needs_a_replay_gets_it_with_the_same_decision(store: Store) -> None:
    expected = log_and_reward(store)
    calls: list[tuple[DecisionRef | None, Replay | None]] = []
    lookup = DecisionLookup(tip_id=None, event_id="ev-5")

    def fn(user: UserRecord | None, ref: DecisionRef | None, replay: Replay | None) -> RewardWrite:
        calls.append((ref, replay))
        if replay is None:
            raise ReplayNeeded
        assert_write_locked(store, "u1")
        return RewardWrite(
            make_user("u1", pulls=5, reward_count=5), mark("ev-5", 0.75, 300), "ev-5"
        )

    run(store.reward_tx("u1", lookup, fn))

    assert [as_tuples(replay) for _, replay in calls] == [None, expected]
    first, second = calls[0][0], calls[1][0]
    assert first is not None
    assert second is not None
    assert (second.seq, second.event_id, second.tip_id, second.policy, second.reward) == (
        5, "ev-5", "tip-a", "linucb-v1", None,
    )  # fmt: skip
    assert second.features == features_of(5)
    assert type(second.features["is_overdue"]) is bool
    assert second.x.tobytes() == first.x.tobytes() == np.full(D, 5 / 8).tobytes()
    assert peek(store, "u1", lookup).reward == 0.75  # type: ignore[union-attr]


def test_a_replay_of_a_user_without_rewards_is_empty(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    seen: list[Replay | None] = []

    def fn(_user: UserRecord | None, replay: Replay | None) -> ScoreWrite:
        seen.append(replay)
        if replay is None:
            raise ReplayNeeded
        return make_write("u1", 2)

    run(store.score_tx("u1", fn))
    run(
        store.score_tx(
            "nobody", lambda u, r: make_write("nobody", 1) if r is not None else fn(u, r)
        )
    )
    assert [as_tuples(r) for r in seen] == [None, [], None]


@pytest.mark.parametrize("second", [Boom, ReplayNeeded])
def test_a_replayed_fn_that_raises_writes_nothing(store: Store, second: type[Exception]) -> None:
    log_and_reward(store)
    before = run(store.get_user("u1"))
    events = event_ids_of(store, "u1")

    def score(_user: UserRecord | None, replay: Replay | None) -> ScoreWrite:
        if replay is None:
            raise ReplayNeeded
        raise second

    def reward(
        _u: UserRecord | None, _ref: DecisionRef | None, replay: Replay | None
    ) -> RewardWrite:
        if replay is None:
            raise ReplayNeeded
        raise second

    with pytest.raises(second):
        run(store.score_tx("u1", score))
    with pytest.raises(second):
        run(store.reward_tx("u1", DecisionLookup(tip_id=None, event_id="ev-5"), reward))
    with pytest.raises(second):
        run(store.score_tx("new-user", score))

    assert_same_user(run(store.get_user("u1")), before)
    assert event_ids_of(store, "u1") == events
    assert peek(store, "u1", DecisionLookup(tip_id=None, event_id="ev-5")).reward is None  # type: ignore[union-attr]
    assert run(store.get_user("new-user")) is None
    log_decision(store, "u1", 6, "ev-6")  # the store goes on
    assert event_ids_of(store, "u1") == [*events, "ev-6"]


# ── pooled population statistics ─────────────────────────────────────────────


def pooled_rows(store: Store, policy: str) -> dict[str, tuple[int, list[float], int]]:
    """The stored rows of `policy`: shard -> (count, stats, updated_ms)."""
    if isinstance(store, MemoryStore):
        shards = store.database.pooled.get(policy, {})
        return {
            shard: (row.count, np.frombuffer(row.stats, dtype="<f8").tolist(), row.updated_ms)
            for shard, row in shards.items()
        }
    rows = execute(
        store, "SELECT shard, count, stats, updated_ms FROM pooled WHERE policy = ?", (policy,)
    )
    return {r[0]: (r[1], np.frombuffer(bytes(r[2]), dtype="<f8").tolist(), r[3]) for r in rows}


def assert_pooled(store: Store, policy: str, count: int, stats: list[float]) -> None:
    pooled = run(store.pooled(policy))
    assert pooled is not None
    assert pooled.count == count
    assert pooled.stats.dtype == np.float64
    assert pooled.stats.tolist() == stats


def test_pooled_adds_up_across_shards_and_calls(store: Store) -> None:
    assert run(store.pooled("linucb-v2")) is None
    run(store.add_pooled("linucb-v2", "host-1", 3, f64(1.0, -0.5, 0.25), 10))
    run(store.add_pooled("linucb-v2", "host-2", 2, f64(0.5, 0.5, 0.5), 11))
    run(store.add_pooled("linucb-v2", "host-1", 1, f64(0.125, 0.0, -0.25), 12))
    run(store.add_pooled("other", "host-1", 7, f64(9.0), 13))

    assert_pooled(store, "linucb-v2", 6, [1.625, 0.0, 0.5])
    assert_pooled(store, "other", 7, [9.0])
    assert run(store.pooled("linucb-v1")) is None
    assert pooled_rows(store, "linucb-v2") == {
        "host-1": (4, [1.125, -0.5, 0.0], 12),
        "host-2": (2, [0.5, 0.5, 0.5], 11),
    }


def test_pooled_sums_are_stored_bit_exactly_and_survive_a_reopen(store: Store) -> None:
    tiny = f64(5e-324, -0.0, np.nextafter(1.0, 2.0), 1e308)
    run(store.add_pooled("p", "a", 1, tiny, 1))
    run(store.add_pooled("p", "b", 0, np.zeros(4), 2))
    other = reopened(store)
    try:
        pooled = run(other.pooled("p"))
        assert pooled is not None
        assert pooled.count == 1
        assert pooled.stats.tobytes() == (tiny + 0.0).tobytes()
        run(other.add_pooled("p", "a", 2, f64(1, 1, 1, 1), 3))
    finally:
        run(other.close())
    assert pooled_rows(store, "p")["a"][0] == 3


def test_pooled_stats_of_another_length_are_refused_and_nothing_changes(store: Store) -> None:
    run(store.add_pooled("p", "a", 1, f64(1.0, 2.0), 1))
    with pytest.raises(ValueError, match="pooled"):
        run(store.add_pooled("p", "a", 1, f64(1.0, 2.0, 3.0), 2))
    with pytest.raises(ValueError, match="flat"):
        run(store.add_pooled("p", "a", 1, np.ones((2, 2)), 2))
    assert pooled_rows(store, "p") == {"a": (1, [1.0, 2.0], 1)}
    run(store.add_pooled("p", "b", 1, f64(1.0, 2.0, 3.0), 3))  # another shard: stored, but
    with pytest.raises(ValueError, match="pooled"):  # the rows no longer add up
        run(store.pooled("p"))


def test_pooled_rows_survive_erasing_a_user(store: Store) -> None:
    log_decision(store, "u1", 1, "ev-1")
    run(store.add_pooled("p", "a", 1, f64(1.0), 1))
    assert run(store.delete_user("u1")) is True
    assert_pooled(store, "p", 1, [1.0])


def test_stale_shards_are_folded_beyond_the_limit_keeping_the_sum(store: Store) -> None:
    """Old shards (of restarted processes) and recent ones, up to POOLED_MAX_SHARDS rows:
    nothing is folded. One row more, and that write folds every shard not written for
    POOLED_FOLD_AFTER_MS into FOLDED_SHARD, in the same transaction, the sum unchanged.
    Stats are multiples of 1/8, so every sum is exact whatever its order."""
    now = 10 * POOLED_FOLD_AFTER_MS
    old = now - POOLED_FOLD_AFTER_MS - 1
    stale = POOLED_MAX_SHARDS - 3
    count, total = 0, np.zeros(2)
    for i in range(stale):
        stats = f64(i / 8, -i / 4)
        run(store.add_pooled("p", f"old-{i:02d}", i + 1, stats, old - i))
        count, total = count + i + 1, total + stats
    for i in range(3):  # written within the hour: kept as they are
        ts = now - POOLED_FOLD_AFTER_MS + i
        run(store.add_pooled("p", f"recent-{i}", 1, f64(1.0, 1.0), ts))
        count, total = count + 1, total + 1.0
    run(store.add_pooled("other", "old", 5, f64(2.0), 0))  # another policy: never folded
    run(store.add_pooled("p", "old-00", 1, f64(0.5, 0.5), now))  # no row more: no fold
    count, total = count + 1, total + 0.5
    assert len(pooled_rows(store, "p")) == POOLED_MAX_SHARDS
    assert FOLDED_SHARD not in pooled_rows(store, "p")
    assert_pooled(store, "p", count, total.tolist())

    run(store.add_pooled("p", "mine", 2, f64(0.25, 0.25), now))
    count, total = count + 2, total + 0.25

    rows = pooled_rows(store, "p")
    kept = ["mine", "old-00", "recent-0", "recent-1", "recent-2"]
    assert sorted(rows) == sorted([FOLDED_SHARD, *kept])
    assert rows["mine"] == (2, [0.25, 0.25], now)
    assert rows["old-00"] == (2, [0.5, 0.5], now)
    assert rows[FOLDED_SHARD][0] == sum(i + 1 for i in range(1, stale))
    assert_pooled(store, "p", count, total.tolist())
    assert pooled_rows(store, "other") == {"old": (5, [2.0], 0)}

    # Past the limit again later: the folded shard takes the newly stale ones in too.
    later = now + 2 * POOLED_FOLD_AFTER_MS
    for i in range(POOLED_MAX_SHARDS):
        run(store.add_pooled("p", f"new-{i:02d}", 1, f64(1.0, -1.0), now + i))
        count, total = count + 1, total + f64(1.0, -1.0)
    run(store.add_pooled("p", "last", 1, f64(0.0, 0.0), later))
    count += 1
    assert sorted(pooled_rows(store, "p")) == [FOLDED_SHARD, "last"]
    assert_pooled(store, "p", count, total.tolist())


def test_concurrent_pooled_writes_all_count(store: Store) -> None:
    """Shards written at once, each by several writers, new rows included; then two
    writers at once each past the limit, both folding: every increment counts once."""

    async def at_once(calls: list[tuple[str, int, np.ndarray, int]]) -> None:
        await asyncio.gather(*(store.add_pooled("p", *call) for call in calls))

    run(at_once([(f"s{i % 5}", 1, f64(i / 8, 1.0), 1_000 + i) for i in range(60)]))
    assert_pooled(store, "p", 60, [sum(i / 8 for i in range(60)), 60.0])
    assert {shard: row[0] for shard, row in pooled_rows(store, "p").items()} == {
        f"s{i}": 12 for i in range(5)
    }

    for i in range(POOLED_MAX_SHARDS):
        run(store.add_pooled("p", f"old-{i:02d}", 1, f64(1.0, 0.0), 2_000))
    now = 2_000 + 2 * POOLED_FOLD_AFTER_MS
    run(at_once([("writer-a", 1, f64(0.5, 0.5), now), ("writer-b", 1, f64(0.5, 0.5), now)]))

    rows = pooled_rows(store, "p")
    assert sorted(rows) == [FOLDED_SHARD, "writer-a", "writer-b"]
    total = [sum(i / 8 for i in range(60)) + POOLED_MAX_SHARDS + 1.0, 61.0]
    assert_pooled(store, "p", 60 + POOLED_MAX_SHARDS + 2, total)


# ── a closed store ───────────────────────────────────────────────────────────


def test_a_closed_store_refuses_work(store: Store) -> None:
    run(store.close())
    with pytest.raises(StoreUnavailable):
        run(store.get_user("u1"))
    with pytest.raises(StoreUnavailable):
        log_decision(store, "u1", 1, "ev-1")


# ── the service on a real store ──────────────────────────────────────────────


def closed_form(observed: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    A = np.identity(D)
    b = np.zeros(D)
    for x, r in observed:
        A += np.outer(x, x)
        b += r * x
    return np.linalg.inv(A), b


def test_service_score_logs_the_decision(store: Store) -> None:
    service = make_service(store)
    result = run(service.score("u1", CANDIDATES))

    # A fresh model scores α·‖x‖; the largest vector wins.
    X = feature_matrix([c.features for c in CANDIDATES])
    expected = int(np.argmax(np.linalg.norm(X, axis=1)))
    assert result.tip_id == CANDIDATES[expected].id == "tip-big"
    assert result.score == pytest.approx(float(np.linalg.norm(X[expected])), abs=1e-12)
    assert result.policy == "linucb-v1"
    assert result.event_id == "ev-1"

    user = run(store.get_user("u1"))
    assert user is not None
    assert (user.pulls, user.reward_count, user.cumulative_reward) == (1, 0, 0.0)
    np.testing.assert_array_equal(v1_arrays(user).A_inv, np.identity(D))
    history = run(service.history("u1"))
    assert [(h.event_id, h.tip_id) for h in history] == [("ev-1", "tip-big")]
    assert history[0].features == CANDIDATES[expected].features.as_dict()
    ref = peek(store, "u1", DecisionLookup(tip_id="tip-big", event_id="ev-1"))
    assert ref is not None
    assert ref.x.tobytes() == X[expected].tobytes()


def test_service_reward_with_event_id_learns_on_the_scored_vector(store: Store) -> None:
    service = make_service(store)
    scored = run(service.score("u1", CANDIDATES))
    x = feature_vector(next(c.features for c in CANDIDATES if c.id == scored.tip_id))

    result = run(service.reward("u1", scored.tip_id, 0.75, OTHER_FEATURES, scored.event_id))

    assert result.learned is True
    assert result.event_id == scored.event_id
    user = run(store.get_user("u1"))
    assert user is not None
    A_inv, b = closed_form([(x, 0.75)])
    np.testing.assert_allclose(v1_arrays(user).A_inv, A_inv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v1_arrays(user).b, b, rtol=0, atol=1e-15)
    assert (user.pulls, user.reward_count, user.cumulative_reward) == (1, 1, 0.75)
    ref = peek(store, "u1", DecisionLookup(tip_id=scored.tip_id, event_id=scored.event_id))
    assert ref is not None
    assert ref.reward == 0.75
    stats = run(service.stats("u1"))
    np.testing.assert_allclose(stats.theta, A_inv @ b, rtol=0, atol=1e-12)
    assert stats.estimated_mean == 0.75


def test_service_repeated_reward_changes_nothing(store: Store) -> None:
    service = make_service(store)
    scored = run(service.score("u1", CANDIDATES))
    run(service.reward("u1", scored.tip_id, 1.0, OTHER_FEATURES, scored.event_id))
    before = run(store.get_user("u1"))

    again = run(service.reward("u1", scored.tip_id, -1.0, OTHER_FEATURES, scored.event_id))

    assert again.learned is False
    assert again.event_id == scored.event_id
    assert_same_user(run(store.get_user("u1")), before)
    ref = peek(store, "u1", DecisionLookup(tip_id=scored.tip_id, event_id=scored.event_id))
    assert ref is not None
    assert ref.reward == 1.0


def test_service_unknown_event_raises_and_writes_nothing(store: Store) -> None:
    service = make_service(store)
    scored = run(service.score("u1", CANDIDATES))
    run(service.score("u2", CANDIDATES))  # u2's first event is "ev-2"
    before = run(store.get_user("u1"))

    with pytest.raises(UnknownEvent) as info:
        run(service.reward("u1", scored.tip_id, 1.0, OTHER_FEATURES, "no-such-event"))
    assert info.value.loc == ("body", "event_id")
    with pytest.raises(UnknownEvent):
        run(service.reward("u1", scored.tip_id, 1.0, OTHER_FEATURES, "ev-2"))
    with pytest.raises(UnknownEvent):
        run(service.reward("nobody", scored.tip_id, 1.0, OTHER_FEATURES, scored.event_id))

    assert_same_user(run(store.get_user("u1")), before)
    assert run(store.get_user("nobody")) is None


def test_service_tip_mismatch_raises_and_writes_nothing(store: Store) -> None:
    service = make_service(store)
    scored = run(service.score("u1", CANDIDATES))
    before = run(store.get_user("u1"))
    wrong = next(c.id for c in CANDIDATES if c.id != scored.tip_id)

    with pytest.raises(TipMismatch) as info:
        run(service.reward("u1", wrong, 1.0, OTHER_FEATURES, scored.event_id))
    assert info.value.loc == ("body", "tip_id")

    assert_same_user(run(store.get_user("u1")), before)
    ref = peek(store, "u1", DecisionLookup(tip_id=scored.tip_id, event_id=scored.event_id))
    assert ref is not None
    assert ref.reward is None


def test_service_reward_without_event_id_uses_the_latest_decision_for_the_tip(
    store: Store,
) -> None:
    service = make_service(store)
    first = task(1, False, 2, 1)
    latest = task(20, True, 9, 3)
    run(service.score("u1", [Candidate("tip-a", first)]))
    second = run(service.score("u1", [Candidate("tip-a", latest)]))
    run(service.score("u1", [Candidate("tip-b", task(5, False, 0, 4))]))

    result = run(service.reward("u1", "tip-a", 0.5, OTHER_FEATURES))

    assert result.learned is True
    assert result.event_id == second.event_id
    user = run(store.get_user("u1"))
    assert user is not None
    A_inv, b = closed_form([(feature_vector(latest), 0.5)])
    np.testing.assert_allclose(v1_arrays(user).A_inv, A_inv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v1_arrays(user).b, b, rtol=0, atol=1e-15)
    ref = peek(store, "u1", DecisionLookup(tip_id="tip-a", event_id=second.event_id))
    assert ref is not None
    assert ref.reward == 0.5


def test_service_reward_without_event_id_or_decision_uses_the_request(store: Store) -> None:
    service = make_service(store)
    run(service.score("u1", [Candidate("tip-a", task(1, False, 2, 1))]))

    result = run(service.reward("u1", "tip-unscored", -0.25, OTHER_FEATURES))

    assert result.learned is True
    assert result.event_id is None
    user = run(store.get_user("u1"))
    assert user is not None
    A_inv, b = closed_form([(feature_vector(OTHER_FEATURES), -0.25)])
    np.testing.assert_allclose(v1_arrays(user).A_inv, A_inv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v1_arrays(user).b, b, rtol=0, atol=1e-15)
    assert (user.pulls, user.reward_count, user.cumulative_reward) == (1, 1, -0.25)

    # A user never scored learns on the request too, and gets a row.
    result = run(service.reward("fresh", "tip-a", 1.0, OTHER_FEATURES))
    assert result == type(result)(learned=True, event_id=None, kept=1.0)
    fresh = run(store.get_user("fresh"))
    assert fresh is not None
    assert (fresh.pulls, fresh.reward_count) == (0, 1)


@pytest.mark.parametrize(
    ("history_size", "log_per_user", "kept"),
    [(3, 5, 5), (7, 2, 7), (4, 4, 4), (1, 1, 1)],
)
def test_service_keeps_at_most_max_of_log_and_history(
    store: Store, history_size: int, log_per_user: int, kept: int
) -> None:
    service = make_service(store, history_size=history_size, decision_log_per_user=log_per_user)
    other = make_service(store)
    run(other.score("bystander", CANDIDATES))
    event_ids: list[str] = []
    for i in range(1, 13):
        event_ids.append(run(service.score("u1", CANDIDATES)).event_id)
        retained = event_ids_of(store, "u1")
        assert len(retained) <= max(history_size, log_per_user)
        assert retained == event_ids[-kept:]
        assert len(run(service.history("u1"))) == min(i, history_size)
    assert run(store.get_user("u1")).pulls == 12  # type: ignore[union-attr]
    assert len(event_ids_of(store, "bystander")) == 1


def test_service_reset_forgets_the_user(store: Store) -> None:
    service = make_service(store)
    scored = run(service.score("u1", CANDIDATES))
    run(service.score("u2", CANDIDATES))
    assert run(service.reset("u1")) is True
    assert run(service.reset("u1")) is False
    assert run(store.get_user("u1")) is None
    with pytest.raises(UnknownEvent):
        run(service.reward("u1", scored.tip_id, 1.0, OTHER_FEATURES, scored.event_id))
    assert run(store.get_user("u2")) is not None


# ── concurrency inside one process ───────────────────────────────────────────


def test_concurrent_rewards_all_count(store: Store) -> None:
    service = make_service(store)
    # hour 0, overdue, 15 days, priority 4: x = (0, 1, 1, 0.5, 1), every entry exact,
    # and every reward a multiple of 1/8, so any order of the sums is exact.
    features = task(0, True, 15, 4)
    x = feature_vector(features)
    assert x.tolist() == [0.0, 1.0, 1.0, 0.5, 1.0]
    rewards = [((i % 17) - 8) / 8 for i in range(200)]

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(service.reward("u1", "tip-a", r, features) for r in rewards))

    results = run(all_at_once())

    assert all(r.learned for r in results)
    user = run(store.get_user("u1"))
    assert user is not None
    assert user.reward_count == 200
    total = sum(((i % 17) - 8) for i in range(200)) / 8
    assert user.cumulative_reward == total
    np.testing.assert_array_equal(v1_arrays(user).b, total * x)
    A_inv = np.linalg.inv(np.identity(D) + 200 * np.outer(x, x))
    np.testing.assert_allclose(v1_arrays(user).A_inv, A_inv, rtol=0, atol=1e-9)


def test_concurrent_scores_all_count(store: Store) -> None:
    service = make_service(store)

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(service.score("u1", CANDIDATES) for _ in range(100)))

    results = run(all_at_once())

    user = run(store.get_user("u1"))
    assert user is not None
    assert user.pulls == 100
    logged = event_ids_of(store, "u1")
    assert len(logged) == 100
    assert sorted(logged) == sorted(r.event_id for r in results)


def test_concurrent_scores_and_rewards_interleave_without_loss(store: Store) -> None:
    service = make_service(store)
    features = task(0, True, 15, 4)

    async def mixed() -> None:
        calls: list[Coroutine[Any, Any, Any]] = []
        for i in range(60):
            if i % 2:
                calls.append(service.reward("u1", "tip-none", 0.5, features))
            else:
                calls.append(service.score("u1", CANDIDATES))
        await asyncio.gather(*calls)

    run(mixed())

    user = run(store.get_user("u1"))
    assert user is not None
    assert (user.pulls, user.reward_count, user.cumulative_reward) == (30, 30, 15.0)
    assert len(event_ids_of(store, "u1")) == 30


# ── retention ────────────────────────────────────────────────────────────────


def test_prune_decisions_deletes_only_older_ones_in_batches(store: Store) -> None:
    for seq in range(1, 8):
        log_decision(store, "u1", seq, f"old-{seq}")
    for seq in range(1, 4):
        log_decision(store, "u2", seq, f"u2-{seq}")
    # make_decision stamps decision seq at ts_ms = 1_000 + seq: 7 are before 1_005.
    assert run(store.prune_decisions(1_005, 3)) == 3
    assert run(store.prune_decisions(1_005, 3)) == 3
    assert run(store.prune_decisions(1_005, 3)) == 1
    assert run(store.prune_decisions(1_005, 3)) == 0
    assert event_ids_of(store, "u1") == ["old-5", "old-6", "old-7"]
    assert event_ids_of(store, "u2") == []
    assert run(store.get_user("u1")) is not None  # models are never pruned


def test_concurrent_writes_where_some_fail_keep_the_others(store: Store) -> None:
    """Writes that run together (SQLite commits them in one batch) fail or succeed alone."""
    service = Service(store)
    candidates = [Candidate(id="a", features=TaskFeatures(9, False, 0.0, 1))]

    async def burst() -> list[object]:
        jobs = []
        for i in range(60):
            if i % 5 == 0:  # an unknown event: the service raises inside the transaction
                jobs.append(
                    service.reward("mixed", "a", 1.0, candidates[0].features, event_id=f"nope-{i}")
                )
            else:
                jobs.append(service.score("mixed", candidates))
        return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = run(burst())
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failures) == 12
    assert all(isinstance(f, UnknownEvent) for f in failures)
    user = run(store.get_user("mixed"))
    assert user is not None
    assert user.pulls == 48
    assert user.reward_count == 0
    assert len(run(store.history("mixed", 1000))) == 48


# ── event ids come from the OS ───────────────────────────────────────────────


def test_event_ids_carry_the_operating_systems_random_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Drawn from os.urandom (in blocks), not from a generator seeded once, whose outputs
    would let a client predict the next ids."""
    reads: list[int] = []

    def urandom(n: int) -> bytes:
        reads.append(n)
        return bytes(range(256)) * (n // 256) + bytes(n % 256)

    monkeypatch.setattr(os, "urandom", urandom)
    ids = EventIds()
    first, second = uuid.UUID(ids()), uuid.UUID(ids())
    assert reads == [EventIds.BLOCK]
    low_bits = (1 << 62) - 1  # below the variant bits: the OS's bits as they came
    assert first.int & low_bits == int.from_bytes(bytes(range(10)), "big") & low_bits
    assert second.int & low_bits == int.from_bytes(bytes(range(10, 20)), "big") & low_bits
    assert first.version == second.version == 7


# ── the consistency check ────────────────────────────────────────────────────


def test_a_store_the_service_wrote_checks_clean(store: Store) -> None:
    service = make_service(store)
    for i in range(3):
        scored = run(service.score(f"u{i}", CANDIDATES))
        run(service.reward(f"u{i}", scored.tip_id, 0.5, None, scored.event_id))
    run(service.score("u0", CANDIDATES))
    run(service.reward("u1", "tip-none", -1.0, OTHER_FEATURES))  # learned on the request
    run(service.reward("rewarded-only", "tip-none", 1.0, OTHER_FEATURES))  # no decision

    report = run(store.check())

    assert report.violations == {}
    assert (report.models, report.decisions) == (4, 4)
    assert not report.summed_rewards
    summed = run(store.check(summed_rewards=True))
    assert summed.ok
    assert summed.summed_rewards
    assert "cumulative_reward_bound" in summed.skipped
