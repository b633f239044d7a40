"""SIGTERM under load: the server stops accepting, answers what it received, closes the
store and exits 0; nothing acknowledged is lost and no client is reset mid-request.

Every request a client sends ends one of three ways: answered 200 (acknowledged);
refused before it was sent (the server had stopped accepting: the client may go
elsewhere); or anything else once its bytes were on the wire (a reset, a connection
closed without an answer, another status), which is a failure: the client cannot know
whether it was applied.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

CLIENTS = 8
SIGNAL_AFTER_ACKS = 150
LOAD_DEADLINE_S = 60.0
GRACE_S = 20
CANDIDATES = [
    {"id": "a", "content": "a", "source": "t", "features": {"priority": 4}},
    {"id": "b", "content": "b", "source": "t"},
]


class _Trace:
    """httpcore's trace hook: has this request's first byte been written?"""

    def __init__(self, on_sent: Callable[[], None] | None = None) -> None:
        self.sent = False
        self.new_connection = False
        self._on_sent = on_sent

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.new_connection = True
        elif event == "http11.send_request_headers.started":
            self.sent = True
        elif event == "http11.send_request_body.complete" and self._on_sent is not None:
            self._on_sent()


@dataclass
class _Load:
    """What the clients saw, filled in by their threads."""

    signal_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    scored: dict[str, int] = field(default_factory=dict)
    rewarded: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # (event, tip)
    failures: list[str] = field(default_factory=list)
    closing_answers: int = 0  # 200s that came with `Connection: close`
    refused_clients: int = 0  # clients that ended on a refused connection

    @property
    def acked_rewards(self) -> int:
        with self.lock:
            return sum(len(events) for events in self.rewarded.values())


class _Refused(Exception):
    """The connection was refused before the request was sent: it never reached the server."""


class _Failed(Exception):
    """The request was sent and not acknowledged; recorded in `_Load.failures`."""


def _post(load: _Load, client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """The 200 answer, or _Refused, or _Failed."""
    trace = _Trace()
    try:
        response = client.post(path, json=body, extensions={"trace": trace})
    except httpx.HTTPError as exc:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) and not trace.sent:
            raise _Refused from exc
        since = "" if load.signal_at is None else f" {time.monotonic() - load.signal_at:.2f}s"
        where = "a new" if trace.new_connection else "a reused"
        failure = (
            f"{path}: {exc!r} on {where} connection, sent={trace.sent},{since} after the signal"
        )
    else:
        if response.status_code == 200:
            if response.headers.get("connection", "").lower() == "close":
                with load.lock:
                    load.closing_answers += 1
            return response
        failure = f"{path}: answered {response.status_code} {response.text}"
    with load.lock:
        load.failures.append(failure)
    raise _Failed(failure)


def _drive(load: _Load, base_url: str, user: str, deadline: float) -> None:
    """Score then reward, over one persistent connection, until the server refuses us or
    the test says stop."""
    timeout = httpx.Timeout(15.0, connect=5.0)
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        try:
            while not load.stop.is_set() and time.monotonic() < deadline:
                decision = _post(
                    load, client, "/score", {"user_id": user, "candidates": CANDIDATES}
                ).json()
                with load.lock:
                    load.scored[user] += 1
                body = {
                    "user_id": user,
                    "tip_id": decision["tip_id"],
                    "reward": 1.0,
                    "features": {},
                    "event_id": decision["event_id"],
                }
                _post(load, client, "/reward", body)
                with load.lock:
                    load.rewarded[user].append((decision["event_id"], decision["tip_id"]))
        except _Refused:
            with load.lock:
                load.refused_clients += 1
        except _Failed:
            pass  # recorded; this client stops


def _start_load(server: Server) -> tuple[_Load, list[threading.Thread]]:
    """CLIENTS clients, each its own user; returns once SIGNAL_AFTER_ACKS rewards are
    acknowledged, with the clients still running."""
    users = [f"drain-{i}" for i in range(CLIENTS)]
    load = _Load(scored=dict.fromkeys(users, 0), rewarded={u: [] for u in users})
    deadline = time.monotonic() + LOAD_DEADLINE_S
    threads = [
        threading.Thread(target=_drive, args=(load, server.base_url, user, deadline))
        for user in users
    ]
    for thread in threads:
        thread.start()
    _wait_for_acks(load, SIGNAL_AFTER_ACKS)
    return load, threads


def _wait_for_acks(load: _Load, count: int) -> None:
    deadline = time.monotonic() + LOAD_DEADLINE_S
    acked = load.acked_rewards
    while acked < count and not load.failures and load.refused_clients < CLIENTS:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
        acked = load.acked_rewards
    assert acked >= count, f"the load stalled at {acked}: {load.failures[:5]}"


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=LOAD_DEADLINE_S + 30)
        assert not thread.is_alive(), "a client is still running"


def _assert_every_ack_stored(client: httpx.Client, load: _Load) -> None:
    for user, events in load.rewarded.items():
        stats = client.get(f"/stats/{user}").json()
        # Exactly: a request applied but not answered would make these larger.
        assert stats["pulls"] == load.scored[user], (user, stats)
        assert stats["reward_count"] == len(events), (user, stats)
        for event_id, tip_id in events:
            again = client.post(
                "/reward",
                json={"user_id": user, "tip_id": tip_id, "reward": 1.0, "features": {},
                      "event_id": event_id},
            )  # fmt: skip
            assert again.status_code == 200, again.text
            assert again.json()["learned"] is False, (user, event_id)


def _wait_until_logged(server: Server, line: str, times: int) -> None:
    deadline = time.monotonic() + LOAD_DEADLINE_S
    while server.log().count(line) < times and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.log().count(line) == times, server.log()


def _wal_of(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-wal")


def _assert_stopped_cleanly(server: Server) -> None:
    """Exit 0 within the grace period, without cancelling a request; the store was closed
    (SQLite checkpoints and removes the WAL when its last connection closes)."""
    assert server.proc is not None
    try:
        code = server.proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within the grace period:\n{server.log()}")
    assert code == 0, server.log()
    assert "timeout graceful shutdown exceeded" not in server.log()
    assert not _wal_of(server.db_path).exists(), "the store was not closed: the WAL is left"


@pytest.mark.parametrize(
    ("workers", "to_group"),
    [(2, False), (2, True), (1, False)],
    ids=["2-workers", "2-workers-signal-to-group", "1-worker"],
)
def test_sigterm_under_load_loses_nothing_and_resets_no_client(
    server_factory, tmp_path: Path, workers: int, to_group: bool
) -> None:
    """The signal goes to the main process, as Kubernetes and Docker send it, or to every
    process of the group, as systemd does by default and a terminal does on Ctrl+C."""
    db_path = tmp_path / "drain.db"
    server: Server = server_factory(
        workers=workers, db_path=db_path, env={"OO_GRACEFUL_SHUTDOWN_S": str(GRACE_S)}
    )
    assert server.proc is not None
    load, clients = _start_load(server)
    load.signal_at = time.monotonic()
    (os.killpg if to_group else os.kill)(server.proc.pid, signal.SIGTERM)
    _join(clients)
    _assert_stopped_cleanly(server)

    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert load.refused_clients == CLIENTS, "the server did not stop accepting"
    # Requests received during the drain were answered, each closing its connection.
    assert load.closing_answers > 0
    with server_factory(db_path=db_path).client() as client:
        _assert_every_ack_stored(client, load)


def test_a_restart_of_the_workers_under_load_resets_no_client(
    server_factory, tmp_path: Path
) -> None:
    """SIGHUP replaces the workers one by one. Each old worker drains as the whole server
    does on SIGTERM, but must not stop the others accepting on the shared socket."""
    server: Server = server_factory(workers=2, db_path=tmp_path / "restart.db")
    assert server.proc is not None
    load, clients = _start_load(server)
    load.signal_at = time.monotonic()
    os.kill(server.proc.pid, signal.SIGHUP)
    _wait_until_logged(server, "Finished server process", times=2)  # the old workers
    # The new workers serve the same clients, on new connections.
    _wait_for_acks(load, load.acked_rewards + SIGNAL_AFTER_ACKS)
    load.stop.set()
    _join(clients)

    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert load.refused_clients == 0
    assert load.closing_answers > 0  # the old workers closed their connections
    with server.client() as client:
        _assert_every_ack_stored(client, load)


def _wait_until_refused(port: int, within_s: float) -> None:
    """Connect until the server refuses; fail if it still accepts after `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0):
                pass
        except ConnectionRefusedError:
            return
        except TimeoutError:
            continue  # the server drops new connection attempts while it drains
        time.sleep(0.05)
    pytest.fail(f"the server still accepted connections {within_s}s after SIGTERM")


def test_a_write_waiting_for_the_database_is_answered_after_sigterm(
    server_factory, tmp_path: Path
) -> None:
    """A request still running when SIGTERM arrives is finished and answered within the
    grace period, while the server already refuses new connections."""
    db_path = tmp_path / "slow.db"
    server: Server = server_factory(
        workers=2,
        db_path=db_path,
        env={"OO_GRACEFUL_SHUTDOWN_S": str(GRACE_S), "OO_SQLITE_BUSY_TIMEOUT_MS": "60000"},
    )
    assert server.proc is not None
    # A worker still starting would wait for the lock below in its migration check, and
    # hold the listening socket open until it could start, then stop.
    _wait_until_logged(server, "Application startup complete", times=2)
    with server.client() as client:
        decision = client.post("/score", json={"user_id": "slow", "candidates": CANDIDATES}).json()

    # Another program (a backup, a migration) holds the database's write lock, so the
    # reward waits inside the server: a slow request in flight.
    blocker = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")
    sent = threading.Event()
    answer: list[httpx.Response | BaseException] = []

    def reward() -> None:
        body = {
            "user_id": "slow",
            "tip_id": decision["tip_id"],
            "reward": 1.0,
            "features": {},
            "event_id": decision["event_id"],
        }
        try:
            with server.client(timeout=GRACE_S) as client:
                answer.append(
                    client.post("/reward", json=body, extensions={"trace": _Trace(sent.set)})
                )
        except httpx.HTTPError as exc:
            answer.append(exc)

    thread = threading.Thread(target=reward)
    thread.start()
    try:
        assert sent.wait(timeout=10), "the reward was never sent"
        os.kill(server.proc.pid, signal.SIGTERM)
        _wait_until_refused(server.port, within_s=GRACE_S / 2)
        assert not answer, f"answered while the database was locked: {answer}"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    thread.join(timeout=GRACE_S)
    assert not thread.is_alive()

    [response] = answer
    assert isinstance(response, httpx.Response), repr(response)
    assert response.status_code == 200, response.text
    assert response.json()["learned"] is True
    assert response.headers["connection"] == "close"
    _assert_stopped_cleanly(server)
    with server_factory(db_path=db_path).client() as client:
        assert client.get("/stats/slow").json()["reward_count"] == 1
