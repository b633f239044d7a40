"""Faults under load: erasure racing writes, a worker stopped or killed while it holds the
write lock, a full disk, a database restart, a hot user's queue, a held write lock.

The contract these hold the service to:
- Erasure (DELETE /users/{id}, POST /reset/{id}) is linearisable with every other write
  of that user, on both backends and across processes: a write ordered before it is
  erased with it, one ordered after starts a fresh user; no user is left stuck (every
  /score a 503), and no reward is acknowledged `learned: true` and then stored nowhere.
- Every wait is bounded by one per-request deadline. SQLite: OO_SQLITE_BUSY_TIMEOUT_MS in
  all (the in-process queue, the cross-process flock, SQLite's lock), then a 503 with
  Retry-After and type store_busy or store_unavailable, having changed nothing.
  PostgreSQL: OO_PG_POOL_TIMEOUT_S + 2 x OO_PG_STATEMENT_TIMEOUT_MS + 1 s, the in-process
  per-user queue included.
- /ready answers 503 when writes cannot proceed; /health stays 200.
- Nothing acknowledged is lost: exact accounting of every reward (faults_support.settle).

Every request here has a client time-out, so a hang fails the test instead of stalling it;
a time bound is asserted only as "answered within a generous multiple of the deadline".
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import resource
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server
from tests.e2e.faults_support import (
    Ledger,
    WriteLockHolder,
    assert_check_clean,
    assert_running,
    describe,
    drive,
    ensure_postgres_running,
    flock_holders,
    local_cluster_version,
    pg_ctlcluster,
    process_state,
    refused_by_store,
    resume,
    reward_body,
    score_body,
    settle,
    startups,
    summary,
    tail,
    wait_for_acks,
    wait_for_postgres,
    wait_for_startups,
    wait_until_stopped,
    worker_pids,
    writelock_path,
)

pytestmark = pytest.mark.slow


# ── small helpers ────────────────────────────────────────────────────────────
@dataclass
class Probe:
    """One request on a connection of its own: its answer or its error, and how long."""

    what: str
    elapsed: float
    response: httpx.Response | None = None
    error: str | None = None

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status_code

    def __repr__(self) -> str:
        got = self.error if self.response is None else describe(self.response)[:120]
        return f"<{self.what}: {got} in {self.elapsed:.2f}s>"


async def probe(
    base_url: str, method: str, path: str, body: Any = None, *, timeout: float
) -> Probe:
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        start = time.monotonic()
        try:
            r = await client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            return Probe(f"{method} {path}", time.monotonic() - start, error=repr(exc))
        return Probe(f"{method} {path}", time.monotonic() - start, response=r)


async def until_write_ok(base_url: str, user: str, within_s: float) -> float:
    """Seconds until a /score on a new connection answers 200."""
    start = time.monotonic()
    last: Probe | None = None
    while time.monotonic() - start < within_s:
        last = await probe(base_url, "POST", "/score", score_body(user), timeout=within_s)
        if last.status == 200:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"no write succeeded within {within_s}s; last: {last}")


@dataclass
class Problems:
    """Contract violations, gathered so that one run reports all of them."""

    found: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.found.append(message)

    def run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AssertionError as exc:
            self.found.append(f"{what}: {exc}")
            return None

    def assert_none(self, context: str = "") -> None:
        print(context)  # the evidence, shown with -rP when the test passes
        assert not self.found, "\n".join([f"{len(self.found)} problem(s)", *self.found, context])


# ── 1. erasure racing scores and rewards, on two processes ──────────────────
ERASURE_USERS = 40
ERASURE_LOAD_S = 12.0


@dataclass
class _Trail:
    """What one user's requests were told, with when each was sent and answered."""

    scores: list[tuple[float, float, int, str | None]] = field(default_factory=list)
    rewards: list[tuple[float, float, int, str, bool | None]] = field(default_factory=list)
    erasures: list[tuple[float, float, int | None]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


async def _race_erasures(servers: list[Server], seed: int) -> dict[str, _Trail]:
    """Per user: a score-then-reward loop on each server, and erasures (DELETE or reset,
    on either server) at random moments, for ERASURE_LOAD_S."""
    rng = random.Random(seed)
    users = [f"erase-{i}" for i in range(ERASURE_USERS)]
    trails = {u: _Trail() for u in users}
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=2 * ERASURE_USERS)
    clients = [httpx.AsyncClient(base_url=s.base_url, timeout=30.0, limits=limits) for s in servers]

    async def writer(user: str, client: httpx.AsyncClient) -> None:
        trail = trails[user]
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = await client.post("/score", json=score_body(user))
            except httpx.TransportError as exc:
                trail.unexpected.append(f"/score {exc!r}")
                await asyncio.sleep(0.05)
                continue
            event = r.json()["event_id"] if r.status_code == 200 else None
            trail.scores.append((sent, time.monotonic(), r.status_code, event))
            if r.status_code != 200:
                if not refused_by_store(r):
                    trail.unexpected.append(f"/score {describe(r)}")
                await asyncio.sleep(0.01)
                continue
            tip = r.json()["tip_id"]
            sent = time.monotonic()
            try:
                rw = await client.post("/reward", json=reward_body(user, event, tip))
            except httpx.TransportError as exc:
                trail.unexpected.append(f"/reward {exc!r}")
                await asyncio.sleep(0.05)
                continue
            learned = rw.json().get("learned") if rw.status_code == 200 else None
            trail.rewards.append((sent, time.monotonic(), rw.status_code, event, learned))
            # 404: the decision was erased in between, as it may be.
            if not (rw.status_code in (200, 404) or refused_by_store(rw)) or learned is False:
                trail.unexpected.append(f"/reward {describe(rw)}")

    async def eraser(user: str) -> None:
        trail = trails[user]
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.02, 0.3))
            client = rng.choice(clients)
            sent = time.monotonic()
            try:
                if rng.random() < 0.5:
                    r = await client.delete(f"/users/{user}")
                else:
                    r = await client.post(f"/reset/{user}")
            except httpx.TransportError as exc:
                trail.erasures.append((sent, time.monotonic(), None))
                trail.unexpected.append(f"erasure {exc!r}")
                continue
            trail.erasures.append((sent, time.monotonic(), r.status_code))
            if r.status_code != 200 and not refused_by_store(r):
                trail.unexpected.append(f"erasure {describe(r)}")

    async def timer() -> None:
        await asyncio.sleep(ERASURE_LOAD_S)
        stop.set()

    try:
        await asyncio.gather(
            timer(),
            *(writer(u, c) for u in users for c in clients),
            *(eraser(u) for u in users),
        )
    finally:
        for c in clients:
            await c.aclose()
    return trails


