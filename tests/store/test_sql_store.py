"""What only the SQL stores hold, on both of them: rows logged before a column existed,
and migrations of a real schema. Rows are written behind the store's back in SQL, so a
memory store (which only ever holds this release's rows) takes no part.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from tests.store.support import (
    CANDIDATES,
    FEATURES,
    V1,
    database_at_schema_2,
    execute,
    export_all,
    log_decision,
    make_service,
    prototype_models,
    run,
)

from oo_serving.core.features import D, feature_vector
from oo_serving.core.linucb import LinUCBState
from oo_serving.settings import Settings
from oo_serving.store import migrations
from oo_serving.store.base import Store
from oo_serving.store.factory import open_store


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_decisions_logged_before_raw_features_read_as_none_and_empty_context(
    sql_store: Store,
) -> None:
    log_decision(sql_store, "u1", 1, "ev-1")
    execute(sql_store, "UPDATE decision SET candidate_features = NULL, context = NULL")

    _, decisions = export_all(sql_store, "u1")

    assert [(d.candidate_features, d.context) for d in decisions] == [(None, {})]
    assert decisions[0].candidate_X.shape == (2, D)


def test_migration_3_turns_linucb_v1_models_into_their_exact_states(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = database_at_schema_2(backend, tmp_path, request)
    store = open_store(Settings(database_url=url))
    run(store.open())  # migrates
    try:
        for user_id, (A_inv, b) in prototype_models().items():
            user = run(store.get_user(user_id))
            assert user is not None
            assert user.state == A_inv.tobytes() + b.tobytes()
            state = V1.decode(user.state, 1)
            assert state.A_inv.tobytes() == A_inv.tobytes()
            assert state.b.tobytes() == b.tobytes()
            assert (user.policy, user.state_version) == ("linucb-v1", 1)
            assert (user.pulls, user.reward_count, user.cumulative_reward) == (1, 1, 0.5)
            assert user.last_updated_ms == 77
            _, (decision,) = export_all(store, user_id)
            assert (decision.candidate_features, decision.context) == (None, {})
            assert (decision.event_id, decision.features, decision.reward) == (
                f"ev-{user_id}", FEATURES, 0.5,
            )  # fmt: skip
            assert decision.candidate_X.shape == (2, D)
        if backend == "sqlite":
            assert execute(store, "SELECT DISTINCT typeof(state) FROM user_model") == [("blob",)]
        else:
            assert run(store.get_user("never-filled")) is None
            assert execute(
                store,
                "SELECT state, state_version FROM user_model WHERE user_id = 'never-filled'",
            ) == [(None, None)]
            execute(store, "DELETE FROM user_model WHERE user_id = 'never-filled'")
        report = run(store.check())
        assert report.violations == {}
        assert (report.models, report.decisions) == (3, 3)
        # Served on from there: the migrated model is the one the service learns on.
        service = make_service(store)
        scored = run(service.score("learned", CANDIDATES))
        run(service.reward("learned", scored.tip_id, 1.0, None, scored.event_id))
        x = feature_vector(next(c.features for c in CANDIDATES if c.id == scored.tip_id))
        A_inv, b = prototype_models()["learned"]
        expected = V1.update(LinUCBState(A_inv, b), x, 1.0)
        assert run(store.get_user("learned")).state == V1.encode(expected)  # type: ignore[union-attr]
    finally:
        run(store.close())
    if backend == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(
                migrations.load("sqlite")
            )
            columns = [r[1] for r in conn.execute("PRAGMA table_info(user_model)")]
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    else:
        with psycopg.connect(url) as pg:
            columns = [
                r[0]
                for r in pg.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = 'user_model' ORDER BY ordinal_position"
                )
            ]
    assert "a_inv" not in columns
    assert "b" not in columns
    assert {"state", "state_version"} <= set(columns)
