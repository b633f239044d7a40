"""`make bench`: measure the service side by side with the prototype; write docs/benchmarks.md.

Everything runs on this machine, load generator included, on loopback only:

1. HTTP load with wrk: POST /score (10 candidates, 1,000 users), POST /reward, GET /health,
   at concurrency 1, 16 and 64, with 1 and 2 workers, on SQLite and PostgreSQL, and the
   prototype (../shared/seed/seed_app.py, in its own venv under bench/.prototype) when it is
   there; /score also with ours serving linucb-v2 on SQLite. Every cell runs every
   contender in turn, after a warm-up, so drift hits all alike.
2. Core micro-benchmarks: choosing among 10 and 100 candidates, one update; ours and the
   prototype's formula (a matrix inverse per call).
3. Scale: stores pre-filled with 100,000 users (and 1,000,000 on SQLite): /score latency
   against 1,000 users, worker RSS after touching every user, bytes on disk per user.

Options (environment): BENCH_SECONDS (default 5) per measurement, BENCH_WARMUP (2),
BENCH_SCALE=0 to skip the scale section, OO_BENCH_POSTGRES_DSN (default: the tests' DSN),
BENCH_BASELINE=<git revision> to add that revision of ours on SQLite as a "before"
contender for /score and /reward (checked out under bench/.baseline).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastapi
import httpx
import numpy as np
import psycopg
import pydantic
import uvicorn
from report import render  # bench/, the script's folder, is on sys.path

from oo_serving.core import linucb

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "lua"
SEED = ROOT.parent / "shared" / "seed" / "seed_app.py"
PROTO_VENV = BENCH / ".prototype"
OURS = ROOT / ".venv" / "bin" / "oo-serving"
DOC = ROOT / "docs" / "benchmarks.md"

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "2"))
SCALE = os.environ.get("BENCH_SCALE", "1") != "0"
BASELINE = os.environ.get("BENCH_BASELINE", "")  # a git revision of ours to measure as "before"
PG_DSN = os.environ.get("OO_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
CONCURRENCY = (1, 16, 64)
WORKERS = (1, 2)
ENDPOINTS = ("score", "reward", "health")
V2 = "sqlite-v2"  # ours on SQLite serving linucb-v2: measured on /score only, next to linucb-v1


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        cmd = [c.replace("{port}", str(self.port)) for c in self.cmd]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def worker_rss_mb(self) -> list[float]:
        """RSS of each process serving requests (the workers; with one, the server)."""
        assert self.proc is not None
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with suppress(OSError):
            kids = [int(p) for p in children.read_text().split()]
            # uvicorn --workers N: a supervisor, and N workers (plus a resource tracker).
            workers = [p for p in kids if "multiprocessing.resource_tracker" not in _cmdline(p)]
            pids = workers or pids
        return [_rss_mb(p) for p in pids]


def _cmdline(pid: int) -> str:
    with suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return ""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ours(name: str, database: str, workers: int, policy: str | None = None) -> Server:
    policy_env = {"OO_POLICY": policy} if policy else {}
    return Server(
        name,
        [str(OURS), "serve", "--port", "{port}", "--workers", str(workers), "--database", database],
        env={"OO_ACCESS_LOG": "false", "OO_LOG_LEVEL": "warning", **policy_env},
    )


def baseline(revision: str, database: str, workers: int) -> Server:
    """An earlier revision of ours, from a git worktree, on this venv's dependencies."""
    tree = BENCH / ".baseline"
    if tree.exists():
        run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)])
    run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision])
    return Server(
        "before",
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "oo_serving", "serve", "--port", "{port}",
         "--workers", str(workers), "--database", database],
        env={"PYTHONPATH": str(tree / "src"), "OO_ACCESS_LOG": "false", "OO_LOG_LEVEL": "warning"},
    )  # fmt: skip


def prototype(python: Path, state_dir: Path, workers: int) -> Server:
    return Server(
        "prototype",
        [str(python), "-m", "uvicorn", "seed_app:app", "--port", "{port}",
         "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        env={"STATE_DIR": str(state_dir)},
        cwd=SEED.parent,
    )  # fmt: skip


# ── load ─────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Result:
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
        rps=v["requests"] / (v["duration_us"] / 1e6),
        p50_ms=v["p50_us"] / 1000,
        p99_ms=v["p99_us"] / 1000,
        p999_ms=v["p999_us"] / 1000,
        non2xx=v["non2xx"],
        socket_errors=v["socket_errors"],
    )


def measure(server: Server, endpoint: str, connections: int, users: int = 1000) -> Result:
    wrk(server.url, endpoint, connections, WARMUP, users)
    return wrk(server.url, endpoint, connections, SECONDS, users)


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
def prefill_sqlite(path: Path, users: int) -> None:
    run([str(OURS), "migrate", "--database", f"sqlite:///{path}"])
    a_inv, b = np.identity(5).tobytes(), np.zeros(5).tobytes()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO user_model VALUES (?, 'linucb-v1', ?, ?, 0, 0, 0.0, 0)",
            ((f"user-{i}", a_inv, b) for i in range(users)),
        )


