"""Helpers for tests/e2e/test_faults.py: worker processes, the SQLite write lock, the
`check` command, the local PostgreSQL cluster, and an exact ledger of what a load was
told.

The ledger follows the README's promise: a reward answered 200 with `learned: true` is
stored; a 503 changed nothing; a request that got no answer (a reset, a time-out) may or
may not have been applied. After the fault, `settle` sends again every reward whose fate
is unknown or that was refused, and then the store must hold exactly the rewards sent,
each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.conftest import Server
from tests.support import oo_serving

CANDIDATES = [
    {"id": "a", "content": "a", "source": "t", "features": {"priority": 4}},
    {"id": "b", "content": "b", "source": "t"},
]
STORE_ERRORS = ("store_busy", "store_unavailable")


def score_body(user: str) -> dict[str, Any]:
    return {"user_id": user, "candidates": CANDIDATES}


def reward_body(user: str, event_id: str, tip_id: str) -> dict[str, Any]:
    return {"user_id": user, "tip_id": tip_id, "reward": 1.0, "features": {}, "event_id": event_id}


def refused_by_store(r: httpx.Response) -> bool:
    """The documented 503: JSON error of a store type, with Retry-After."""
    if r.status_code != 503 or "retry-after" not in r.headers:
        return False
    try:
        return r.json()["detail"][0]["type"] in STORE_ERRORS
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def describe(r: httpx.Response) -> str:
    return f"{r.status_code} retry-after={r.headers.get('retry-after')} {r.text[:200]}"


# ── processes ────────────────────────────────────────────────────────────────
def worker_pids(server: Server) -> list[int]:
    """The processes that serve requests: the workers (multiprocessing children, not the
    resource tracker), or the server process itself when it has one worker."""
    return server.worker_pids()


def process_state(pid: int) -> str:
    """The one-letter state of /proc/<pid>/stat: R, S, D, T (stopped), Z..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def wait_until_stopped(pid: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while process_state(pid) not in ("T", "t"):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.002)


def resume(pid: int) -> None:
    """SIGCONT, if the process is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def assert_running(server: Server) -> None:
    assert server.proc is not None
    code = server.proc.poll()
    assert code is None, f"the server exited ({code}):\n{tail(server)}"


def startups(server: Server) -> int:
    """How many worker processes have finished starting, from the server's log."""
    return server.log().count("Application startup complete")