def _judge_erasures(user: str, trail: _Trail, export: dict[str, Any], problems: Problems) -> None:
    """The user's stored state against the order its requests were answered in."""
    model = export["model"]
    decisions = {d["event_id"]: d for d in export["decisions"]}
    rewarded = {e for e, d in decisions.items() if d["reward"] is not None}
    # Self-consistent, as one snapshot.
    if model is None:
        problems.check(not decisions, f"{user}: {len(decisions)} decisions without a model")
    else:
        seqs = [d["seq"] for d in export["decisions"]]
        problems.check(
            all(s <= model["pulls"] for s in seqs),
            f"{user}: decision seq beyond pulls {model['pulls']}: {max(seqs, default=0)}",
        )
        problems.check(
            len(rewarded) <= model["reward_count"],
            f"{user}: {len(rewarded)} rewarded decisions, reward_count {model['reward_count']}",
        )
        # Nothing here is pruned and every reward names its event, so these are exact.
        problems.check(
            model["pulls"] == len(decisions),
            f"{user}: pulls {model['pulls']} != {len(decisions)} decisions logged",
        )
        problems.check(
            model["reward_count"] == len(rewarded),
            f"{user}: reward_count {model['reward_count']} != {len(rewarded)} rewarded decisions",
        )
    done = [e for e in trail.erasures if e[2] == 200]
    if any(e[2] is None for e in trail.erasures):
        return  # an erasure with no answer: its place in the order is unknown
    if not done:
        return
    erase_sent, erase_answered, _ = done[-1]
    # Written after the last erasure's answer: it must be there.
    for sent, _, status, event in trail.scores:
        if status == 200 and sent > erase_answered and event not in decisions:
            problems.check(
                False, f"{user}: score {event} acknowledged after the last erasure is gone"
            )
    for sent, _, status, event, learned in trail.rewards:
        if status == 200 and learned and sent > erase_answered and event not in rewarded:
            problems.check(
                False,
                f"{user}: reward {event} acknowledged learned:true after the last erasure"
                f" is stored nowhere ({'decision kept' if event in decisions else 'no decision'})",
            )
    # Answered before the last erasure was sent: it must have been erased.
    for _, answered, status, event in trail.scores:
        if status == 200 and answered < erase_sent and event in decisions:
            problems.check(
                False, f"{user}: score {event} answered before the last erasure survived it"
            )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_erasure_racing_writes_on_two_processes_is_linearisable(
    server_factory, request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'erase.db'}"
        servers = [server_factory(db_path=tmp_path / "erase.db") for _ in range(2)]
    else:
        url = request.getfixturevalue("fresh_postgres_url")
        servers = [server_factory(database_url=url) for _ in range(2)]
    trails = asyncio.run(_race_erasures(servers, seed=7))

    problems = Problems()
    statuses: Counter[str] = Counter()
    for user, trail in trails.items():
        statuses.update(f"score {s[2]}" for s in trail.scores)
        statuses.update(f"reward {r[2]}" for r in trail.rewards)
        statuses.update(f"erase {e[2]}" for e in trail.erasures)
        for item in trail.unexpected[:3]:
            problems.check(False, f"{user}: unexpected answer during the race: {item}")
    erasures = statuses["erase 200"]
    assert erasures >= ERASURE_USERS * 3, f"too few erasures to race: {dict(statuses)}"

    stuck: list[str] = []
    with servers[0].client(timeout=30.0) as a, servers[1].client(timeout=30.0) as b:
        for user, trail in trails.items():
            export = a.get(f"/users/{user}/export")
            assert export.status_code == 200, describe(export)
            body = export.json()
            _judge_erasures(user, trail, body, problems)
            before = body["model"] or {"pulls": 0, "reward_count": 0}
            # Usable: a score and its reward on each process.
            usable = True
            for client in (a, b):
                scored = client.post("/score", json=score_body(user))
                if scored.status_code != 200:
                    usable = False
                    stuck.append(f"{user}: /score {describe(scored)}")
                    break
                d = scored.json()
                rw = client.post("/reward", json=reward_body(user, d["event_id"], d["tip_id"]))
                if rw.status_code != 200 or rw.json()["learned"] is not True:
                    usable = False
                    stuck.append(f"{user}: /reward {describe(rw)}")
                    break
            if usable:
                stats = a.get(f"/stats/{user}").json()
                problems.check(
                    (stats["pulls"], stats["reward_count"])
                    == (before["pulls"] + 2, before["reward_count"] + 2),
                    f"{user}: stats {stats['pulls']}/{stats['reward_count']} after 2 scores and"
                    f" 2 rewards on {before['pulls']}/{before['reward_count']}",
                )
    problems.check(not stuck, f"{len(stuck)} users not usable after the race: {stuck[:5]}")
    problems.run("check", assert_check_clean, url)
    problems.assert_none(f"{backend}: {dict(statuses)}")


