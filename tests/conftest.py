"""Shared fixtures: real `oo-serving serve` processes on loopback, on real SQLite files.

Under pytest-xdist (`-n 2`) the workers run tests side by side, each on its own
throwaway PostgreSQL database; a test marked `alone` (it restarts the PostgreSQL cluster
every worker uses) waits until no other test runs, and none starts until it ends.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

STARTUP_TIMEOUT_S = 30.0
ALONE = "alone"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{ALONE}: under pytest-xdist, runs while no other worker runs a test (it restarts"
        " the PostgreSQL cluster all workers use)",
    )


class Turns:
    """Under pytest-xdist, who may run now: any number of tests together, or one `alone`.

    A readers-writer lock of two flock(2) files shared by the workers: every test holds
    `lock` shared, a test marked alone holds it exclusively. A test marked alone first
    takes `gate` exclusively, and the others pass the gate before they take `lock`: once
    it waits, no new test starts ahead of it. Without xdist there is one process, and
    nothing to wait for: no file is locked.
    """

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._held = 0  # nested turns of this process (a fixture inside a test's turn)

    def place(self, folder: Path) -> None:
        self._folder = folder

    @contextmanager
    def turn(self, alone: bool = False) -> Iterator[None]:
        if self._folder is None or self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        with (
            (self._folder / "turns.gate").open("a") as gate,
            (self._folder / "turns.lock").open("a") as lock,
        ):
            fcntl.flock(gate, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
                fcntl.flock(lock, fcntl.LOCK_UN)
                fcntl.flock(gate, fcntl.LOCK_UN)


TURNS = Turns()


@pytest.fixture(scope="session", autouse=True)
def _turns_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The workers' shared folder for `Turns`: the parent of each worker's temporary one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        TURNS.place(tmp_path_factory.getbasetemp().parent)


@pytest.fixture(autouse=True)
def _turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test's turn: with every other test, or alone if marked so."""
    with TURNS.turn(alone=request.node.get_closest_marker(ALONE) is not None):
        yield


def with_database(dsn: str, name: str) -> str:
    """The URL `dsn` pointing at database `name` instead."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"OO_TEST_POSTGRES_DSN must be a postgresql:// URL, got {dsn!r}")
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> str:
    """Where the tests find PostgreSQL: OO_TEST_POSTGRES_DSN, else localhost.

    On CI (CI=true) PostgreSQL must be there; elsewhere its tests skip, saying why.
    """
    dsn = os.environ.get("OO_TEST_POSTGRES_DSN", DEFAULT_POSTGRES_DSN)
    try:
        with TURNS.turn():  # set up before a test's turn: not while the cluster restarts
            psycopg.connect(dsn, autocommit=True, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL is not reachable at OO_TEST_POSTGRES_DSN={dsn}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (on CI the PostgreSQL tests must run)")
        pytest.skip(reason)
    return dsn


@contextmanager
def throwaway_database(admin_dsn: str) -> Iterator[str]:
    """A new, empty database; its URL; dropped afterwards."""
    name = f"oo_test_{uuid.uuid4().hex[:12]}"
    # A connection for each statement: a test may restart the database in between. A
    # session's database is made and dropped outside any test's turn: each takes one.
    with TURNS.turn(), psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_dsn, name)
    finally:
        with TURNS.turn(), psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_dsn: str) -> Iterator[str]:
    """A throwaway database shared by the test run; tests isolate by user id."""
    with throwaway_database(postgres_admin_dsn) as url:
        yield url


@pytest.fixture
def fresh_postgres_url(postgres_admin_dsn: str) -> Iterator[str]:
    """A throwaway database of this test's own."""
    with throwaway_database(postgres_admin_dsn) as url:
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One `oo-serving serve` process group (the parent and its workers)."""

    db_path: Path
    port: int
    workers: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # a database URL instead of the SQLite file at db_path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.url or f"sqlite:///{self.db_path}"

    def start(self) -> Server:
        cmd = [
            sys.executable, "-m", "oo_serving", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(self.workers), "--database", self.database_url,
        ]  # fmt: skip
        env = {**os.environ, "OO_ACCESS_LOG": "false", **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited at start-up:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer /health in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def kill9(self) -> None:
        """SIGKILL to the whole process group: no shutdown code runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type[Server] | object]:
    """Start servers: `server_factory(workers=2, db_path=..., database_url=..., env={...})`.

    Every server started stops after the test.
    """
    started: list[Server] = []

    def make(
        *,
        workers: int = 1,
        db_path: Path | None = None,
        database_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        server = Server(
            db_path=db_path or tmp_path / "oo.db",
            port=free_port(),
            workers=workers,
            log_path=tmp_path / f"server-{len(started)}.log",
            env=env or {},
            url=database_url,
        )
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One single-worker server shared by the session; tests isolate by user id."""
    folder = tmp_path_factory.mktemp("shared-server")
    srv = Server(
        db_path=folder / "oo.db", port=free_port(), workers=1, log_path=folder / "server.log"
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def user_id() -> str:
    """A user id no other test uses."""
    return f"user-{uuid.uuid4().hex[:12]}"
