"""`make bench`: measure the service side by side with the prototype; write docs/benchmarks.md.

Everything runs on this machine, load generator included, on loopback only:

1. HTTP load with wrk: POST /score (10 candidates, 1,000 users), POST /reward, GET /health,
   at concurrency 1, 16 and 64, with 1 and 2 workers, on SQLite and PostgreSQL, and the
   prototype (../shared/seed/seed_app.py, in its own venv under bench/.prototype) when it is
   there. Ours runs with its default settings, the request log included: what an operator
   gets. /score also with 2 workers on SQLite with one setting changed at a time (linucb-v2,
   epsilon exploration 0.1, linucb-v2 as a shadow policy), judged against linucb-v1. Every
   cell runs every contender in turn, after a warm-up, so drift hits all alike.
2. Core micro-benchmarks: choosing among 10 and 100 candidates, one update; ours and the
   prototype's formula (a matrix inverse per call).
3. Scale: stores pre-filled with 100,000 users (and 1,000,000 on SQLite): /score latency
   against 1,000 users, worker RSS after touching every user, bytes on disk per user.

Options (environment): BENCH_SECONDS (default 5) per measurement, BENCH_WARMUP (2),
BENCH_SCALE=0 to skip the scale section, BENCH_TOUCH_MAX_S (1800) the longest run that
touches every user of a scale store, OO_BENCH_POSTGRES_DSN (default: the tests' DSN),
BENCH_BASELINE=<git revision> to add that revision of ours on SQLite as a "before"
contender for /score and /reward (checked out under bench/.baseline).

BENCH_QUICK=1, for iterating on the hot path: 2 workers, /score and /reward at c=16 and 64,
ours on SQLite and PostgreSQL and the prototype (the policy variants too with
BENCH_VARIANTS=1), no micro-benchmarks, no scale; prints the ratios and the targets, and
writes bench/results/quick.md instead of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastapi
import numpy as np
import psycopg
import pydantic
import uvicorn
from report import VARIANTS, render, summary  # bench/, the script's folder, is on sys.path

from oo_serving.core import linucb
from oo_serving.core.linucb_v1 import LinUCBV1
from oo_serving.harness import Server

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "lua"
SEED = ROOT.parent / "shared" / "seed" / "seed_app.py"
PROTO_VENV = BENCH / ".prototype"
OURS = ROOT / ".venv" / "bin" / "oo-serving"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = BENCH / "results"

QUICK = os.environ.get("BENCH_QUICK", "0") == "1"
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "2"))
SCALE = not QUICK and os.environ.get("BENCH_SCALE", "1") != "0"
TOUCH_MAX_S = float(os.environ.get("BENCH_TOUCH_MAX_S", "1800"))
BASELINE = os.environ.get("BENCH_BASELINE", "")  # a git revision of ours to measure as "before"
PG_DSN = os.environ.get("OO_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
CONCURRENCY = (16, 64) if QUICK else (1, 16, 64)
WORKERS = (2,) if QUICK else (1, 2)
ENDPOINTS = ("score", "reward") if QUICK else ("score", "reward", "health")
# Ours on SQLite with one setting changed from the defaults: /score only, with 2 workers,
# in the same cells as linucb-v1 (the "sqlite" contender), which they are judged against.
WITH_VARIANTS = os.environ.get("BENCH_VARIANTS", "0" if QUICK else "1") == "1"
VARIANT_WORKERS = 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


# ── set-up ───────────────────────────────────────────────────────────────────
def ensure_wrk() -> str:
    if path := shutil.which("wrk"):
        return path
    log("wrk is missing: installing Debian's package")
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", "wrk"])
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


def ensure_prototype() -> Path | None:
    """The prototype's venv, with the same FastAPI, uvicorn and numpy versions as ours."""
    if not SEED.exists():
        log(f"no prototype at {SEED}: the baseline columns stay empty")
        return None
    python = PROTO_VENV / "bin" / "python"
    if not python.exists():
        log("creating the prototype's venv")
        run([sys.executable, "-m", "venv", str(PROTO_VENV)])
        pins = ["fastapi", "uvicorn", "uvloop", "httptools", "numpy", "pydantic"]
        run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "-c",
                str(ROOT / "requirements.lock"),
                *pins,
            ]
        )
    return python