def prefill_postgres(url: str, users: int) -> None:
    run([str(OURS), "migrate", "--database", url])
    a_inv, b = np.identity(5).tobytes(), np.zeros(5).tobytes()
    with (
        psycopg.connect(url) as conn,
        conn.cursor().copy(
            "COPY user_model (user_id, policy, a_inv, b, pulls, reward_count, cumulative_reward,"
            " last_updated_ms) FROM STDIN"
        ) as copy,
    ):
        for i in range(users):
            copy.write_row((f"user-{i}", "linucb-v1", a_inv, b, 0, 0, 0.0, 0))


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
        wrk(server.url, "score", 16, 3, users=50)
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


def scale(database: str, users: int, touch_all: bool) -> dict[str, Any]:
    """/score p50 at 1,000 and at `users` users, alternating, on a pre-filled store; RSS."""
    server = ours("scale", database, 2).start()
    try:
        small, large = [], []
        for _ in range(2):
            small.append(measure(server, "score", 16, users=1000))
            large.append(measure(server, "score", 16, users=users))
        rss_small = sum(server.worker_rss_mb())
        result: dict[str, Any] = {
            "p50_1k": statistics.median(r.p50_ms for r in small),
            "p50_many": statistics.median(r.p50_ms for r in large),
            "rps_1k": statistics.median(r.rps for r in small),
            "rps_many": statistics.median(r.rps for r in large),
            "errors": sum(r.non2xx + r.socket_errors for r in small + large),
        }
        if touch_all:
            seconds = 1.3 * users / max(result["rps_many"], 1.0)
            wrk(server.url, "score", 16, seconds, users=users)
            result["rss_1k_mb"] = rss_small
            result["rss_all_mb"] = sum(server.worker_rss_mb())
            result["touch_seconds"] = seconds
        return result
    finally:
        server.stop()


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


def main() -> None:
    started = time.time()
    ensure_wrk()
    proto_python = ensure_prototype()
    pg_admin = postgres_admin()
    cells: dict[tuple[str, str, int, int], Result] = {}  # (contender, endpoint, workers, c)
    log("core micro-benchmarks, before any load")
    micro_results = micro()

    with tempfile.TemporaryDirectory() as tmp, maybe_postgres(pg_admin) as pg_url:
        for workers in WORKERS:
            servers = [
                ours("sqlite", f"sqlite:///{tmp}/w{workers}.db", workers),
                ours(V2, f"sqlite:///{tmp}/w{workers}-v2.db", workers, policy="linucb-v2"),
            ]
            if pg_url:
                servers.append(ours("postgres", pg_url, workers))
            if proto_python:
                servers.append(prototype(proto_python, Path(tmp) / f"proto{workers}", workers))
            if BASELINE:
                servers.append(baseline(BASELINE, f"sqlite:///{tmp}/before{workers}.db", workers))
            for s in servers:
                s.start()
            try:
                for endpoint in ENDPOINTS:
                    for c in CONCURRENCY:
                        turn = (c + workers) % len(servers)  # who goes first rotates
                        order = servers[turn:] + servers[:turn]
                        for s in order:
                            if s.name == "before" and endpoint == "health":
                                continue
                            if s.name == V2 and endpoint != "score":
                                continue
                            log(f"{s.name:9} {endpoint:6} workers={workers} c={c}")
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
                scale_results[f"SQLite, {n:,} users"] = scale(
                    f"sqlite:///{db}", n, touch_all=n <= 100_000
                )
            if pg_admin:
                with postgres_database(pg_admin) as url:
                    log("scale: PostgreSQL, 100,000 users")
                    prefill_postgres(url, 100_000)
                    scale_results["PostgreSQL, 100,000 users"] = scale(url, 100_000, touch_all=True)

    if BASELINE:
        run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(BENCH / ".baseline")])
    write_report(cells, micro_results, scale_results, per_user, time.time() - started)
    log(f"wrote {DOC.relative_to(ROOT)}")


def write_report(
    cells: dict[tuple[str, str, int, int], Result],
    micro_results: dict[str, float],
    scale_results: dict[str, dict[str, Any]],
    per_user: dict[str, float],
    elapsed: float,
) -> None:

    DOC.write_text(
        render(
            machine=machine(),
            versions=versions(),
            seconds=SECONDS,
            warmup=WARMUP,
            cells={k: v.__dict__ for k, v in cells.items()},
            baseline=BASELINE,
            micro=micro_results,
            scale=scale_results,
            per_user=per_user,
            elapsed=elapsed,
        )
    )
    raw = BENCH / "results" / "latest.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(
        json.dumps({"|".join(map(str, k)): v.__dict__ for k, v in cells.items()}, indent=1)
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
