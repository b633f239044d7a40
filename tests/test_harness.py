"""The server harness itself: what every server test and the benchmark stand on.

A server it started answers, and leaves no process behind once stopped or killed; a
server that cannot start fails at once with its own words, not after a time-out.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from oo_serving.harness import Server, StartError

GONE_WITHIN_S = 15.0


def group_gone(pgid: int) -> bool:
    """Whether no process is left in the group `pgid` (waiting for stragglers, bounded)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_ours_answers_and_stop_leaves_no_process(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    server = Server.ours(f"sqlite:///{tmp_path / 'oo.db'}", workers=2, log_path=log_path)
    with server:
        assert server.running
        assert server.proc is not None
        pgid = server.proc.pid
        with server.client() as client:
            assert client.get("/health").status_code == 200
        workers = server.worker_pids()
        assert len(workers) == 2, workers
        assert all(os.getpgid(pid) == pgid for pid in workers)
        assert all(rss > 0 for rss in server.worker_rss_mb())
    assert not server.running
    assert server.proc.returncode == 0, server.log()
    assert group_gone(pgid), f"processes left in group {pgid}"
    assert "Application startup complete" in server.log()


def test_ours_restarts_on_its_port_and_kill9_is_a_crash() -> None:
    server = Server.ours("memory://")  # output discarded
    server.start()
    port = server.port
    server.stop()
    server.start()
    assert server.port == port
    with server.client() as client:
        assert client.get("/health").status_code == 200
    assert server.proc is not None
    pgid = server.proc.pid
    server.kill9()
    assert server.proc.returncode == -signal.SIGKILL
    assert group_gone(pgid)
    assert server.log() == ""


def test_a_command_that_exits_at_once_raises_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('cannot serve: no such thing', file=sys.stderr); sys.exit(3)"
    server = Server([sys.executable, "-c", script], log_path=tmp_path / "out.log")
    with pytest.raises(StartError, match=r"exited at start-up \(3\)[\s\S]*cannot serve"):
        server.start()
    assert not server.running


def test_ours_on_a_database_it_cannot_open_raises_with_the_reason(tmp_path: Path) -> None:
    server = Server.ours("bogus://nowhere", log_path=tmp_path / "server.log")
    with pytest.raises(StartError, match="unsupported database URL 'bogus://nowhere'"):
        server.start()