def _backends_waiting_for_a_lock(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("write", ["score", "reward"])
def test_an_erasure_between_a_writes_row_insert_and_its_row_lock_on_postgres(
    server_factory, fresh_postgres_url: str, write: str
) -> None:
    """The narrowest window of the race above, made wide: a write has made sure the user's
    row exists and waits for its lock when an erasure (the same two DELETEs the service
    runs, from another replica) deletes the row and commits. The write is then ordered
    after the erasure: it starts a fresh user (or is refused having written nothing),
    and the user is never left stuck or with a decision but no model."""
    url = fresh_postgres_url
    server: Server = server_factory(database_url=url)
    user = f"window-{write}"
    with server.client(timeout=30.0) as client:
        first = client.post("/score", json=score_body(user)).json()
        r = client.post("/reward", json=reward_body(user, first["event_id"], first["tip_id"]))
        assert r.json()["learned"] is True
        pending = client.post("/score", json=score_body(user)).json()  # for the reward
    body = (
        score_body(user)
        if write == "score"
        else reward_body(user, pending["event_id"], pending["tip_id"])
    )

    async def race() -> Probe:
        with psycopg.connect(url) as eraser:  # one transaction until commit
            eraser.execute("SELECT 1 FROM user_model WHERE user_id = %s FOR UPDATE", (user,))
            answer = asyncio.create_task(
                probe(server.base_url, "POST", f"/{write}", body, timeout=20.0)
            )
            deadline = time.monotonic() + 10
            while not await asyncio.to_thread(_backends_waiting_for_a_lock, url):
                assert not answer.done(), f"the {write} did not wait for the row: {answer.result()}"
                assert time.monotonic() < deadline, f"the {write} never waited for the row lock"
                await asyncio.sleep(0.02)
            eraser.execute("DELETE FROM user_model WHERE user_id = %s", (user,))
            eraser.execute("DELETE FROM decision WHERE user_id = %s", (user,))
            eraser.commit()
        return await answer

    answer = asyncio.run(race())
    problems = Problems()
    with server.client(timeout=30.0) as client:
        export = client.get(f"/users/{user}/export").json()
        model, decisions = export["model"], export["decisions"]
        if write == "score":
            if answer.status == 200:
                event = answer.response.json()["event_id"] if answer.response else None
                problems.check(
                    model is not None and (model["pulls"], model["reward_count"]) == (1, 0),
                    f"a score after the erasure must start a fresh user: model {model}",
                )
                problems.check(
                    [(d["event_id"], d["seq"]) for d in decisions] == [(event, 1)],
                    f"its decision alone must be logged, as seq 1: {decisions}",
                )
            else:
                problems.check(
                    answer.response is not None and refused_by_store(answer.response),
                    f"the score must answer 200 or a 503: {answer}",
                )
        else:
            problems.check(
                answer.status == 404
                or (answer.response is not None and refused_by_store(answer.response)),
                f"a reward of an erased decision must answer 404 (or 503): {answer}",
            )
        if answer.status != 200:
            problems.check(
                model is None and decisions == [],
                f"a refused {write} wrote something: {model}, {decisions}",
            )
        # Usable: a score and its reward are stored.
        before = model or {"pulls": 0, "reward_count": 0}
        scored = client.post("/score", json=score_body(user))
        problems.check(scored.status_code == 200, f"the user is stuck: /score {describe(scored)}")
        if scored.status_code == 200:
            d = scored.json()
            rw = client.post("/reward", json=reward_body(user, d["event_id"], d["tip_id"]))
            problems.check(
                rw.status_code == 200 and rw.json()["learned"] is True,
                f"/reward after: {describe(rw)}",
            )
            stats = client.get(f"/stats/{user}").json()
            problems.check(
                (stats["pulls"], stats["reward_count"])
                == (before["pulls"] + 1, before["reward_count"] + 1),
                f"acknowledged but not stored: {stats} after {before}",
            )
    problems.run("check", assert_check_clean, url)
    problems.assert_none(f"the racing {write} answered {answer}")


# ── 2. SIGSTOP of a worker holding the SQLite write lock ────────────────────
STOP_DEADLINE_S = 1.5


async def _stop_the_lock_holder(server: Server, lock: Path, within_s: float = 15.0) -> int:
    """SIGSTOP the worker that holds the flock, checked again once it is stopped."""
    workers = set(worker_pids(server))
    assert len(workers) == 2, workers
    deadline = time.monotonic() + within_s
    tries = 0
    while time.monotonic() < deadline:
        for pid in flock_holders(lock) & workers:
            tries += 1
            os.kill(pid, signal.SIGSTOP)
            wait_until_stopped(pid)
            if pid in flock_holders(lock):
                return pid
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.002)
    raise AssertionError(f"could not stop a worker holding {lock} ({tries} tries)")