def postgres_admin() -> str | None:
    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
        return PG_DSN
    except Exception as exc:
        log(f"PostgreSQL unreachable ({exc}): its rows stay empty")
        return None


@contextmanager
def postgres_database(admin: str) -> Iterator[str]:
    name = f"oo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def maybe_postgres(admin: str | None) -> Iterator[str | None]:
    if admin is None:
        yield None
        return
    with postgres_database(admin) as url:
        yield url


# ── servers ──────────────────────────────────────────────────────────────────
# Every server runs with its output discarded and no OO_* setting leaked in from the
# caller's environment: ours runs on its defaults and on what `env` names, nothing else.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def ours(name: str, database: str, workers: int, settings: dict[str, str] | None = None) -> Server:
    """Ours with its default settings (the request log on, to stderr, which is discarded)
    but for `settings` (OO_* variables)."""
    return Server.ours(
        database, workers, env=settings, access_log=None, name=name, inherit_settings=False,
        startup_timeout_s=START_TIMEOUT_S, stop_timeout_s=STOP_TIMEOUT_S,
    )  # fmt: skip


def command(
    name: str, cmd: list[str], env: dict[str, str], workers: int, cwd: Path | None = None
) -> Server:
    """Another server than ours, `{port}` in `cmd` for its port."""
    return Server(
        cmd, name=name, env=env, cwd=cwd, workers=workers, inherit_settings=False,
        startup_timeout_s=START_TIMEOUT_S, stop_timeout_s=STOP_TIMEOUT_S,
    )  # fmt: skip


def baseline(revision: str, database: str, workers: int) -> Server:
    """An earlier revision of ours, from a git worktree, on this venv's dependencies."""
    tree = BENCH / ".baseline"
    if tree.exists():
        run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)])
    run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision])
    return command(
        "before",
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "oo_serving", "serve", "--port", "{port}",
         "--workers", str(workers), "--database", database],
        {"PYTHONPATH": str(tree / "src")},
        workers,
    )  # fmt: skip


