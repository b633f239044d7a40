"""Shared fixtures: real `oo-serving serve` processes on loopback, on real SQLite files.

Under pytest-xdist (`-n 2`) the workers run tests side by side, each on its own
throwaway PostgreSQL database; a test marked `alone` (it restarts the PostgreSQL cluster
every worker uses) waits until no other test runs, and none starts until it ends.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from oo_serving import harness
from oo_serving.harness import free_port

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


class Server(harness.Server):
    """One `oo-serving serve` process group (the parent and its workers) on the SQLite
    file at `db_path`, or on the database `url` instead; its output appended to `log_path`,
    the line per request off unless `env` turns it on."""

    def __init__(
        self,
        db_path: Path,
        port: int,
        workers: int,
        log_path: Path,
        env: dict[str, str] | None = None,
        url: str | None = None,
    ) -> None:
        self.db_path = db_path
        self.database_url = url or f"sqlite:///{db_path}"
        super().__init__(
            harness.serve_command(self.database_url, workers),
            env={"OO_ACCESS_LOG": "false", **(env or {})},
            port=port,
            workers=workers,
            log_path=log_path,
        )


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