async def _stopped_worker(server: Server, db_path: Path) -> None:
    assert server.proc is not None
    problems = Problems()
    ledger = Ledger()
    stop = asyncio.Event()
    users = [f"stopped-{i}" for i in range(8)]
    load = asyncio.create_task(drive(ledger, server.base_url, users, stop, timeout=20.0))
    bound = 3 * STOP_DEADLINE_S
    try:
        await wait_for_acks(ledger, 100, within_s=30)
        parent = server.proc.pid
        # The supervisor would kill a worker that stops answering its pings (after 5 s)
        # and so end the fault; stopped too, it leaves the worker as a stuck one is.
        os.kill(parent, signal.SIGSTOP)
        stopped: int | None = None
        try:
            stopped = await _stop_the_lock_holder(server, writelock_path(db_path))
            stopped_at = time.monotonic()
            t = bound + 1.0
            writes = [
                probe(server.base_url, "POST", "/score", score_body("stopped-probe"), timeout=t)
                for _ in range(6)
            ]
            ready = [probe(server.base_url, "GET", "/ready", timeout=t) for _ in range(4)]
            health = [probe(server.base_url, "GET", "/health", timeout=t) for _ in range(2)]
            results = await asyncio.gather(*writes, *ready, *health)
            still_stopped = process_state(stopped) in ("T", "t")
            held_for = time.monotonic() - stopped_at
        finally:
            if stopped is not None:
                resume(stopped)
            await asyncio.sleep(0.3)
            resume(parent)
        w, r, h = results[:6], results[6:10], results[10:]
        answered = [p for p in w if p.response is not None]
        problems.check(still_stopped, "the stopped worker was not stopped for the whole probe")
        problems.check(
            len(answered) >= 3,
            f"writes to the running worker were not answered within {t:.1f}s"
            f" (the lock holder stopped {held_for:.1f}s): {w}",
        )
        for p in answered:
            problems.check(
                p.response is not None and refused_by_store(p.response) and p.elapsed < bound,
                f"a write while the lock holder is stopped must be a 503 within {bound}s: {p}",
            )
        answered_ready = [p for p in r if p.response is not None]
        problems.check(bool(answered_ready), f"/ready not answered: {r}")
        problems.check(
            all(p.status == 503 for p in answered_ready),
            f"/ready while writes cannot proceed must be 503: {answered_ready}",
        )
        problems.check(
            bool(h) and all(p.status == 200 for p in h if p.response is not None),
            f"/health must stay 200: {h}",
        )
        refused_probes = sum(p.status == 503 for p in w)
        ok_probes = sum(p.status == 200 for p in w)

        recovered_in = await until_write_ok(server.base_url, "stopped-after", within_s=15)
        await wait_for_acks(ledger, ledger.acked + 100, within_s=30)
    finally:
        stop.set()
        await load

    assert server.proc.poll() is None, tail(server)
    problems.check(not ledger.unexpected, f"answers outside the contract: {ledger.unexpected[:5]}")
    with server.client(timeout=30.0) as client:
        problems.run("accounting", settle, client, ledger)
        if all(p.response is not None for p in w):
            pulls = client.get("/stats/stopped-probe").json()["pulls"]
            problems.check(
                pulls == ok_probes,
                f"{refused_probes} probe writes answered 503 and {ok_probes} 200, yet"
                f" {pulls} pulls are stored",
            )
    problems.run("check", assert_check_clean, f"sqlite:///{db_path}")
    problems.assert_none(
        f"probes while stopped: {w} {r} {h}; recovered in {recovered_in:.2f}s;"
        f" load: {summary(ledger)}"
    )


def test_a_worker_stopped_holding_the_write_lock_bounds_the_others(
    server_factory, tmp_path: Path
) -> None:
    db_path = tmp_path / "stopped.db"
    server: Server = server_factory(
        workers=2,
        db_path=db_path,
        env={"OO_SQLITE_BUSY_TIMEOUT_MS": str(int(STOP_DEADLINE_S * 1000))},
    )
    wait_for_startups(server, 2)
    asyncio.run(_stopped_worker(server, db_path))


