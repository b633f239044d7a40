"""The SQLite /score write path: each write alone, or neighbouring writes together?

Drives `Service.score` (the real pure function, 10 candidates, 1,000 users) from N
concurrent tasks on one SQLite file with synchronous=FULL, against two contenders that
differ only in how the writer thread runs a batch of /score writes:

- per-write: each write in its own savepoint (SAVEPOINT, SELECT, UPSERT, INSERT, DELETE,
  RELEASE), as `score_tx` did before the writes were batched;
- batched: `SQLiteStore.score_tx` as it is, consecutive /score writes run together
  (one SELECT of their users, one executemany each for models, decisions and pruning).

`--module PATH` adds a third contender: another version of store/sqlite.py (e.g.
`git show REV:src/oo_serving/store/sqlite.py > /tmp/old_sqlite.py`), used as it is.

The contenders alternate in rounds, so machine drift hits each alike. Prints writes per
second, then, from a separate traced pass, per write: the calls the writer makes into
sqlite3 (execute/executemany), the statements SQLite runs (each row of an executemany
is one; each is a GIL release), and the writes per COMMIT. Usage:

    .venv/bin/python bench/sqlite_write_path.py [--seconds 3] [--rounds 3] [--module PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from oo_serving.core.features import TaskFeatures
from oo_serving.service import Candidate, Service
from oo_serving.settings import Settings
from oo_serving.store import sqlite as current
from oo_serving.store.base import ScoreFn, ScoreWrite
from oo_serving.wiring import service_of

USERS = 1000
CANDIDATES = 10
CONCURRENCY = (1, 16, 64)
WARMUP_WRITES = 2000
TRACED_WRITES = 3000
WRITER_THREAD = "oo-sqlite-write"


@dataclass
class Counts:
    calls: int = 0  # execute / executemany on the writer's connection
    statements: int = 0  # statements SQLite ran (trace callback)
    commits: int = 0

    def trace(self, sql: str) -> None:
        self.statements += 1
        if sql.startswith("COMMIT"):
            self.commits += 1


class CountedConnection:
    """The writer's connection, counting the calls made on it."""

    def __init__(self, conn: sqlite3.Connection, counts: Counts) -> None:
        self._conn = conn
        self._counts = counts

    def execute(self, *args: Any) -> sqlite3.Cursor:
        self._counts.calls += 1
        return self._conn.execute(*args)

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        self._counts.calls += 1
        return self._conn.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def contender(module: ModuleType, per_write: bool, counts: Counts | None) -> type[Any]:
    """A store class of `module`: its own score_tx, or each /score write alone."""
    base: type[Any] = module.SQLiteStore

    class Store(base):  # type: ignore[misc]
        def _new_connection(self, create: bool = False) -> Any:
            conn = super()._new_connection(create)
            if counts is None or threading.current_thread().name != WRITER_THREAD:
                return conn
            conn.set_trace_callback(counts.trace)
            return CountedConnection(conn, counts)

        if per_write:

            async def score_tx(self, user_id: str, fn: ScoreFn) -> ScoreWrite:
                write: ScoreWrite = await self._write(functools.partial(module._score, user_id, fn))
                return write

    return Store


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("oo_serving.store.sqlite_other", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def candidates(rng: random.Random) -> list[Candidate]:
    return [
        Candidate(
            id=f"tip-{i}",
            features=TaskFeatures(
                rng.randrange(24), rng.random() < 0.3, rng.random() * 30, rng.randrange(1, 5)
            ),
        )
        for i in range(CANDIDATES)
    ]


async def drive(service: Service, tasks: int, *, seconds: float, writes: int) -> tuple[int, float]:
    """(writes done, seconds taken): `tasks` loops scoring random users until `seconds`
    have passed or `writes` are done."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def loop(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        offered = candidates(rng)
        while time.perf_counter() < deadline and done < writes:
            await service.score(f"user-{rng.randrange(USERS)}", offered, {"hour_of_day": 9})
            done += 1

    await asyncio.gather(*(loop(seed) for seed in range(tasks)))
    return done, time.perf_counter() - start


@dataclass
class Rate:
    writes_s: float
    cpu_us: float  # the whole process's CPU time per write
    writer_us: float  # the writer thread's CPU time per write


async def measure(store_class: type[Any], folder: Path, tasks: int, seconds: float) -> Rate:
    """Writes per second on a fresh database (after a warm-up that creates most users),
    and the CPU time they took: the machine may be shared, the CPU time less so."""
    url = f"sqlite:///{folder / f'{time.monotonic_ns()}.db'}"
    store = store_class(current.sqlite_path(url), synchronous="full")
    await store.open()
    try:
        service = service_of(Settings(database_url=url), store)
        await drive(service, 16, seconds=60.0, writes=WARMUP_WRITES)
        (writer,) = [t for t in threading.enumerate() if t.name == WRITER_THREAD]
        assert writer.ident is not None
        clock = time.pthread_getcpuclockid(writer.ident)
        cpu, writer_cpu = time.process_time(), time.clock_gettime(clock)
        done, took = await drive(service, tasks, seconds=seconds, writes=10**9)
        cpu, writer_cpu = time.process_time() - cpu, time.clock_gettime(clock) - writer_cpu
        return Rate(done / took, cpu / done * 1e6, writer_cpu / done * 1e6)
    finally:
        await store.close()


async def traced(store_class: type[Any], folder: Path, tasks: int, counts: Counts) -> int:
    url = f"sqlite:///{folder / f'{time.monotonic_ns()}.db'}"
    store = store_class(current.sqlite_path(url), synchronous="full")
    await store.open()
    try:
        service = service_of(Settings(database_url=url), store)
        await drive(service, 16, seconds=60.0, writes=WARMUP_WRITES)
        counts.calls = counts.statements = counts.commits = 0
        done, _ = await drive(service, tasks, seconds=60.0, writes=TRACED_WRITES)
        return done
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--module", type=Path, help="another version of store/sqlite.py")
    parser.add_argument("--concurrency", type=int, nargs="*", default=list(CONCURRENCY))
    args = parser.parse_args()

    contenders: dict[str, tuple[ModuleType, bool]] = {
        "per-write": (current, True),
        "batched": (current, False),
    }
    if args.module is not None:
        contenders[f"module {args.module.name}"] = (load_module(args.module), False)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rates: dict[tuple[str, int], list[Rate]] = {}
        for _ in range(args.rounds):
            for tasks in args.concurrency:
                for name, (module, per_write) in contenders.items():
                    store_class = contender(module, per_write, None)
                    measured = asyncio.run(measure(store_class, folder, tasks, args.seconds))
                    rates.setdefault((name, tasks), []).append(measured)
        counted: dict[tuple[str, int], tuple[Counts, int]] = {}
        for tasks in args.concurrency:
            for name, (module, per_write) in contenders.items():
                counts = Counts()
                store_class = contender(module, per_write, counts)
                done = asyncio.run(traced(store_class, folder, tasks, counts))
                counted[(name, tasks)] = (counts, done)

    print(f"{USERS} users, {CANDIDATES} candidates, synchronous=FULL, median of {args.rounds}")
    print(
        "tasks  contender            writes/s  ratio  cpu µs/w  ratio  writer µs/w  ratio"
        "  calls/w  stmts/w  writes/commit"
    )
    for tasks in args.concurrency:

        def median(name: str, field: str) -> float:
            return float(statistics.median(getattr(r, field) for r in rates[(name, tasks)]))  # noqa: B023

        base = {f: median("per-write", f) for f in ("writes_s", "cpu_us", "writer_us")}
        for name in contenders:
            rate, cpu, writer = (median(name, f) for f in ("writes_s", "cpu_us", "writer_us"))
            counts, done = counted[(name, tasks)]
            print(
                f"{tasks:>5}  {name:<19} {rate:>9.0f} {rate / base['writes_s']:>6.2f}"
                f" {cpu:>9.0f} {cpu / base['cpu_us']:>6.2f}"
                f" {writer:>12.0f} {writer / base['writer_us']:>6.2f}"
                f" {counts.calls / done:>8.2f} {counts.statements / done:>8.2f}"
                f" {done / max(counts.commits, 1):>14.1f}"
            )


if __name__ == "__main__":
    main()
