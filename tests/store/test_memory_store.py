"""What only the memory store does: one process's database, opened by `memory://`, shared
by the stores opened on it and by any event loop or thread, refused where another
process would have to read it, and checked like the others."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from tests.store.support import (
    CANDIDATES,
    assert_exports_beyond_the_slots_answer_busy,
    event_ids_of,
    log_decision,
    make_service,
    reopened,
    run,
)
from tests.support import oo_serving

from oo_serving.errors import StoreUnavailable
from oo_serving.service import Service
from oo_serving.settings import Settings
from oo_serving.store.factory import open_store
from oo_serving.store.memory import MemoryStore

MEMORY = Settings(database_url="memory://")


def test_each_memory_url_opens_a_new_empty_store() -> None:
    first, second = open_store(MEMORY), open_store(MEMORY)
    assert isinstance(first, MemoryStore)
    assert isinstance(second, MemoryStore)
    run(first.open())
    run(second.open())
    try:
        log_decision(first, "u1", 1, "ev-1")
        assert event_ids_of(first, "u1") == ["ev-1"]
        assert event_ids_of(second, "u1") == []
        assert run(second.get_user("u1")) is None
    finally:
        run(first.close())
        run(second.close())


@pytest.mark.parametrize("url", ["memory://name", "memory:", "memory:///"])
def test_a_memory_url_with_more_to_it_is_not_understood(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        open_store(Settings(database_url=url))


def test_a_reopened_store_finds_the_rows_and_a_closed_one_refuses_work(
    memory_store: MemoryStore,
) -> None:
    log_decision(memory_store, "u1", 1, "ev-1")
    run(memory_store.close())
    with pytest.raises(StoreUnavailable, match="closed"):
        run(memory_store.ping())
    with pytest.raises(StoreUnavailable, match="closed"):
        log_decision(memory_store, "u1", 2, "ev-2")

    other = reopened(memory_store)
    try:
        assert other is not memory_store
        assert event_ids_of(other, "u1") == ["ev-1"]
        log_decision(other, "u1", 2, "ev-2")
    finally:
        run(other.close())
    run(memory_store.open())
    assert event_ids_of(memory_store, "u1") == ["ev-1", "ev-2"]


def test_one_database_serves_several_loops_and_threads_without_loss(
    memory_store: MemoryStore,
) -> None:
    """Each thread runs its own loop (as a test client's does beside a test's): every
    read-modify-write of one user still counts once."""
    service = Service(memory_store)
    errors: list[BaseException] = []

    def burst() -> None:
        async def scores() -> None:
            await asyncio.gather(*(service.score("shared", CANDIDATES) for _ in range(50)))

        try:
            asyncio.run(scores())
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    user = run(memory_store.get_user("shared"))
    assert user is not None
    assert user.pulls == 200
    assert len(event_ids_of(memory_store, "shared")) == 200


def test_exports_beyond_the_slots_answer_busy_not_wait_forever() -> None:
    store = MemoryStore(export_wait_s=0.3)
    run(store.open())
    assert_exports_beyond_the_slots_answer_busy(store)


def test_the_check_names_each_damaged_row_with_its_user(memory_store: MemoryStore) -> None:
    """Damage done to the database's rows directly, as a bug in a write path would."""
    service = make_service(memory_store)
    for user in ("bad-p", "no-model", "short", "bad-state", "sound"):
        run(service.score(user, CANDIDATES))
    db = memory_store.database
    log = db.decisions["bad-p"]
    log.put(dataclasses.replace(log.rows[1], propensity=2.0))
    del db.users["no-model"]
    db.users["short"] = dataclasses.replace(db.users["short"], pulls=0)
    db.users["bad-state"] = dataclasses.replace(db.users["bad-state"], state=b"\x00" * 7)

    report = run(memory_store.check())

    found = {kind: tally.examples for kind, tally in report.violations.items()}
    assert found == {
        "decision_bad_propensity": ["bad-p"],
        "decision_bad_probabilities": ["bad-p"],  # candidate_p no longer has it at the tip
        "decision_without_model": ["no-model"],
        "decision_seq_out_of_range": ["short"],
        "model_not_decodable": ["bad-state"],
    }
    assert (report.backend, report.database) == ("memory", "memory://")
    assert (report.models, report.decisions) == (4, 5)


# ── one process only ─────────────────────────────────────────────────────────


def test_settings_refuse_memory_with_several_workers() -> None:
    assert Settings(database_url="memory://", workers=1).workers == 1
    with pytest.raises(ValidationError, match="memory:// keeps every model inside one process"):
        Settings(database_url="memory://", workers=2)


def test_serve_refuses_memory_with_several_workers() -> None:
    done = oo_serving("serve", "--port", "0", "--workers", "3", "--database", "memory://")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "3 workers would each have their own" in done.stderr
    assert "Traceback" not in done.stderr


OUTSIDE = {
    "check": ("check",),
    "prune": ("prune", "--older-than-days", "30"),
    "sweep": ("sweep",),
    "evaluate": ("evaluate",),
    "export": ("export", "--format", "jsonl", "--out", "-"),
    "backup": ("backup", "--to", "copy.db"),
    "restore": ("restore", "--from", "copy.db"),
}


@pytest.mark.parametrize("command", list(OUTSIDE))
def test_a_command_run_beside_the_server_refuses_memory(command: str, tmp_path: Path) -> None:
    """Its own process would open an empty database, and report on it, prune it or copy
    it as if it were the server's."""
    args = [str(tmp_path / a) if a == "copy.db" else a for a in OUTSIDE[command]]
    done = oo_serving(*args, "--database", "memory://")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "oo-serving: memory:// keeps its data inside the serving process, where no other"
        " command can reach it: use a sqlite:/// or postgresql:// database"
    )
    assert not (tmp_path / "copy.db").exists()


def test_a_server_on_memory_learns_and_forgets_when_it_stops(server_factory: Any) -> None:
    body = {
        "user_id": "u1",
        "candidates": [
            {"id": "t1", "content": "a", "source": "s", "features": {"priority": 4}},
            {"id": "t2", "content": "b", "source": "s", "features": {"is_overdue": True}},
        ],
        "context": {"hour_of_day": 9},
    }
    server = server_factory(database_url="memory://")
    with server.client() as client:
        assert client.get("/ready").status_code == 200
        scored = client.post("/score", json=body).json()
        reward = {
            "user_id": "u1", "tip_id": scored["tip_id"], "reward": 1.0, "features": {},
            "event_id": scored["event_id"],
        }  # fmt: skip
        assert client.post("/reward", json=reward).status_code == 200
        stats = client.get("/stats/u1").json()
        assert (stats["pulls"], stats["reward_count"]) == (1, 1)
    server.stop()
    server.start()
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        stats = client.get("/stats/u1").json()
        assert (stats["pulls"], stats["reward_count"]) == (0, 0)  # a user never seen