# ── 3. kill -9 of one worker under load ──────────────────────────────────────
async def _kill_one_worker(server: Server) -> tuple[Ledger, int, float]:
    ledger = Ledger()
    stop = asyncio.Event()
    users = [f"killed-{i}" for i in range(12)]
    load = asyncio.create_task(drive(ledger, server.base_url, users, stop, timeout=15.0))
    try:
        await wait_for_acks(ledger, 150, within_s=30)
        victim = worker_pids(server)[0]
        before = startups(server)
        os.kill(victim, signal.SIGKILL)
        recovered_in = await until_write_ok(server.base_url, "killed-probe", within_s=10)
        deadline = time.monotonic() + 20
        while startups(server) < before + 1:  # the replacement worker
            assert_running(server)
            assert time.monotonic() < deadline, f"no replacement worker:\n{tail(server)}"
            await asyncio.sleep(0.1)
        assert victim not in worker_pids(server)
        await wait_for_acks(ledger, ledger.acked + 150, within_s=30)
    finally:
        stop.set()
        await load
    return ledger, len(users), recovered_in


def test_kill9_of_one_worker_under_load_keeps_serving_and_loses_nothing(
    server_factory, tmp_path: Path
) -> None:
    db_path = tmp_path / "killed.db"
    server: Server = server_factory(workers=2, db_path=db_path)
    wait_for_startups(server, 2)
    ledger, connections, recovered_in = asyncio.run(_kill_one_worker(server))

    assert_running(server)  # and a write succeeded within 10 s of the kill (until_write_ok)
    # Only requests on the killed worker's connections failed, and only with a broken
    # connection: no status but 200.
    assert ledger.unexpected == [], summary(ledger)
    assert set(ledger.statuses) <= {"score 200", "reward 200", "score error", "reward error"}, (
        summary(ledger)
    )
    assert sum(ledger.errors.values()) <= connections, summary(ledger)
    with server.client(timeout=30.0) as client:
        settle(client, ledger)
    assert_check_clean(f"sqlite:///{db_path}")
    print(f"first write after the kill in {recovered_in:.2f}s; load: {summary(ledger)}")


# ── 4. disk full on SQLite: a file-size limit, and a full tmpfs ───────────────
async def _read_probes(server: Server, user: str) -> list[Probe]:
    """The reads that must still answer while writes cannot."""
    paths = (f"/stats/{user}", f"/users/{user}/export", "/health")
    return [await probe(server.base_url, "GET", path, timeout=15.0) for path in paths]


def _check_after_a_full_disk(
    problems: Problems, server: Server, ledger: Ledger, reads: list[Probe]
) -> None:
    """Reads answered, the load saw only the contract's answers, and every reward it was
    told was learned is stored."""
    problems.check(all(p.status == 200 for p in reads), f"reads must still answer: {reads}")
    problems.check(not ledger.unexpected, f"answers outside the contract: {ledger.unexpected[:5]}")
    problems.check(not ledger.errors, f"broken connections: {dict(ledger.errors)}")
    assert_running(server)
    with server.client(timeout=30.0) as client:
        problems.run("accounting", settle, client, ledger)


async def _disk_full(server: Server) -> tuple[Ledger, list[Probe], list[Probe], float]:
    assert server.proc is not None
    pid = server.proc.pid  # one worker: the server process serves
    ledger = Ledger()
    stop = asyncio.Event()
    users = [f"full-{i}" for i in range(4)]
    load = asyncio.create_task(drive(ledger, server.base_url, users, stop, timeout=15.0))
    try:
        await wait_for_acks(ledger, 60, within_s=30)
        limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        # No write at or past byte 1 of any file: EFBIG, as a full disk gives ENOSPC. The
        # hard limit stays, so that the soft one can be raised back without privilege.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, limits[1]))
        try:
            await asyncio.sleep(0.5)  # the load's writes meet the full disk too
            writes: list[Probe] = []
            for i in range(4):
                writes.append(
                    await probe(server.base_url, "POST", "/score", score_body("full-probe"),
                                timeout=15.0)
                )  # fmt: skip
                writes.append(
                    await probe(server.base_url, "POST", "/reward",
                                {"user_id": "full-probe", "tip_id": f"t{i}", "reward": 1.0,
                                 "features": {}}, timeout=15.0)
                )  # fmt: skip
            reads = await _read_probes(server, users[0])
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        recovered_in = await until_write_ok(server.base_url, "full-after", within_s=15)
        await wait_for_acks(ledger, ledger.acked + 60, within_s=30)
    finally:
        stop.set()
        await load
    return ledger, writes, reads, recovered_in


