"""`oo-serving check`: a database the service wrote checks clean, every kind of damage is
named with its user, and the check reads without getting in a serving process's way.

Databases are real (SQLite files, throwaway PostgreSQL databases) and written by the real
service; damage is done by writing them directly, as a fault or a hand would. The
command runs as an operator runs it: a subprocess, judged by exit code and output.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb
from tests.support import oo_serving

from oo_serving.assignment import Assignment
from oo_serving.check import KINDS, MAX_EXAMPLES, CheckReport, check_decision, check_model
from oo_serving.core import registry
from oo_serving.core.exploration import Exploration
from oo_serving.core.features import D, TaskFeatures, feature_matrix
from oo_serving.core.linucb import SYMMETRY_RTOL, LinUCBState
from oo_serving.core.linucb_v2 import V2_D, LinUCBV2State
from oo_serving.core.registry import DEFAULTS
from oo_serving.service import Candidate, Service
from oo_serving.settings import Settings
from oo_serving.store import consistency, migrations
from oo_serving.store.factory import open_store
from oo_serving.store.postgres import _SCHEMA_TABLE

USERS = ("user-a", "user.b", "user_c")
VICTIM = "user.b"  # the user every damage below is done to
V2_USER = "user-v2"  # served by linucb-v2 from the start
SWITCHED = "user-switched"  # served by linucb-v1, then by linucb-v2 (a rebuilt model)
V1 = DEFAULTS["linucb-v1"]
V2 = DEFAULTS["linucb-v2"]
CANDIDATES = [
    Candidate("tip-small", TaskFeatures(12, False, 0.0, 1)),
    Candidate("tip-big", TaskFeatures(6, True, 30.0, 4)),
    Candidate("tip-mid", TaskFeatures(18, False, 15.0, 2)),
]


# ── databases written by the service, and written over by hand ───────────────


@dataclass
class Database:
    """A database's URL, and direct writes to it that bypass the service."""

    backend: str
    url: str

    @property
    def path(self) -> Path:
        return Path(self.url.removeprefix("sqlite:///"))

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """One statement, committed; `?` placeholders on both backends."""
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                conn.execute(sql, params)
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(sql.replace("?", "%s").encode(), params)

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path)) as conn:
                row = conn.execute(sql, params).fetchone()
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                row = conn.execute(sql.replace("?", "%s").encode(), params).fetchone()
        assert row is not None, sql
        return tuple(row)

    def v1_state(self, user_id: str) -> LinUCBState:
        """A linucb-v1 user's stored (A⁻¹, b), writable."""
        (raw,) = self.one("SELECT state FROM user_model WHERE user_id = ?", (user_id,))
        state: LinUCBState = V1.decode(bytes(raw), 1)
        return LinUCBState(state.A_inv.copy(), state.b.copy())

    def set_state(self, user_id: str, raw: bytes) -> None:
        self.execute("UPDATE user_model SET state = ? WHERE user_id = ?", (raw, user_id))

    def set_a_inv(self, user_id: str, A_inv: np.ndarray) -> None:
        """Replace A⁻¹ in a linucb-v1 user's state, keeping b (A_inv of any size)."""
        b = self.v1_state(user_id).b
        raw = np.ascontiguousarray(A_inv, dtype="<f8").tobytes() + b.tobytes()
        self.set_state(user_id, raw)


async def write_like_the_service(url: str) -> None:
    """A few users scored and rewarded through the real Service, every path a write takes:
    rewards by event_id, by tip, on request features, a repeat, pruning, an erasure; a
    user of linucb-v2 (and its pooled statistics), and one moved from linucb-v1 to
    linucb-v2, whose model is rebuilt from its log."""
    store = open_store(Settings(database_url=url))
    await store.open()
    try:
        v2 = Service(store, Assignment.single(V2), history_size=2, decision_log_per_user=3)
        for reward in (1.0, -0.5):
            scored = await v2.score(V2_USER, CANDIDATES, {"hour_of_day": 8, "day_of_week": 2})
            await v2.reward(V2_USER, scored.tip_id, reward, None, scored.event_id)
        service = Service(store, history_size=2, decision_log_per_user=3)
        scored = await service.score(SWITCHED, CANDIDATES)
        await service.reward(SWITCHED, scored.tip_id, 0.5, None, scored.event_id)
        await v2.score(SWITCHED, CANDIDATES)
        await v2.population.flush()
        for round_ in range(4):
            for i, user in enumerate(USERS):
                scored = await service.score(user, CANDIDATES)
                features = next(c.features for c in CANDIDATES if c.id == scored.tip_id)
                reward = (-1.0, 0.5, 1.0)[(i + round_) % 3]
                await service.reward(user, scored.tip_id, reward, features, scored.event_id)
        repeat = await service.reward(USERS[2], scored.tip_id, 1.0, features, scored.event_id)
        assert not repeat.learned
        await service.reward(USERS[0], "tip-big", -0.5, CANDIDATES[1].features)  # latest by tip
        await service.reward("rewarded-only", "t", 1.0, CANDIDATES[0].features)  # no decision
        await service.score("erased", CANDIDATES)
        await service.reset("erased")
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A database of this test's own, as the service left it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/oo.db"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    asyncio.run(write_like_the_service(url))
    return Database(str(request.param), url)


def oo_check(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return oo_serving("check", "--database", url, *extra)


def violation_line(output: str, kind: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"violation {kind}:")]
    assert len(lines) == 1, f"no line for {kind}:\n{output}"
    return lines[0]


# ── the command on sound and on damaged databases ────────────────────────────