def prototype(python: Path, state_dir: Path, workers: int) -> Server:
    """The prototype without uvicorn's access log (a plain `uvicorn` run has it on): that
    spares it a log line per request that ours writes, so ratios to it err in its favour."""
    return command(
        "prototype",
        [str(python), "-m", "uvicorn", "seed_app:app", "--port", "{port}",
         "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        {"STATE_DIR": str(state_dir)},
        workers,
        cwd=SEED.parent,
    )  # fmt: skip


# ── load ─────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Result:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    non2xx: int
    socket_errors: int


def script(endpoint: str) -> Path:
    """The wrk script for an endpoint, with the reporting `done` appended."""
    target = Path(tempfile.gettempdir()) / f"oo-bench-{endpoint}.lua"
    body = (LUA / f"{endpoint}.lua").read_text() if endpoint != "health" else ""
    target.write_text(body + "\n" + (LUA / "report.lua").read_text())
    return target


def wrk(url: str, endpoint: str, connections: int, seconds: float, users: int = 1000) -> Result:
    path = "/health" if endpoint == "health" else ""
    cmd = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
           "--timeout", "10s", "-s", str(script(endpoint)), url + path]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**os.environ, "USERS": str(users)}, capture_output=True, text=True,
        timeout=seconds + 60, check=False,
    )  # fmt: skip
    out = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    m = re.search(r"RESULT (.*)", out)
    if not m:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    v = {k: int(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    return Result(
        requests=v["requests"],
        rps=v["requests"] / (v["duration_us"] / 1e6),
        p50_ms=v["p50_us"] / 1000,
        p99_ms=v["p99_us"] / 1000,
        p999_ms=v["p999_us"] / 1000,
        non2xx=v["non2xx"],
        socket_errors=v["socket_errors"],
    )


def measure(server: Server, endpoint: str, connections: int, users: int = 1000) -> Result:
    wrk(server.base_url, endpoint, connections, WARMUP, users)
    return wrk(server.base_url, endpoint, connections, SECONDS, users)


# ── micro-benchmarks ─────────────────────────────────────────────────────────
def micro() -> dict[str, float]:
    """µs per operation: the best of 60 interleaved rounds of 500 calls."""

    rng = np.random.default_rng(0)
    params = linucb.LinUCBParams()
    state = linucb.initial_state(params)
    for _ in range(50):
        state = linucb.update(state, rng.uniform(0, 1, 5), float(rng.uniform(-1, 1)))
    X10, X100 = rng.uniform(0, 1, (10, 5)), rng.uniform(0, 1, (100, 5))
    x = rng.uniform(0, 1, 5)
    A = np.linalg.inv(state.A_inv)
    b = state.b.copy()

    def prototype_choose(X: np.ndarray) -> None:
        # The prototype's formula: an inverse per request, then one row at a time.
        A_inv = np.linalg.inv(A)
        theta = A_inv @ b
        best = -float("inf")
        for row in X:
            score = float(theta @ row) + 1.0 * float(np.sqrt(float(row @ A_inv @ row)))
            best = max(best, score)

    def prototype_update() -> None:
        A2, b2 = A.copy(), b.copy()
        A2 += np.outer(x, x)
        b2 += 0.5 * x

    cases: dict[str, Callable[[], object]] = {
        "choose among 10: ours": lambda: linucb.choose(params, state, X10),
        "choose among 10: prototype's formula": lambda: prototype_choose(X10),
        "choose among 100: ours": lambda: linucb.choose(params, state, X100),
        "choose among 100: prototype's formula": lambda: prototype_choose(X100),
        "one update: ours (Sherman–Morrison)": lambda: linucb.update(state, x, 0.5),
        "one update: prototype's (A += xxᵀ, inverted at the next choice)": prototype_update,
    }
    # Short repeats, interleaved across the cases, 60 rounds: on a shared machine the best
    # round of each case is the one least disturbed by other tenants.
    best = dict.fromkeys(cases, float("inf"))
    number = 500
    for _ in range(60):
        for name, fn in cases.items():
            best[name] = min(best[name], timeit.timeit(fn, number=number) / number * 1e6)
    out = best
    return out


# ── scale ────────────────────────────────────────────────────────────────────
def initial_model() -> tuple[str, bytes, int]:
    """A new user's linucb-v1 model as the store keeps it: policy, state, state version."""
    policy = LinUCBV1()
    return policy.name, policy.encode(policy.initial_state()), policy.state_version


MODEL_COLUMNS = (
    "user_id, policy, state, state_version, pulls, reward_count, cumulative_reward, last_updated_ms"
)


def prefill_sqlite(path: Path, users: int) -> None:
    run([str(OURS), "migrate", "--database", f"sqlite:///{path}"])
    name, state, version = initial_model()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            f"INSERT INTO user_model ({MODEL_COLUMNS}) VALUES (?, ?, ?, ?, 0, 0, 0.0, 0)",
            ((f"user-{i}", name, state, version) for i in range(users)),
        )


def prefill_postgres(url: str, users: int) -> None:
    run([str(OURS), "migrate", "--database", url])
    name, state, version = initial_model()
    with (
        psycopg.connect(url) as conn,
        conn.cursor().copy(f"COPY user_model ({MODEL_COLUMNS}) FROM STDIN") as copy,
    ):
        for i in range(users):
            copy.write_row((f"user-{i}", name, state, version, 0, 0, 0.0, 0))


def users_touched(database: str) -> int:
    """Users whose model has served at least one /score (each /score counts a pull)."""
    query = "SELECT count(*) FROM user_model WHERE pulls > 0"
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            return int(conn.execute(query).fetchone()[0])
    with psycopg.connect(database) as pg:
        row = pg.execute(query).fetchone()
        return int(row[0]) if row else 0


def bytes_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
    return path.stat().st_size


def decision_bytes() -> float:
    """On-disk bytes of one decision with 10 candidates, from a small SQLite store."""
    folder = Path(tempfile.mkdtemp())
    db = folder / "d.db"
    server = ours("sqlite", f"sqlite:///{db}", 1).start()
    try:
        wrk(server.base_url, "score", 16, 3, users=50)
    finally:
        server.stop()
    with sqlite3.connect(db) as conn:
        n = conn.execute("SELECT count(*) FROM decision").fetchone()[0]
        models = conn.execute("SELECT count(*) FROM user_model").fetchone()[0]
    model_only = folder / "m.db"
    prefill_sqlite(model_only, models)
    size = bytes_on_disk(db) - bytes_on_disk(model_only)
    shutil.rmtree(folder)
    return size / n


def scale(database: str, users: int) -> dict[str, Any]:
    """/score p50 at 1,000 and at `users` users, alternating, on a pre-filled store; the
    workers' RSS after the first 1,000-user run and after a run that touches every user."""
    server = ours("scale", database, 2).start()
    try:
        small, large = [measure(server, "score", 16, users=1000)], []
        rss_1k = sum(server.worker_rss_mb())
        large.append(measure(server, "score", 16, users=users))
        small.append(measure(server, "score", 16, users=1000))
        large.append(measure(server, "score", 16, users=users))
        result: dict[str, Any] = {
            "users": users,
            "p50_1k": statistics.median(r.p50_ms for r in small),
            "p50_many": statistics.median(r.p50_ms for r in large),
            "rps_1k": statistics.median(r.rps for r in small),
            "rps_many": statistics.median(r.rps for r in large),
            "errors": sum(r.non2xx + r.socket_errors for r in small + large),
        }
        touch = touch_every_user(server, users)
        result["errors"] += touch.non2xx + touch.socket_errors
        result["touched"] = users_touched(database)
        result["rss_1k_mb"] = rss_1k
        result["rss_all_mb"] = sum(server.worker_rss_mb())
        return result
    finally:
        server.stop()


def touch_every_user(server: Server, users: int) -> Result:
    """One /score run at c=64 long enough to reach each of `users` once: its length comes
    from the rate of a short run just before, with a quarter to spare, and is bounded by
    BENCH_TOUCH_MAX_S (the report says how many users were reached)."""
    probe = wrk(server.base_url, "score", 64, SECONDS, users=users)
    seconds = min(TOUCH_MAX_S, 1.25 * users / max(probe.rps, 1.0))
    log(f"scale: touching {users:,} users, {seconds:.0f} s")
    return wrk(server.base_url, "score", 64, seconds, users=users)


# ── the report ───────────────────────────────────────────────────────────────
def versions() -> dict[str, str]:
    out = {
        "Python": platform.python_version(),
        "FastAPI": fastapi.__version__,
        "pydantic": pydantic.VERSION,
        "uvicorn": uvicorn.__version__,
        "numpy": np.__version__,
        "SQLite": sqlite3.sqlite_version,
        "wrk": _wrk_version(),
    }
    with suppress(Exception):
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["PostgreSQL"] = row[0] if row else "?"
        out["psycopg"] = psycopg.__version__
    return out


def _wrk_version() -> str:
    proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).split("\n")[0].strip()