def test_a_file_size_limit_answers_503_then_recovers_without_a_restart(
    server_factory, tmp_path: Path
) -> None:
    """The disk full as a file-size limit (RLIMIT_FSIZE, as `ulimit -f` or systemd's
    LimitFSIZE set it): every write past byte 1 of any file fails with EFBIG, also the
    writes that would fit in space a file already has. Writes are refused, reads answer,
    and writes work again once the limit is lifted."""
    db_path = tmp_path / "full.db"
    server: Server = server_factory(workers=1, db_path=db_path)
    problems = Problems()
    ledger, writes, reads, recovered_in = asyncio.run(_disk_full(server))

    problems.check(
        all(p.response is not None and refused_by_store(p.response) for p in writes),
        f"every write on a full disk must be a 503 (not a 500, not a hang): {writes}",
    )
    _check_after_a_full_disk(problems, server, ledger, reads)
    with server.client(timeout=30.0) as client:
        if all(p.response is not None for p in writes):
            stats = client.get("/stats/full-probe").json()
            stored = (stats["pulls"], stats["reward_count"])
            expected = (
                sum(p.status == 200 for p in writes if "score" in p.what),
                sum(p.status == 200 for p in writes if "reward" in p.what),
            )
            problems.check(
                stored == expected, f"refused writes were stored: {stored} != {expected}"
            )
    problems.run("check", assert_check_clean, f"sqlite:///{db_path}")
    problems.assert_none(
        f"full: writes {writes}, reads {reads}; recovered in {recovered_in:.2f}s;"
        f" load: {summary(ledger)}"
    )


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a disk that really fills up (ENOSPC). Ask for it before
    server_factory, so that the server stops before it is unmounted."""
    where = tmp_path / "small-disk"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _fill(folder: Path) -> Path:
    """Write a file until the filesystem has no block left."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


async def _really_full(
    server: Server, folder: Path
) -> tuple[Ledger, Counter[str], list[Probe], float]:
    ledger = Ledger()
    stop = asyncio.Event()
    users = [f"enospc-{i}" for i in range(4)]
    load = asyncio.create_task(drive(ledger, server.base_url, users, stop, timeout=15.0))
    try:
        await wait_for_acks(ledger, 60, within_s=30)
        before = Counter(ledger.statuses)
        filler = await asyncio.to_thread(_fill, folder)
        try:
            # Appends to the WAL fail at once; a write may still fit in space SQLite had
            # already, until a checkpoint cannot grow the database: wait for refusals.
            deadline = time.monotonic() + 10
            while ledger.statuses["score 503"] - before["score 503"] < 20:
                assert time.monotonic() < deadline, f"no write refused: {summary(ledger)}"
                await asyncio.sleep(0.05)
            probes = [
                await probe(
                    server.base_url, "POST", "/score", score_body("enospc-probe"), timeout=15.0
                )
                for _ in range(3)
            ]
            probes += await _read_probes(server, users[0])
            during = Counter(ledger.statuses)
            during.subtract(before)
        finally:
            filler.unlink()
        recovered_in = await until_write_ok(server.base_url, "enospc-after", within_s=15)
        await wait_for_acks(ledger, ledger.acked + 60, within_s=30)
    finally:
        stop.set()
        await load
    return ledger, during, probes, recovered_in


def test_a_full_disk_answers_503_then_recovers_without_a_restart(
    small_tmpfs: Path, server_factory
) -> None:
    """A small tmpfs that fills up (ENOSPC), as a real disk does: a write may still fit in
    space SQLite's files already have, so a write is a 200 or a 503; reads answer; writes
    work again once space is freed."""
    db_path = small_tmpfs / "full.db"
    server: Server = server_factory(workers=1, db_path=db_path)
    ledger, during, probes, recovered_in = asyncio.run(_really_full(server, small_tmpfs))
    writes, reads = probes[:3], probes[3:]
    print(f"ENOSPC: during={dict(during)} probes={probes} recovered in {recovered_in:.2f}s")

    problems = Problems()
    problems.check(
        all(
            p.status == 200 or (p.response is not None and refused_by_store(p.response))
            for p in writes
        ),
        f"a write on a full disk is a 200 or a 503 (not a 500, not a hang): {writes}",
    )
    _check_after_a_full_disk(problems, server, ledger, reads)
    problems.run("check", assert_check_clean, f"sqlite:///{db_path}")
    problems.assert_none(f"recovered in {recovered_in:.2f}s; load: {summary(ledger)}")


# ── 5. PostgreSQL restarted mid-burst ────────────────────────────────────────
PG_POOL_TIMEOUT_S = 1.0
PG_STATEMENT_TIMEOUT_MS = 1000
PG_DEADLINE_S = PG_POOL_TIMEOUT_S + 2 * PG_STATEMENT_TIMEOUT_MS / 1000 + 1.0


async def _restart_mid_burst(server: Server, url: str, version: str) -> tuple[Ledger, float, str]:
    ledger = Ledger()
    stop = asyncio.Event()
    users = [f"pgrestart-{i}" for i in range(8)]
    load = asyncio.create_task(drive(ledger, server.base_url, users, stop, timeout=30.0))
    try:
        await wait_for_acks(ledger, 100, within_s=30)
        done = await asyncio.to_thread(pg_ctlcluster, version, "restart")
        assert done.returncode == 0, done.stderr
        assert await asyncio.to_thread(wait_for_postgres, url), "PostgreSQL did not come back"
        recovered_in = await until_write_ok(server.base_url, "pgrestart-probe", within_s=30)
        await wait_for_acks(ledger, ledger.acked + 100, within_s=30)
    finally:
        stop.set()
        await load
    return ledger, recovered_in, done.stdout + done.stderr


