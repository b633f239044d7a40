"""A real server on loopback, started as an operator starts it, for integration tests
and benchmarks.

The service's own tests and its benchmark start every server through this module, and an
operator's integration tests can too: `Server.ours` runs `oo-serving serve` in a process
group of its own on a free 127.0.0.1 port, and `Server` runs any other command line that
answers `GET /health` (a revision to compare against, another service) the same way.

Start-up is bounded: it returns once /health answers 200, and a server that exits or never
answers is stopped and raises `StartError` with the tail of its log. `stop()` is the
graceful path: SIGTERM to the whole group (the parent and its workers), then SIGKILL if it
lingers. `kill9()` is a crash: SIGKILL to the group, no shutdown code runs.

    from oo_serving.harness import Server

    with Server.ours("sqlite:///var/oo.db", workers=2, log_path=Path("server.log")) as server:
        with server.client() as client:
            assert client.get("/ready").status_code == 200
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0  # until /health answers 200
STOP_TIMEOUT_S = 15.0  # after SIGTERM, before SIGKILL
KILL_TIMEOUT_S = 10.0  # after SIGKILL
POLL_S = 0.1
LOG_TAIL_LINES = 60


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (nothing stops another process taking it first)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def serve_command(database_url: str, workers: int = 1) -> list[str]:
    """`oo-serving serve` on 127.0.0.1 from this interpreter, `{port}` for the port."""
    return [
        sys.executable, "-m", "oo_serving", "serve",
        "--host", HOST, "--port", "{port}",
        "--workers", str(workers), "--database", database_url,
    ]  # fmt: skip


class StartError(RuntimeError):
    """The server exited at start-up, or did not answer /health with 200 in time."""


class Server:
    """One server process group on 127.0.0.1: the command's process and its children.

    `cmd` is run with `{port}` in any argument replaced by `port` (a free one by default,
    kept across restarts), in `cwd`, with the caller's environment and `env` over it;
    `inherit_settings=False` drops the caller's OO_* variables, so that ours runs on its
    defaults and `env` alone. With `log_path`, its stdout and stderr are appended to that
    file; without, they are discarded. `workers` is how many processes serve requests
    (for `worker_pids`).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        name: str = "server",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        port: int | None = None,
        workers: int = 1,
        log_path: Path | None = None,
        inherit_settings: bool = True,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.cmd = list(cmd)
        self.name = name
        self.env = dict(env or {})
        self.cwd = cwd
        self.port = free_port() if port is None else port
        self.workers = workers
        self.log_path = log_path
        self.inherit_settings = inherit_settings
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def ours(
        database_url: str,
        workers: int = 1,
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        access_log: bool | None = False,
        name: str = "oo-serving",
        port: int | None = None,
        inherit_settings: bool = True,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> Server:
        """`oo-serving serve --workers <workers> --database <database_url>`, not started.

        `access_log=False` turns the line per request off (OO_ACCESS_LOG=false) unless
        `env` sets it; None leaves it to the server's settings.
        """
        quiet = {} if access_log is None else {"OO_ACCESS_LOG": str(access_log).lower()}
        return Server(
            serve_command(database_url, workers),
            name=name,
            env={**quiet, **(env or {})},
            port=port,
            workers=workers,
            log_path=log_path,
            inherit_settings=inherit_settings,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str = "") -> str:
        """The address of `path` (e.g. "/score") on this server."""
        return self.base_url + path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Self:
        """Start the command, and return once GET /health answers 200."""
        if self.running:
            raise RuntimeError(f"{self.name} is running already")
        cmd = [part.replace("{port}", str(self.port)) for part in self.cmd]
        inherited = {
            key: value
            for key, value in os.environ.items()
            if self.inherit_settings or not key.startswith("OO_")
        }
        env = {**inherited, **self.env}
        if self.log_path is None:
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        else:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    cmd, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        self._wait_until_healthy(self.proc)
        return self

    def _wait_until_healthy(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise StartError(f"{self.name} exited at start-up ({code}){self._tail()}")
            try:
                # trust_env=False: the server is on loopback; a proxy setting must not apply.
                if httpx.get(self.url("/health"), timeout=1.0, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        self.stop()
        raise StartError(
            f"{self.name} did not answer GET /health with 200 in {self.startup_timeout_s:g} s"
            f"{self._tail()}"
        )

    def stop(self) -> None:
        """SIGTERM to the process group; SIGKILL if it has not exited in `stop_timeout_s`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=KILL_TIMEOUT_S)

    def kill9(self) -> None:
        """SIGKILL to the process group: no shutdown code runs."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=KILL_TIMEOUT_S)

    def log(self) -> str:
        """What the server has written so far ("" without a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _tail(self) -> str:
        if self.log_path is None:
            return " (its output was discarded: pass log_path to keep it)"
        lines = self.log().splitlines()[-LOG_TAIL_LINES:]
        return f"; the end of {self.log_path}:\n" + "\n".join(lines)

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """An HTTP client for this server (close it, or use it in a `with`)."""
        return httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the command's process with one worker; with
        several, its live multiprocessing children (not the resource tracker), which may
        be fewer while one restarts. Linux only (/proc)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        if self.workers == 1:
            return [self.proc.pid]
        found = []
        for pid in _children(self.proc.pid):
            try:
                serves = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
                alive = _state(pid) not in ("Z", "X")
            except (FileNotFoundError, ProcessLookupError):
                continue
            if serves and alive:
                found.append(pid)
        return sorted(found)

    def worker_rss_mb(self) -> list[float]:
        """The resident memory of each process `worker_pids` names, in MiB."""
        return [_rss_mb(pid) for pid in self.worker_pids()]

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self.name} {self.base_url} {state}>"


def _children(pid: int) -> list[int]:
    """The child processes of `pid`, from every thread's /proc children list."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _state(pid: int) -> str:
    """The one-letter state in /proc/<pid>/stat: R, S, D, T, Z..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