def machine() -> str:
    cpu = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}"


def contenders(
    workers: int, tmp: str, pg_url: str | None, proto_python: Path | None
) -> list[Server]:
    servers = [ours("sqlite", f"sqlite:///{tmp}/w{workers}.db", workers)]
    if WITH_VARIANTS and workers == VARIANT_WORKERS:
        servers += [
            ours(name, f"sqlite:///{tmp}/w{workers}-{name}.db", workers, settings)
            for name, (_, settings) in VARIANTS.items()
        ]
    if pg_url:
        servers.append(ours("postgres", pg_url, workers))
    if proto_python:
        servers.append(prototype(proto_python, Path(tmp) / f"proto{workers}", workers))
    if BASELINE:
        servers.append(baseline(BASELINE, f"sqlite:///{tmp}/before{workers}.db", workers))
    return servers


def measures(name: str, endpoint: str) -> bool:
    """Whether a contender takes part in an endpoint's cells."""
    if name in VARIANTS:
        return endpoint == "score"
    return not (name == "before" and endpoint == "health")


def main() -> None:
    started = time.time()
    ensure_wrk()
    proto_python = ensure_prototype()
    pg_admin = postgres_admin()
    cells: dict[tuple[str, str, int, int], Result] = {}  # (contender, endpoint, workers, c)
    micro_results: dict[str, float] = {}
    if not QUICK:
        log("core micro-benchmarks, before any load")
        micro_results = micro()

    with tempfile.TemporaryDirectory() as tmp, maybe_postgres(pg_admin) as pg_url:
        for workers in WORKERS:
            servers = contenders(workers, tmp, pg_url, proto_python)
            for s in servers:
                s.start()
            try:
                for endpoint in ENDPOINTS:
                    for c in CONCURRENCY:
                        turn = (c + workers) % len(servers)  # who goes first rotates
                        order = servers[turn:] + servers[:turn]
                        for s in order:
                            if not measures(s.name, endpoint):
                                continue
                            log(f"{s.name:14} {endpoint:6} workers={workers} c={c}")
                            cells[(s.name, endpoint, workers, c)] = measure(s, endpoint, c)
            finally:
                for s in servers:
                    s.stop()

        scale_results: dict[str, dict[str, Any]] = {}
        per_user: dict[str, float] = {}
        if SCALE:
            log("scale: decision size")
            per_user["decision"] = decision_bytes()
            for n in (100_000, 1_000_000):
                db = Path(tmp) / f"scale{n}.db"
                log(f"scale: SQLite, {n:,} users")
                prefill_sqlite(db, n)
                per_user["model"] = bytes_on_disk(db) / n
                scale_results[f"SQLite, {n:,} users"] = scale(f"sqlite:///{db}", n)
            if pg_admin:
                with postgres_database(pg_admin) as url:
                    log("scale: PostgreSQL, 100,000 users")
                    prefill_postgres(url, 100_000)
                    scale_results["PostgreSQL, 100,000 users"] = scale(url, 100_000)

    if BASELINE:
        run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(BENCH / ".baseline")])
    write_report(cells, micro_results, scale_results, per_user, time.time() - started)


def write_report(
    cells: dict[tuple[str, str, int, int], Result],
    micro_results: dict[str, float],
    scale_results: dict[str, dict[str, Any]],
    per_user: dict[str, float],
    elapsed: float,
) -> None:
    """docs/benchmarks.md and bench/results/latest.json; in quick mode bench/results/quick.*
    and a summary on stdout instead."""
    plain = {k: v.__dict__ for k, v in cells.items()}
    text = render(
        machine=machine(),
        versions=versions(),
        seconds=SECONDS,
        warmup=WARMUP,
        cells=plain,
        baseline=BASELINE,
        micro=micro_results,
        scale=scale_results,
        per_user=per_user,
        elapsed=elapsed,
        quick=QUICK,
    )
    RESULTS.mkdir(exist_ok=True)
    doc = RESULTS / "quick.md" if QUICK else DOC
    doc.write_text(text)
    raw = RESULTS / ("quick.json" if QUICK else "latest.json")
    raw.write_text(json.dumps({"|".join(map(str, k)): v for k, v in plain.items()}, indent=1))
    if QUICK:
        print(summary(plain, micro_results, scale_results), flush=True)
    log(f"wrote {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