@pytest.mark.alone  # restarts the cluster every other test's database is on
def test_a_postgres_restart_mid_burst_answers_503_and_loses_nothing(
    server_factory, fresh_postgres_url: str
) -> None:
    version = local_cluster_version(fresh_postgres_url)
    server: Server = server_factory(
        database_url=fresh_postgres_url,
        env={
            "OO_PG_POOL_TIMEOUT_S": str(PG_POOL_TIMEOUT_S),
            "OO_PG_STATEMENT_TIMEOUT_MS": str(PG_STATEMENT_TIMEOUT_MS),
        },
    )
    try:
        ledger, recovered_in, _ = asyncio.run(
            _restart_mid_burst(server, fresh_postgres_url, version)
        )
    finally:
        ensure_postgres_running(fresh_postgres_url, version)

    problems = Problems()
    problems.check(not ledger.unexpected, f"answers outside the contract: {ledger.unexpected[:5]}")
    problems.check(not ledger.errors, f"broken connections: {dict(ledger.errors)}")
    slowest = max(ledger.slowest.values())
    problems.check(
        slowest < 2 * PG_DEADLINE_S,
        f"a request took {slowest:.1f}s, deadline {PG_DEADLINE_S}s: {ledger.slowest}",
    )
    assert_running(server)
    with server.client(timeout=30.0) as client:
        # The database went away mid-commit: a 503 then may hide a commit the server
        # could not see. Every reward acknowledged is still counted exactly.
        settled = problems.run("accounting", settle, client, ledger, refusals_wrote_nothing=False)
    problems.run("check", assert_check_clean, fresh_postgres_url)
    in_doubt = None if settled is None else len(settled.refused_but_stored)
    problems.assert_none(
        f"recovered in {recovered_in:.2f}s; 503s found committed: {in_doubt}; {summary(ledger)}"
    )


# ── 6. workers killed again and again under steady writes ───────────────────
RESTART_KILLS = 4


async def _kill_repeatedly(server: Server, db_path: Path) -> tuple[Ledger, list[str]]:
    """kill -9 a worker RESTART_KILLS times under steady writes, waiting for each
    replacement. For the later half, another writer holds the write lock while the
    replacement starts (for at most a few seconds): a start-up must not need it, or must
    wait for it, and never end the server."""
    assert server.proc is not None
    ledger = Ledger()
    stop = asyncio.Event()
    users = [f"restart-{i}" for i in range(16)]
    load = asyncio.create_task(drive(ledger, server.base_url, users, stop, timeout=15.0))
    events: list[str] = []
    try:
        await wait_for_acks(ledger, 100, within_s=30)
        for i in range(RESTART_KILLS):
            pids = worker_pids(server)
            if server.proc.poll() is not None or not pids:
                break
            victim = pids[i % len(pids)]
            before = startups(server)
            held = i >= RESTART_KILLS // 2
            holder = await asyncio.to_thread(WriteLockHolder, db_path) if held else None
            try:
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                deadline = killed_at + (4 if held else 20)
                while startups(server) == before and server.proc.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
            finally:
                if holder is not None:
                    holder.release()
            deadline = killed_at + 20
            while startups(server) == before and server.proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            events.append(
                f"kill {i + 1}{' (write lock held)' if held else ''}: worker {victim};"
                f" replacement started={startups(server) > before}"
                f" after {time.monotonic() - killed_at:.1f}s; server exit={server.proc.poll()}"
            )
            if server.proc.poll() is not None:
                break
            await wait_for_acks(ledger, ledger.acked + 50, within_s=20)  # under load again
    finally:
        stop.set()
        await load
    return ledger, events


def test_workers_killed_again_and_again_under_writes_never_stop_the_server(
    server_factory, tmp_path: Path
) -> None:
    """A replacement worker starts while others write: its start-up (the schema check)
    must not time out behind their writes and so stop the whole server."""
    db_path = tmp_path / "restarts.db"
    server: Server = server_factory(
        workers=2, db_path=db_path, env={"OO_SQLITE_BUSY_TIMEOUT_MS": "300"}
    )
    wait_for_startups(server, 2)
    ledger, events = asyncio.run(_kill_repeatedly(server, db_path))

    assert server.proc is not None
    assert server.proc.poll() is None, (
        f"the server stopped (exit {server.proc.returncode}): {events}\n{tail(server, 25)}"
    )
    assert len(events) == RESTART_KILLS, events
    problems = Problems()
    problems.check(
        all("replacement started=True" in e for e in events),
        f"a replacement never started: {events}",
    )
    problems.run(
        "serving", asyncio.run, until_write_ok(server.base_url, "restart-probe", within_s=10)
    )
    problems.check(not ledger.unexpected, f"answers outside the contract: {ledger.unexpected[:5]}")
    with server.client(timeout=30.0) as client:
        problems.run("accounting", settle, client, ledger)
    problems.run("check", assert_check_clean, f"sqlite:///{db_path}")
    problems.assert_none(f"{events}; load: {summary(ledger)}")