def wait_for_startups(server: Server, count: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while startups(server) < count:
        assert server.proc is not None
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited ({server.proc.returncode}):\n{tail(server)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{count} worker start-ups not logged in {within_s}s:\n{tail(server)}")
        time.sleep(0.05)


def tail(server: Server, lines: int = 40) -> str:
    return "\n".join(server.log().splitlines()[-lines:])


# ── the SQLite write lock ────────────────────────────────────────────────────
def writelock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".writelock")


def flock_holders(path: Path) -> set[int]:
    """The pids holding a flock on `path` (waiters, `->` lines, are not holders)."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
            continue
        if parts[5] == device:
            holders.add(int(parts[4]))
    return holders


class WriteLockHolder:
    """Another writer, as a `prune` or a migration would be: the writers' flock, then
    SQLite's own write lock (BEGIN IMMEDIATE), held until `release`."""

    def __init__(self, db_path: Path) -> None:
        self._fd = os.open(writelock_path(db_path), os.O_RDWR | os.O_CREAT, 0o644)
        self._conn: sqlite3.Connection | None = None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._conn = sqlite3.connect(
                db_path, isolation_level=None, timeout=10, check_same_thread=False
            )
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            self._conn.close()
            self._conn = None
        if self._fd >= 0:
            os.close(self._fd)  # and with it the flock
            self._fd = -1


# ── the check command ────────────────────────────────────────────────────────
def run_check(database_url: str) -> subprocess.CompletedProcess[str]:
    return oo_serving("check", "--database", database_url)


def assert_check_clean(database_url: str) -> None:
    done = run_check(database_url)
    assert done.returncode == 0, (
        f"`oo-serving check` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


# ── the local PostgreSQL cluster ─────────────────────────────────────────────
def local_cluster_version(url: str) -> str:
    """The version of this machine's cluster behind `url`; skips (fails on CI) if none."""
    parts = urlsplit(url)
    clusters = "/etc/postgresql"
    can = (
        parts.hostname in ("127.0.0.1", "localhost")
        and shutil.which("pg_ctlcluster")
        and os.path.isdir(clusters)
        and os.geteuid() == 0
    )
    if not can:
        if os.environ.get("CI") == "true":
            pytest.fail("on CI the PostgreSQL restart must run: no local cluster to restart")
        pytest.skip("PostgreSQL is not a local cluster this test can restart")
    return sorted(os.listdir(clusters), key=lambda v: [int(p) for p in v.split(".")])[-1]


def pg_ctlcluster(version: str, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "-m", "fast", version, "main", action],
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for_postgres(url: str, within_s: float = 60.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            time.sleep(0.3)
    return False


def ensure_postgres_running(url: str, version: str) -> None:
    """Start the cluster if it is down (a test that failed mid-restart), and wait for it."""
    if wait_for_postgres(url, within_s=5):
        return
    pg_ctlcluster(version, "start")
    assert wait_for_postgres(url), "PostgreSQL did not come back"


# ── load, and what it was told ───────────────────────────────────────────────
@dataclass
class Ledger:
    """Per user, what the service answered: exact enough to account for every reward."""

    scored: dict[str, dict[str, str]] = field(default_factory=dict)  # user -> event -> tip
    learned: dict[str, set[str]] = field(default_factory=dict)  # rewards acked learned:true
    refused: dict[str, set[str]] = field(default_factory=dict)  # rewards answered 503
    unknown: dict[str, set[str]] = field(default_factory=dict)  # rewards with no answer
    statuses: Counter[str] = field(default_factory=Counter)  # "score 200", "reward 503", ...
    unexpected: list[str] = field(default_factory=list)  # answers outside the contract
    errors: Counter[str] = field(default_factory=Counter)  # transport errors by type
    slowest: dict[str, float] = field(default_factory=dict)  # status key -> seconds

    def add_user(self, user: str) -> None:
        self.scored.setdefault(user, {})
        self.learned.setdefault(user, set())
        self.refused.setdefault(user, set())
        self.unknown.setdefault(user, set())

    @property
    def acked(self) -> int:
        return sum(len(v) for v in self.learned.values())

    def _note(self, key: str, elapsed: float) -> None:
        self.statuses[key] += 1
        self.slowest[key] = max(self.slowest.get(key, 0.0), elapsed)

    async def round(self, client: httpx.AsyncClient, user: str) -> None:
        """One /score, then the /reward of its decision; everything recorded."""
        self.add_user(user)
        start = time.monotonic()
        try:
            scored = await client.post("/score", json=score_body(user))
        except httpx.TransportError as exc:
            self._note("score error", time.monotonic() - start)
            self.errors[f"score {type(exc).__name__}"] += 1
            await asyncio.sleep(0.05)
            return
        self._note(f"score {scored.status_code}", time.monotonic() - start)
        if scored.status_code != 200:
            if not refused_by_store(scored):
                self.unexpected.append(f"/score {describe(scored)}")
            await asyncio.sleep(0.05)
            return
        decision = scored.json()
        event, tip = decision["event_id"], decision["tip_id"]
        self.scored[user][event] = tip
        start = time.monotonic()
        try:
            rewarded = await client.post("/reward", json=reward_body(user, event, tip))
        except httpx.TransportError as exc:
            self._note("reward error", time.monotonic() - start)
            self.errors[f"reward {type(exc).__name__}"] += 1
            self.unknown[user].add(event)
            return
        self._note(f"reward {rewarded.status_code}", time.monotonic() - start)
        if rewarded.status_code == 200 and rewarded.json()["learned"] is True:
            self.learned[user].add(event)
        elif refused_by_store(rewarded):
            self.refused[user].add(event)
        else:
            self.unexpected.append(f"/reward {describe(rewarded)}")
            self.unknown[user].add(event)
        if rewarded.status_code != 200:
            await asyncio.sleep(0.05)


async def drive(
    ledger: Ledger, base_url: str, users: list[str], stop: asyncio.Event, *, timeout: float
) -> None:
    """One task per user: score then reward in a loop until `stop`, over keep-alive
    connections, each request with `timeout`."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:

        async def loop(user: str) -> None:
            while not stop.is_set():
                await ledger.round(client, user)
                await asyncio.sleep(0)

        await asyncio.gather(*(loop(u) for u in users))


async def wait_for_acks(ledger: Ledger, count: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while ledger.acked < count:
        assert time.monotonic() < deadline, (
            f"the load stalled at {ledger.acked} acknowledged rewards: {dict(ledger.statuses)},"
            f" {ledger.unexpected[:5]}, {dict(ledger.errors)}"
        )
        await asyncio.sleep(0.02)


@dataclass
class Settled:
    reward_counts: dict[str, int]  # per user, after settling
    refused_but_stored: list[str]  # rewards answered 503 that had been stored all the same


def settle(client: httpx.Client, ledger: Ledger, *, refusals_wrote_nothing: bool = True) -> Settled:
    """After the fault: resolve every reward whose fate is open, then require the store to
    hold exactly the rewards sent, each once.

    `refusals_wrote_nothing`: a reward answered 503 must not have been stored (sent again,
    it is learned). Off where the database itself went away mid-commit, when the server
    cannot know the outcome either; those found stored are returned.
    """
    settled = Settled({}, [])
    for user in ledger.scored:
        for event in sorted(ledger.refused[user]):
            r = client.post("/reward", json=reward_body(user, event, ledger.scored[user][event]))
            assert r.status_code == 200, (user, event, describe(r))
            if r.json()["learned"] is False:
                settled.refused_but_stored.append(f"{user} {event}")
        if refusals_wrote_nothing:
            assert not settled.refused_but_stored, (
                f"rewards answered 503 had been stored: {settled.refused_but_stored[:5]}"
            )
        # A reward without an answer may or may not have been stored; now it is.
        for event in sorted(ledger.unknown[user]):
            r = client.post("/reward", json=reward_body(user, event, ledger.scored[user][event]))
            assert r.status_code == 200, (user, event, describe(r))
        sent = ledger.learned[user] | ledger.refused[user] | ledger.unknown[user]
        export = client.get(f"/users/{user}/export")
        assert export.status_code == 200, describe(export)
        body = export.json()
        model = body["model"]
        if model is None:
            assert not sent, (user, body)
            assert not ledger.scored[user], (user, body)
            assert not body["decisions"], (user, body)
            settled.reward_counts[user] = 0
            continue
        decisions = {d["event_id"]: d for d in body["decisions"]}
        rewarded = {e for e, d in decisions.items() if d["reward"] is not None}
        lost = ledger.learned[user] - rewarded
        assert not lost, f"{user}: {len(lost)} acknowledged rewards not stored: {sorted(lost)[:5]}"
        assert rewarded == sent, (user, sorted(rewarded - sent)[:5], sorted(sent - rewarded)[:5])
        # Exact: each reward counted once, nothing counted that was not sent.
        assert model["reward_count"] == len(sent), (user, model["reward_count"], len(sent))
        # Every acknowledged decision is logged, and each pull logged one decision.
        missing = set(ledger.scored[user]) - set(decisions)
        assert not missing, f"{user}: acknowledged decisions missing: {sorted(missing)[:5]}"
        assert model["pulls"] == len(decisions), (user, model["pulls"], len(decisions))
        stats = client.get(f"/stats/{user}").json()
        assert stats["reward_count"] == len(sent), (user, stats)
        settled.reward_counts[user] = stats["reward_count"]
    return settled


def summary(ledger: Ledger) -> str:
    slow = {k: round(v, 2) for k, v in sorted(ledger.slowest.items())}
    return (
        f"statuses={dict(ledger.statuses)} errors={dict(ledger.errors)} slowest_s={slow}"
        f" acked={ledger.acked} refused={sum(len(v) for v in ledger.refused.values())}"
        f" unknown={sum(len(v) for v in ledger.unknown.values())}"
    )