def test_a_database_the_service_wrote_checks_clean(database: Database) -> None:
    done = oo_check(database.url)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # USERS, "rewarded-only", V2_USER and SWITCHED; each of USERS keeps its last 3 of 4
    # decisions, V2_USER and SWITCHED have 2.
    assert "checked 6 models: " in done.stdout
    assert "checked 13 decisions: " in done.stdout
    assert "checked across tables: " in done.stdout
    if database.backend == "sqlite":
        assert "checked integrity_check: ok" in lines
    else:
        assert any(line.startswith("skipped integrity_check: PostgreSQL") for line in lines)
    assert lines[-1] == "oo-serving check: OK, no violations in 6 models and 13 decisions"
    assert not any(line.startswith("violation") for line in lines)


def test_json_report_of_a_clean_database(database: Database) -> None:
    done = oo_check(database.url, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["backend"] == database.backend
    assert report["database"] == (
        str(database.path) if database.backend == "sqlite" else database.url
    )
    assert (report["models"], report["decisions"], report["violations"]) == (6, 13, {})
    assert report["integrity_check"] == ("ok" if database.backend == "sqlite" else None)


def _nan_in_a_inv(db: Database) -> None:
    A_inv = db.v1_state(VICTIM).A_inv
    A_inv[2, 3] = math.nan
    db.set_a_inv(VICTIM, A_inv)


def _asymmetric_a_inv(db: Database) -> None:
    A_inv = db.v1_state(VICTIM).A_inv
    A_inv[0, 1] += 1e-3
    db.set_a_inv(VICTIM, A_inv)


def _indefinite_a_inv(db: Database) -> None:
    A_inv = db.v1_state(VICTIM).A_inv
    A_inv[4, 4] = -A_inv[4, 4]  # still symmetric, no longer positive definite
    db.set_a_inv(VICTIM, A_inv)


def _truncated_a_inv(db: Database) -> None:
    db.set_a_inv(VICTIM, db.v1_state(VICTIM).A_inv.ravel()[:-1])


DAMAGE: dict[str, tuple[Callable[[Database], None], str]] = {
    "NaN in A_inv": (_nan_in_a_inv, "model_not_finite"),
    "A_inv not symmetric": (_asymmetric_a_inv, "model_not_symmetric"),
    "A_inv not positive definite": (_indefinite_a_inv, "model_not_positive_definite"),
    "state truncated": (_truncated_a_inv, "model_not_decodable"),
    "a state of another policy's d": (
        lambda db: db.set_state(VICTIM, V2.encode(V2.initial_state())),
        "model_not_decodable",
    ),
    "a state version the policy does not know": (
        lambda db: db.execute(
            "UPDATE user_model SET state_version = 2 WHERE user_id = ?", (VICTIM,)
        ),
        "model_not_decodable",
    ),
    "negative pulls": (
        lambda db: db.execute("UPDATE user_model SET pulls = -1 WHERE user_id = ?", (VICTIM,)),
        "model_negative_count",
    ),
    "more reward than rewards": (
        lambda db: db.execute(
            "UPDATE user_model SET cumulative_reward = reward_count + 0.5 WHERE user_id = ?",
            (VICTIM,),
        ),
        "model_reward_out_of_bounds",
    ),
    "unknown policy": (
        lambda db: db.execute(
            "UPDATE user_model SET policy = 'linucb-v9' WHERE user_id = ?", (VICTIM,)
        ),
        "model_unknown_policy",
    ),
    "decisions without their model": (
        lambda db: db.execute("DELETE FROM user_model WHERE user_id = ?", (VICTIM,)),
        "decision_without_model",
    ),
    "a decision above pulls": (
        lambda db: db.execute(
            "UPDATE user_model SET pulls = pulls - 1 WHERE user_id = ?", (VICTIM,)
        ),
        "decision_seq_out_of_range",
    ),
    "a tip not among the candidates": (
        lambda db: db.execute(
            "UPDATE decision SET tip_id = 'tip-gone' WHERE user_id = ? AND seq = 3", (VICTIM,)
        ),
        "decision_tip_not_among_candidates",
    ),
    "x not the chosen candidate's": (
        lambda db: db.execute(
            "UPDATE decision SET x = ? WHERE user_id = ? AND seq = 3",
            (bytes(8 * D), VICTIM),
        ),
        "decision_x_not_chosen_candidate",
    ),
    "candidate_x truncated": (
        lambda db: db.execute(
            "UPDATE decision SET candidate_x = x WHERE user_id = ? AND seq = 3", (VICTIM,)
        ),
        "decision_not_decodable",
    ),
    "candidate_features of another n": (
        lambda db: db.execute(
            "UPDATE decision SET candidate_features = ? WHERE user_id = ? AND seq = 3",
            (bytes(8 * 4 * 2), VICTIM),
        ),
        "decision_not_decodable",
    ),
    "a NaN among the raw features": (
        lambda db: db.execute(
            "UPDATE decision SET candidate_features = ? WHERE user_id = ? AND seq = 3",
            (np.full(4 * len(CANDIDATES), math.nan).tobytes(), VICTIM),
        ),
        "decision_not_decodable",
    ),
    "a context that is not an object": (
        lambda db: db.execute(
            "UPDATE decision SET context = ? WHERE user_id = ? AND seq = 3",
            ("[1, 2]" if db.backend == "sqlite" else Jsonb([1, 2]), VICTIM),
        ),
        "decision_not_decodable",
    ),
    "a propensity of 0": (
        lambda db: db.execute(
            "UPDATE decision SET propensity = 0 WHERE user_id = ? AND seq = 2", (VICTIM,)
        ),
        "decision_bad_propensity",
    ),
    "a reward outside [-1, 1]": (
        lambda db: db.execute(
            "UPDATE decision SET reward = 2 WHERE user_id = ? AND seq = 2", (VICTIM,)
        ),
        "decision_bad_reward",
    ),
    "candidate_p not summing to 1": (
        lambda db: db.execute(
            "UPDATE decision SET candidate_p = ? WHERE user_id = ? AND seq = 3",
            (np.array([0.5, 0.2, 0.2]).tobytes(), VICTIM),
        ),
        "decision_bad_probabilities",
    ),
    "candidate_p of another n": (
        lambda db: db.execute(
            "UPDATE decision SET candidate_p = ? WHERE user_id = ? AND seq = 3",
            (np.array([0.5, 0.5]).tobytes(), VICTIM),
        ),
        "decision_bad_probabilities",
    ),
    "a propensity that is not candidate_p at the tip": (
        # Still in (0, 1]: only candidate_p says it is not what was logged.
        lambda db: db.execute(
            "UPDATE decision SET propensity = 0.5 WHERE user_id = ? AND seq = 3", (VICTIM,)
        ),
        "decision_bad_probabilities",
    ),
    "greedy not the likeliest candidate": (
        lambda db: db.execute(
            "UPDATE decision SET greedy = CASE WHEN greedy = 0 THEN 1 ELSE 0 END"
            " WHERE user_id = ? AND seq = 3",
            (VICTIM,),
        ),
        "decision_bad_probabilities",
    ),
    "greedy out of range": (
        lambda db: db.execute(
            "UPDATE decision SET greedy = 3 WHERE user_id = ? AND seq = 3", (VICTIM,)
        ),
        "decision_bad_probabilities",
    ),
    "a shadow choice out of range": (
        lambda db: db.execute(
            "UPDATE decision SET shadow = ? WHERE user_id = ? AND seq = 3",
            (
                '{"linucb-v2": 3}' if db.backend == "sqlite" else Jsonb({"linucb-v2": 3}),
                VICTIM,
            ),
        ),
        "decision_bad_probabilities",
    ),
    "a shadow that is not an object": (
        lambda db: db.execute(
            "UPDATE decision SET shadow = ? WHERE user_id = ? AND seq = 3",
            ("[0]" if db.backend == "sqlite" else Jsonb([0]), VICTIM),
        ),
        "decision_bad_probabilities",
    ),
    "a reward with reward_n 0": (
        lambda db: db.execute(
            "UPDATE decision SET reward_n = 0 WHERE user_id = ? AND seq = 2", (VICTIM,)
        ),
        "decision_bad_reward",
    ),
    "a negative reward_n": (
        lambda db: db.execute(
            "UPDATE decision SET reward_n = -1 WHERE user_id = ? AND seq = 2", (VICTIM,)
        ),
        "decision_bad_reward",
    ),
    "rewards counted and learned without a reward": (
        lambda db: db.execute(
            "UPDATE decision SET reward = NULL, rewarded_ms = NULL, reward_source = NULL"
            " WHERE user_id = ? AND seq = 2",
            (VICTIM,),
        ),
        "decision_bad_reward",
    ),
    "a reward without its source": (
        lambda db: db.execute(
            "UPDATE decision SET reward_source = NULL WHERE user_id = ? AND seq = 2", (VICTIM,)
        ),
        "decision_bad_reward",
    ),
    "an unknown reward source": (
        lambda db: db.execute(
            "UPDATE decision SET reward_source = 'server' WHERE user_id = ? AND seq = 2",
            (VICTIM,),
        ),
        "decision_bad_reward",
    ),
    "learned without learned_at": (
        lambda db: db.execute(
            "UPDATE decision SET learned_at = NULL WHERE user_id = ? AND seq = 2", (VICTIM,)
        ),
        "decision_bad_reward",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_kind_of_damage_is_named_with_its_user(database: Database, damage: str) -> None:
    do_damage, kind = DAMAGE[damage]
    do_damage(database)
    done = oo_check(database.url)
    assert done.returncode == 1, done.stdout + done.stderr
    line = violation_line(done.stdout, kind)
    assert VICTIM in line
    assert not any(other in line for other in USERS if other != VICTIM)
    assert done.stdout.splitlines()[-1].startswith("oo-serving check: FAILED, ")


def test_a_committed_empty_model_row_is_reported_on_postgres(fresh_postgres_url: str) -> None:
    """PostgreSQL makes a user's row empty, then fills it in the same transaction."""
    asyncio.run(write_like_the_service(fresh_postgres_url))
    db = Database("postgres", fresh_postgres_url)
    db.execute("INSERT INTO user_model (user_id) VALUES ('user-empty')")
    db.execute(
        "UPDATE user_model SET state = NULL, state_version = NULL WHERE user_id = ?", (VICTIM,)
    )
    done = oo_check(fresh_postgres_url)
    assert done.returncode == 1, done.stdout + done.stderr
    line = violation_line(done.stdout, "model_empty")
    assert line.startswith("violation model_empty: 2 models")
    assert "user-empty" in line
    assert VICTIM in line
    # Its decisions have no model to belong to, and are not also blamed on seq > pulls.
    assert VICTIM in violation_line(done.stdout, "decision_without_model")
    assert "decision_seq_out_of_range" not in done.stdout


def test_duplicate_event_ids_are_reported(database: Database) -> None:
    """The unique index forbids them; a database without it (a bad restore) is caught."""
    database.execute("DROP INDEX decision_event")
    (event_id,) = database.one(
        "SELECT event_id FROM decision WHERE user_id = ? AND seq = 2", (VICTIM,)
    )
    database.execute(
        "UPDATE decision SET event_id = ? WHERE user_id = ? AND seq = 3", (event_id, VICTIM)
    )
    done = oo_check(database.url)
    assert done.returncode == 1, done.stdout
    assert violation_line(done.stdout, "decision_duplicate_event_id").startswith(
        f"violation decision_duplicate_event_id: 2 decisions (decisions sharing their user's"
        f" event_id); users: {VICTIM}"
    )


def test_summed_rewards_are_bounded_by_their_count(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under OO_REWARD_AGGREGATION=sum a decision keeps the sum of its rewards, and a user's
    total may pass its reward_count: a violation only under the other rules."""
    database.execute(
        "UPDATE decision SET reward = 2.0, reward_n = 2 WHERE user_id = ? AND seq = 2", (VICTIM,)
    )
    database.execute(
        "UPDATE user_model SET cumulative_reward = reward_count + 1 WHERE user_id = ?", (VICTIM,)
    )
    done = oo_check(database.url)
    assert done.returncode == 1, done.stdout + done.stderr
    reward_line = violation_line(done.stdout, "decision_bad_reward")
    assert reward_line.startswith(
        "violation decision_bad_reward: 1 decision (seq 2: reward is 2.0)"
    )
    assert reward_line.endswith(f"users: {VICTIM}")
    assert VICTIM in violation_line(done.stdout, "model_reward_out_of_bounds")

    monkeypatch.setenv("OO_REWARD_AGGREGATION", "sum")
    done = oo_check(database.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped cumulative_reward_bound: rewards are summed" in done.stdout
    assert "|reward| <= max(1, reward_n) (rewards summed)" in done.stdout

    # More than its count allows is a violation under sum too.
    database.execute("UPDATE decision SET reward = 2.5 WHERE user_id = ? AND seq = 2", (VICTIM,))
    dialect = consistency.SQLITE if database.backend == "sqlite" else consistency.POSTGRES
    for summed in (True, False):
        report = CheckReport(database.backend, "test")
        for fetch in _fetch_for(database):
            asyncio.run(consistency.scan(report, fetch, dialect, summed_rewards=summed))
        assert report.violations["decision_bad_reward"].examples == [VICTIM]
        assert ("model_reward_out_of_bounds" in report.violations) is not summed
        assert report.summed_rewards is summed


def test_the_store_checks_summed_rewards_when_told(database: Database) -> None:
    database.execute(
        "UPDATE decision SET reward = -2.0, reward_n = 3 WHERE user_id = ? AND seq = 3", (VICTIM,)
    )

    async def check(summed: bool) -> CheckReport:
        store = open_store(Settings(database_url=database.url))
        await store.open(migrate=False)
        try:
            return await store.check(summed_rewards=summed)
        finally:
            await store.close()

    assert asyncio.run(check(True)).violations == {}
    flagged = asyncio.run(check(False)).violations
    assert set(flagged) == {"decision_bad_reward"}
    assert flagged["decision_bad_reward"].examples == [VICTIM]


def test_rows_logged_before_the_log_kept_probabilities_are_sound(database: Database) -> None:
    """What migration 0004 made of a rewarded row: no candidate_p, greedy, shadow or
    learned_at, one reward from the client, learned."""
    database.execute(
        "UPDATE decision SET candidate_p = NULL, greedy = NULL, shadow = NULL,"
        " learned_at = NULL, reward_n = 1, reward_source = 'client' WHERE reward IS NOT NULL"
    )
    database.execute(
        "UPDATE decision SET candidate_p = NULL, greedy = NULL, shadow = NULL WHERE reward IS NULL"
    )
    done = oo_check(database.url)
    assert done.returncode == 0, done.stdout + done.stderr


async def write_with_exploration(url: str, aggregation: str) -> None:
    """Users served by the real Service with exploration (ε = 0.2) and a shadow policy,
    rewarded every way a decision's reward columns change: repeated rewards kept under
    `aggregation`, rewards after the window (not learned), the sweep's default reward,
    and decisions never rewarded. Event ids and the clock are fixed, so which decisions
    explore is too."""
    counter = itertools.count()
    now = [1_700_000_000_000]
    store = open_store(Settings(database_url=url))
    await store.open()
    try:
        service = Service(
            store,
            exploration=Exploration(0.2),
            shadows=[registry.make("linucb-v2")],
            clock_ms=lambda: now[0],
            event_ids=lambda: f"event-{next(counter):04d}",
            reward_wait_ms=60_000,
            aggregation=aggregation,
            decision_log_per_user=100,
        )
        for round_ in range(12):
            for i, user in enumerate(USERS):
                scored = await service.score(user, CANDIDATES, {"hour_of_day": round_})
                now[0] += 1_000
                kind = (i + round_) % 5
                if kind == 4:
                    continue  # the sweep's, below
                reward = (1.0, 0.5, -1.0, 1.0)[kind]
                await service.reward(user, scored.tip_id, reward, None, scored.event_id)
                if kind in (0, 3):  # a repeat: kept under the aggregation rule
                    await service.reward(user, None, reward, None, scored.event_id)
                if kind == 3:  # and one after the window
                    now[0] += 120_000
                    await service.reward(user, None, 1.0, None, scored.event_id)
        late = await service.score("late", CANDIDATES)
        now[0] += 120_000
        await service.reward("late", late.tip_id, -0.5, None, late.event_id)  # never learned
        await service.score("unrewarded", CANDIDATES)
        await service.sweep_default_rewards(0.0, until_ms=now[0] - 1)
        await service.population.flush()
    finally:
        await store.close()


@pytest.mark.parametrize("aggregation", ["first", "sum"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_exploring_log_with_shadows_checks_clean(
    backend: str,
    aggregation: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/oo.db"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    asyncio.run(write_with_exploration(url, aggregation))
    db = Database(backend, url)
    # The log holds what the rules read: every decision with its probabilities and the
    # shadow's choice, some explored, rewards repeated, not learned, from the sweep, and
    # (summed) past 1.
    assert len(set(db.one(
        "SELECT count(*), count(candidate_p), count(greedy), count(shadow) FROM decision"
    ))) == 1  # fmt: skip
    assert db.one("SELECT count(*) FROM decision WHERE propensity < 0.5")[0] > 0  # explored
    assert db.one("SELECT count(*) FROM decision WHERE NOT learned AND reward IS NOT NULL")[0] > 0
    assert db.one("SELECT count(*) FROM decision WHERE reward_source = 'default'")[0] > 0
    assert db.one("SELECT count(*) FROM decision WHERE reward_n > 2")[0] > 0
    assert db.one("SELECT count(*) FROM decision WHERE reward IS NULL")[0] > 0
    assert db.one("SELECT max(reward) FROM decision") == (2.0 if aggregation == "sum" else 1.0,)
    monkeypatch.setenv("OO_REWARD_AGGREGATION", aggregation)
    done = oo_check(url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("oo-serving check: OK, no violations")


def test_the_json_report_names_kinds_counts_and_users(database: Database) -> None:
    _nan_in_a_inv(database)
    database.execute("DELETE FROM user_model WHERE user_id = ?", ("user_c",))
    done = oo_check(database.url, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["models"] == 5
    assert set(report["violations"]) == {"model_not_finite", "decision_without_model"}
    assert report["violations"]["model_not_finite"] == {
        "count": 1,
        "unit": "model",
        "detail": "A_inv has a non-finite value",
        "examples": [VICTIM],
    }
    assert report["violations"]["decision_without_model"]["count"] == 3
    assert report["violations"]["decision_without_model"]["examples"] == ["user_c"]


def test_sqlite_integrity_check_failures_are_reported(tmp_path: Path) -> None:
    """An index whose entries no longer match its table (made so through writable_schema,
    deterministically) is what `PRAGMA integrity_check` finds and nothing else can."""
    url = f"sqlite:///{tmp_path}/oo.db"
    asyncio.run(write_like_the_service(url))
    with closing(sqlite3.connect(tmp_path / "oo.db", isolation_level=None)) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX decision_tip ON decision"
            " (user_id, event_id, seq)' WHERE name = 'decision_tip'"
        )
    done = oo_check(url)
    assert done.returncode == 1, done.stdout + done.stderr
    line = violation_line(done.stdout, "sqlite_integrity")
    assert line.startswith("violation sqlite_integrity: 13 problems; first: row ")
    assert "missing from index decision_tip" in line
    assert "checked integrity_check" not in done.stdout


def test_a_file_sqlite_finds_corrupt_is_a_violation(tmp_path: Path) -> None:
    """A damaged page (the decision table's root, overwritten) is reported, exit 1: the
    database opened, and what it holds is wrong."""
    url = f"sqlite:///{tmp_path}/oo.db"
    asyncio.run(write_like_the_service(url))
    with closing(sqlite3.connect(tmp_path / "oo.db", isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'decision'")
        root_page = root.fetchone()[0]
    with (tmp_path / "oo.db").open("r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(b"\xff" * 16)  # no valid b-tree page starts so
    done = oo_check(url)
    assert done.returncode == 1, done.stdout + done.stderr
    line = violation_line(done.stdout, "sqlite_unreadable")
    assert line.endswith("first: database disk image is malformed")


def test_a_missing_sqlite_file_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    where = tmp_path / "not-here" / "oo.db"
    done = oo_check(f"sqlite:///{where}")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == f"oo-serving: no database at {where}"
    assert not where.parent.exists()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_schema_that_is_not_current_is_refused_and_left_as_it_is(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A check changes nothing: it does not apply the migration an older schema lacks."""
    known = migrations.load(backend)
    latest = len(known)
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/old.db"
        with closing(sqlite3.connect(tmp_path / "old.db", isolation_level=None)) as conn:
            for migration in known[:-1]:
                conn.executescript(migration.sql)
            conn.execute(f"PRAGMA user_version = {latest - 1}")
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(_SCHEMA_TABLE)
            for migration in known[:-1]:
                pg.execute(migration.sql.encode())
                pg.execute(
                    "INSERT INTO oo_schema_version (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )

    done = oo_check(url)

    assert done.returncode == 2, done.stdout
    assert f"schema version {latest - 1}" in done.stderr
    assert "oo-serving migrate" in done.stderr
    db = Database(backend, url)
    if backend == "sqlite":
        with closing(sqlite3.connect(db.path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == latest - 1
    else:
        assert db.one("SELECT max(version) FROM oo_schema_version") == (latest - 1,)
    assert db.one("SELECT count(*) FROM user_model") == (0,)
    with pytest.raises((sqlite3.OperationalError, psycopg.errors.UndefinedTable)):
        db.one("SELECT count(*) FROM report")  # the latest migration's table is not there
    assert oo_serving("migrate", "--database", url).returncode == 0
    assert oo_check(url).returncode == 0


def test_a_file_that_is_not_a_database_exits_2(tmp_path: Path) -> None:
    where = tmp_path / "oo.db"
    where.write_bytes(b"not a database, " * 512)
    done = oo_check(f"sqlite:///{where}")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("oo-serving: ")
    assert "file is not a database" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_check_runs_clean_beside_a_serving_server_under_load(
    backend: str, tmp_path: Path, server_factory: Any, request: pytest.FixtureRequest
) -> None:
    """Reads only, a snapshot per statement: no false violation from writes in flight, and
    no request of the server fails while the check reads."""
    if backend == "sqlite":
        server = server_factory(workers=2)
    else:
        server = server_factory(
            workers=2, database_url=request.getfixturevalue("fresh_postgres_url")
        )
    stop = threading.Event()
    statuses: list[int] = []

    def load(worker: int) -> None:
        candidates = [{"id": f"t{i}", "content": "x", "source": "s"} for i in range(5)]
        with server.client() as client:
            n = 0
            while not stop.is_set():
                user = f"load-{worker}-{n % 7}"
                scored = client.post("/score", json={"user_id": user, "candidates": candidates})
                statuses.append(scored.status_code)
                if scored.status_code == 200:
                    body = scored.json()
                    rewarded = client.post(
                        "/reward",
                        json={"user_id": user, "tip_id": body["tip_id"], "reward": 0.5,
                              "event_id": body["event_id"]},
                    )  # fmt: skip
                    statuses.append(rewarded.status_code)
                n += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for _ in range(3):
            before = len(statuses)
            done = oo_check(server.database_url)
            assert done.returncode == 0, done.stdout + done.stderr
            assert len(statuses) > before  # the server wrote while the check read
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert statuses
    assert set(statuses) == {200}
    with httpx.Client(base_url=server.base_url) as client:
        assert client.get("/ready").status_code == 200


# ── the shared reads: keyset pages across the page boundaries ────────────────


def _fetch_for(db: Database) -> Iterator[consistency.Fetch]:
    if db.backend == "sqlite":
        with closing(sqlite3.connect(db.path)) as conn:

            async def fetch_sqlite(sql: str, params: tuple[Any, ...]) -> list[Any]:
                return conn.execute(sql, params).fetchall()

            yield fetch_sqlite
    else:
        with psycopg.connect(db.url, autocommit=True) as pg:

            async def fetch_pg(sql: str, params: tuple[Any, ...]) -> list[Any]:
                return pg.execute(sql.encode(), params).fetchall()

            yield fetch_pg


def test_pages_cover_every_row_once(database: Database) -> None:
    """Pages of 2 rows: every model and decision read once, damage on the last page found."""
    database.execute("UPDATE user_model SET pulls = -5 WHERE user_id = ?", ("user_c",))
    database.execute("UPDATE decision SET propensity = 2 WHERE user_id = ?", ("user_c",))
    dialect = consistency.SQLITE if database.backend == "sqlite" else consistency.POSTGRES
    report = CheckReport(database.backend, "test")
    for fetch in _fetch_for(database):
        asyncio.run(consistency.scan(report, fetch, dialect, model_page=2, decision_page=2))
    assert (report.models, report.decisions) == (6, 13)
    assert set(report.violations) == {
        "model_negative_count",
        "decision_bad_propensity",
        "decision_bad_probabilities",  # a propensity of 2 is not candidate_p at the tip
        "decision_seq_out_of_range",
    }
    assert report.violations["decision_bad_propensity"].count == 3
    assert report.violations["decision_bad_probabilities"].count == 3
    assert report.violations["decision_bad_propensity"].examples == ["user_c"]
    assert report.violations["decision_seq_out_of_range"].count == 3


# ── the per-row rules, on plain values ───────────────────────────────────────


def _f64(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def _kinds(problems: list[Any]) -> set[str]:
    return {p.kind for p in problems}


def _v1(A_inv: np.ndarray | None = None, b: np.ndarray | None = None) -> bytes:
    return _f64(np.identity(D) if A_inv is None else A_inv) + _f64(np.zeros(D) if b is None else b)


def test_a_long_run_of_linucb_updates_stays_a_sound_model() -> None:
    """No false alarm from rounding: 20,000 seeded updates of A⁻¹ by Sherman–Morrison, and
    of linucb-v2's discounted statistics."""
    rng = np.random.default_rng(7)
    features = [
        TaskFeatures(int(h), bool(o), float(a), int(p))
        for h, o, a, p in zip(
            rng.integers(0, 24, 20_000),
            rng.integers(0, 2, 20_000),
            rng.uniform(0, 40, 20_000),
            rng.integers(1, 5, 20_000),
            strict=True,
        )
    ]
    rewards = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=20_000)
    total = float(np.sum(rewards))
    for policy in (V1, V2):
        state = policy.initial_state()
        for x, r in zip(policy.features(features), rewards, strict=True):
            state = policy.update(state, x, float(r))
        raw = policy.encode(state)
        assert check_model(policy.name, raw, 1, 20_000, 20_000, total) == []


def test_cumulative_reward_at_its_bound_is_sound() -> None:
    assert check_model("linucb-v1", _v1(), 1, 3, 3, -3.0) == []
    assert _kinds(check_model("linucb-v1", _v1(), 1, 3, 3, -3.0000000001)) == {
        "model_reward_out_of_bounds"
    }


def test_the_policies_rules_are_kinds_of_the_report() -> None:
    """Every rule a policy reports is a kind the report knows, under its new name."""
    assert {"model_not_symmetric", "model_not_positive_definite", "model_not_finite"} <= set(KINDS)
    assert not any(kind.startswith("model_a_inv") for kind in KINDS)
    indefinite = LinUCBV2State(D=-np.identity(V2_D), b=np.zeros(V2_D))
    assert _kinds(check_model("linucb-v2", V2.encode(indefinite), 1, 0, 0, 0.0)) == {
        "model_not_positive_definite"
    }


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ({"state": "text"}, "model_not_decodable"),
        ({"state": _v1()[:-8]}, "model_not_decodable"),
        ({"state": _v1() + b"\x00"}, "model_not_decodable"),
        ({"state_version": 2}, "model_not_decodable"),
        ({"state_version": None}, "model_not_decodable"),
        ({"state_version": "1"}, "model_not_decodable"),
        ({"policy": "linucb-v2"}, "model_not_decodable"),  # a v1 state is not v2's size
        ({"state": None, "state_version": None, "policy": None}, "model_empty"),
        ({"state": None}, "model_empty"),
        ({"policy": "linucb-v9"}, "model_unknown_policy"),
        ({"policy": None}, "model_unknown_policy"),
        ({"pulls": 2.5}, "model_not_decodable"),
        ({"reward_count": -1}, "model_negative_count"),
        ({"cumulative_reward": math.inf}, "model_not_finite"),
        ({"state": _v1(b=np.full(D, math.nan))}, "model_not_finite"),
        ({"state": _v1(A_inv=np.zeros((D, D)))}, "model_not_positive_definite"),
        ({"state": _v1(A_inv=np.identity(D) + SYMMETRY_RTOL * 10 * np.tri(D, k=-1))},
         "model_not_symmetric"),
    ],
)  # fmt: skip
def test_model_rules(values: dict[str, Any], kind: str) -> None:
    row: dict[str, Any] = {
        "policy": "linucb-v1", "state": _v1(), "state_version": 1,
        "pulls": 1, "reward_count": 1, "cumulative_reward": 1.0,
    }  # fmt: skip
    assert check_model(**row) == []
    assert kind in _kinds(check_model(**{**row, **values}))
    memoryview_row = {**row, "state": memoryview(_v1())}  # what a driver may hand out
    assert check_model(**memoryview_row) == []


_UNREWARDED: dict[str, Any] = {
    "reward": None, "rewarded_ms": None, "reward_n": 0, "learned": False, "learned_at": None,
    "reward_source": None,
}  # fmt: skip


def _decision_row() -> dict[str, Any]:
    """A sound decision of linucb-v1 between "a" and "b", logged under epsilon 0.2 (the
    policy chose "b", shown), with a shadow policy, rewarded once and learned."""
    tasks = [c.features for c in CANDIDATES[:2]]
    X = feature_matrix(tasks)
    return {
        "policy": "linucb-v1", "tip_id": "b", "features": {"hour_of_day": 6},
        "x": _f64(X[1]), "score": 1.5, "propensity": 0.9, "candidate_ids": ["a", "b"],
        "candidate_x": _f64(X), "candidate_features": _f64(np.array(tasks, dtype=float)),
        "context": {"hour_of_day": 6, "day_of_week": 0}, "reward": -1.0, "rewarded_ms": 7,
        "candidate_p": _f64(np.array([0.1, 0.9])), "greedy": 1, "shadow": {"linucb-v2": 0},
        "reward_n": 1, "learned": True, "learned_at": 3, "reward_source": "client",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ({"policy": "other"}, "decision_unknown_policy"),
        ({"features": None}, "decision_not_decodable"),
        ({"candidate_ids": []}, "decision_not_decodable"),
        ({"candidate_ids": ["a", 2]}, "decision_not_decodable"),
        ({"x": b"\x00" * 7}, "decision_not_decodable"),
        ({"x": _f64(np.zeros(D + 1))}, "decision_not_decodable"),
        ({"policy": "linucb-v2"}, "decision_not_decodable"),  # d = 11, x has 5
        ({"candidate_features": b"\x00" * 8 * 4}, "decision_not_decodable"),
        ({"candidate_features": "text"}, "decision_not_decodable"),
        ({"candidate_features": _f64(np.full((2, 4), math.inf))}, "decision_not_decodable"),
        ({"context": [1]}, "decision_not_decodable"),
        ({"context": "text"}, "decision_not_decodable"),
        ({"score": math.nan}, "decision_not_finite"),
        ({"tip_id": "c"}, "decision_tip_not_among_candidates"),
        ({"propensity": 0.0}, "decision_bad_propensity"),
        ({"propensity": math.nan}, "decision_bad_propensity"),
        ({"propensity": 1.5}, "decision_bad_propensity"),
        ({"reward": 0.5, "rewarded_ms": None}, "decision_bad_reward"),
        ({"reward": None, "rewarded_ms": 5}, "decision_bad_reward"),
        ({"reward": math.nan}, "decision_bad_reward"),
        ({"reward": 1.5}, "decision_bad_reward"),
        ({"candidate_p": _f64(np.array([0.2, 0.9]))}, "decision_bad_probabilities"),
        ({"candidate_p": _f64(np.array([0.1, 0.9, 0.0]))}, "decision_bad_probabilities"),
        ({"candidate_p": _f64(np.array([-0.1, 1.1]))}, "decision_bad_probabilities"),
        ({"candidate_p": _f64(np.array([math.nan, 0.9]))}, "decision_bad_probabilities"),
        ({"candidate_p": "text"}, "decision_bad_probabilities"),
        ({"propensity": 0.8}, "decision_bad_probabilities"),  # candidate_p[1] is 0.9
        ({"propensity": 0.9 + 1e-11}, "decision_bad_probabilities"),
        ({"greedy": 0}, "decision_bad_probabilities"),  # 0.1 < 0.9
        ({"greedy": 2}, "decision_bad_probabilities"),
        ({"greedy": -1}, "decision_bad_probabilities"),
        ({"greedy": "1"}, "decision_bad_probabilities"),
        ({"greedy": True}, "decision_bad_probabilities"),
        ({"shadow": {"linucb-v2": 2}}, "decision_bad_probabilities"),
        ({"shadow": {"linucb-v2": "0"}}, "decision_bad_probabilities"),
        ({"shadow": {"linucb-v2": 1.0}}, "decision_bad_probabilities"),
        ({"shadow": [0]}, "decision_bad_probabilities"),
        ({"reward_n": -1}, "decision_bad_reward"),
        ({"reward_n": 0}, "decision_bad_reward"),
        ({"reward_n": "1"}, "decision_bad_reward"),
        ({"reward_n": None}, "decision_bad_reward"),
        (_UNREWARDED | {"reward_n": 1}, "decision_bad_reward"),
        (_UNREWARDED | {"learned": True}, "decision_bad_reward"),
        (_UNREWARDED | {"reward_source": "client"}, "decision_bad_reward"),
        ({"reward_source": None}, "decision_bad_reward"),
        ({"reward_source": "server"}, "decision_bad_reward"),
        ({"learned_at": None}, "decision_bad_reward"),
        ({"learned_at": 2.5}, "decision_bad_reward"),
        ({"learned": 2}, "decision_bad_reward"),
        ({"learned": None}, "decision_bad_reward"),
    ],
)
def test_decision_rules(values: dict[str, Any], kind: str) -> None:
    row = _decision_row()
    assert check_decision(**row) == []
    assert check_decision(**{**row, "candidate_features": None, "context": None}) == []
    assert kind in _kinds(check_decision(**{**row, **values}))


def test_sound_decisions_of_every_kind() -> None:
    row = _decision_row()
    # As SQLite hands a boolean out; never rewarded; not learned (after the window).
    assert check_decision(**{**row, "learned": 1}) == []
    assert check_decision(**{**row, **_UNREWARDED}) == []
    assert check_decision(**{**row, "learned": False, "learned_at": None}) == []
    # Explored: the tip is not the policy's choice, its propensity its own small one.
    explored = {**row, "tip_id": "a", "x": row["candidate_x"][: 8 * D], "propensity": 0.1}
    assert check_decision(**explored) == []
    # Without exploration: all the probability on the tip; no shadow policy.
    greedy_only = {**row, "candidate_p": _f64(np.array([0.0, 1.0])), "propensity": 1.0}
    assert check_decision(**{**greedy_only, "shadow": None}) == []
    assert check_decision(**{**greedy_only, "shadow": {}}) == []
    # Logged before the log kept probabilities (migrated: learned, with no learned_at).
    before = {"candidate_p": None, "greedy": None, "shadow": None, "learned_at": None}
    assert check_decision(**{**row, **before, "propensity": 1.0}) == []


def test_a_row_counts_once_per_kind() -> None:
    problems = check_decision(
        **{**_decision_row(), "reward_n": 0, "reward_source": "x", "learned_at": None,
           "greedy": 0, "shadow": {"s": 9}}
    )  # fmt: skip
    assert sorted(p.kind for p in problems) == [
        "decision_bad_probabilities",
        "decision_bad_reward",
    ]
    details = {p.kind: p.detail for p in problems}
    assert details["decision_bad_reward"] == (
        "reward_source is 'x'; a reward with reward_n 0; learned without learned_at"
    )
    assert details["decision_bad_probabilities"].startswith("candidate_p[greedy = 0] is 0.1")


def test_summed_rewards_are_bounded_by_reward_n() -> None:
    row = {**_decision_row(), "reward": 2.0, "reward_n": 2}
    assert check_decision(**row, summed=True) == []
    assert _kinds(check_decision(**row)) == {"decision_bad_reward"}
    assert check_decision(**{**row, "reward": -2.0}, summed=True) == []
    assert _kinds(check_decision(**{**row, "reward": 2.5}, summed=True)) == {"decision_bad_reward"}
    assert _kinds(check_decision(**{**row, "reward": math.inf}, summed=True)) == {
        "decision_bad_reward"
    }
    # One reward is in [-1, 1] whatever the rule.
    assert _kinds(check_decision(**{**row, "reward_n": 1}, summed=True)) == {"decision_bad_reward"}
    model = ("linucb-v1", _v1(), 1, 3, 3)
    assert check_model(*model, 5.0, summed=True) == []
    assert _kinds(check_model(*model, 5.0)) == {"model_reward_out_of_bounds"}
    assert _kinds(check_model(*model, math.inf, summed=True)) == {"model_not_finite"}


def test_the_report_says_what_summed_rewards_are_held_to() -> None:
    plain = CheckReport("sqlite", "x")
    summed = CheckReport("sqlite", "x", summed_rewards=True)
    assert "reward in [-1, 1]" in plain.lines()[2]
    assert "|cumulative_reward| <= reward_count" in plain.lines()[1]
    assert "|reward| <= max(1, reward_n) (rewards summed)" in summed.lines()[2]
    assert "|cumulative_reward|" not in summed.lines()[1]
    assert KINDS["decision_bad_probabilities"] == "decision"


def test_a_linucb_v2_decision_is_held_to_d_11() -> None:
    tasks = [c.features for c in CANDIDATES]
    X = V2.features(tasks)
    row = {
        "policy": "linucb-v2", "tip_id": "tip-mid", "features": tasks[2]._asdict(),
        "x": _f64(X[2]), "score": 0.5, "propensity": 1.0,
        "candidate_ids": [c.id for c in CANDIDATES], "candidate_x": _f64(X),
        "candidate_features": _f64(np.array(tasks, dtype=float)), "context": {},
        **_UNREWARDED, "candidate_p": _f64(np.array([0.0, 0.0, 1.0])), "greedy": 2,
        "shadow": None,
    }  # fmt: skip
    assert check_decision(**row) == []
    v1_x = _f64(feature_matrix(tasks))
    assert _kinds(check_decision(**{**row, "candidate_x": v1_x})) == {"decision_not_decodable"}


def test_the_report_keeps_a_bounded_number_of_examples() -> None:
    report = CheckReport("sqlite", "x")
    for i in range(MAX_EXAMPLES + 5):
        report.add("decision_bad_reward", 2, [f"u{i}", f"u{i}"], "detail")
    tally = report.violations["decision_bad_reward"]
    assert tally.count == 2 * (MAX_EXAMPLES + 5)
    assert tally.examples == [f"u{i}" for i in range(MAX_EXAMPLES)]
    line = violation_line("\n".join(report.lines()), "decision_bad_reward")
    assert line.endswith(f"u{MAX_EXAMPLES - 1}, ...")
    assert report.lines()[-1] == (
        "oo-serving check: FAILED, 50 violations of 1 kind in 0 models and 0 decisions"
    )