# ── 7. PostgreSQL: a hot user's queue stays inside the deadline ──────────────
HOT_STATEMENT_TIMEOUT_MS = 500
HOT_POOL_TIMEOUT_S = 0.5
HOT_DEADLINE_S = HOT_POOL_TIMEOUT_S + 2 * HOT_STATEMENT_TIMEOUT_MS / 1000 + 1.0  # 2.5 s
HOT_REQUESTS = 16  # queued one behind another, the last would wait 16 x 0.5 s


def test_a_hot_users_queue_on_postgres_answers_within_the_deadline(
    server_factory, fresh_postgres_url: str
) -> None:
    server: Server = server_factory(
        database_url=fresh_postgres_url,
        env={
            "OO_PG_STATEMENT_TIMEOUT_MS": str(HOT_STATEMENT_TIMEOUT_MS),
            "OO_PG_POOL_TIMEOUT_S": str(HOT_POOL_TIMEOUT_S),
        },
    )
    user = "hot-user"
    with server.client(timeout=30.0) as client:
        assert client.post("/score", json=score_body(user)).status_code == 200

    async def burst() -> list[Probe]:
        return await asyncio.gather(
            *(
                probe(server.base_url, "POST", "/score", score_body(user), timeout=20.0)
                for _ in range(HOT_REQUESTS)
            )
        )

    with psycopg.connect(fresh_postgres_url) as holder:  # a transaction until closed
        holder.execute("SELECT 1 FROM user_model WHERE user_id = %s FOR UPDATE", (user,))
        answers = asyncio.run(burst())
        holder.rollback()

    bound = HOT_DEADLINE_S + 2.5
    with server.client(timeout=30.0) as client:
        after = client.post("/score", json=score_body(user))
        pulls = client.get(f"/stats/{user}").json()["pulls"]
    times = sorted(round(p.elapsed, 2) for p in answers)
    print(
        f"hot user: answers {sorted({describe(p.response)[:40] for p in answers if p.response})}, times {times}"
    )
    assert all(p.response is not None and refused_by_store(p.response) for p in answers), answers
    assert all(p.elapsed < bound for p in answers), (
        f"each must answer within {bound}s (deadline {HOT_DEADLINE_S}s), not k x the"
        f" statement time-out: {times}"
    )
    assert after.status_code == 200, describe(after)
    assert pulls == 2, f"the refused scores were stored: {pulls} pulls after 2 acknowledged"


# ── 8. /ready reflects writes on SQLite ─────────────────────────────────────
HELD_DEADLINE_S = 1.0


def test_a_held_write_lock_answers_503_and_ready_says_so(server_factory, tmp_path: Path) -> None:
    db_path = tmp_path / "held.db"
    server: Server = server_factory(
        workers=2,
        db_path=db_path,
        env={"OO_SQLITE_BUSY_TIMEOUT_MS": str(int(HELD_DEADLINE_S * 1000))},
    )
    wait_for_startups(server, 2)
    user = "held-user"
    with server.client(timeout=30.0) as client:
        assert client.post("/score", json=score_body(user)).status_code == 200
    bound = 3 * HELD_DEADLINE_S
    t = bound + 1.0

    async def while_held() -> list[Probe]:
        return await asyncio.gather(
            *(
                probe(server.base_url, "POST", "/score", score_body(user), timeout=t)
                for _ in range(4)
            ),
            *(probe(server.base_url, "GET", "/ready", timeout=t) for _ in range(4)),
            *(probe(server.base_url, "GET", "/health", timeout=t) for _ in range(2)),
        )

    async def after_release() -> tuple[float, list[Probe]]:
        recovered_in = await until_write_ok(server.base_url, user, within_s=10)
        ready = [await probe(server.base_url, "GET", "/ready", timeout=10) for _ in range(4)]
        return recovered_in, ready

    fd = os.open(writelock_path(db_path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another process holding the write lock
        held = asyncio.run(while_held())
    finally:
        os.close(fd)  # releases the lock
    recovered_in, ready_after = asyncio.run(after_release())
    time.sleep(0.5)  # anything still queued inside the server lands now
    with server.client(timeout=30.0) as client:
        pulls = client.get(f"/stats/{user}").json()["pulls"]

    writes, ready, health = held[:4], held[4:8], held[8:]
    problems = Problems()
    problems.check(
        all(p.response is not None and refused_by_store(p.response) for p in writes)
        and all(p.elapsed < bound for p in writes),
        f"writes must be 503 within {bound}s while the write lock is held: {writes}",
    )
    problems.check(all(p.status == 503 for p in ready), f"/ready must be 503: {ready}")
    problems.check(all(p.status == 200 for p in health), f"/health must be 200: {health}")
    problems.check(all(p.status == 200 for p in ready_after), f"/ready after: {ready_after}")
    # One score before and one after; a refused write changed nothing.
    problems.check(pulls == 2, f"{pulls} pulls stored after 2 acknowledged scores")
    problems.assert_none(
        f"while held: {held}; after: {ready_after}; recovered in {recovered_in:.2f}s"
    )
