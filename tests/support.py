"""Helpers shared by test modules."""

from __future__ import annotations

import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families


def error_locs(r: httpx.Response, status: int) -> list[list[str | int]]:
    """The response is the documented error JSON with `status`; its locs."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"detail"}
    assert isinstance(body["detail"], list)
    assert body["detail"]
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"}
        assert isinstance(item["loc"], list)
        assert isinstance(item["msg"], str)
        assert item["msg"]
        assert isinstance(item["type"], str)
    return [item["loc"] for item in body["detail"]]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` in a Prometheus exposition whose labels
    include `labels` (0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def oo_serving(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the `oo-serving` command of this checkout; its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "oo_serving", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class SideBySide:
    """`oo-serving` commands started together; each one's exit code and output.

    For commands that each wait out a time-out (a PostgreSQL that refuses, a database
    that does not exist: the connection pool keeps retrying for seconds before it gives
    up): run one after the other, the waits add up; side by side, they overlap.
    """

    def __init__(self, commands: dict[str, tuple[str, ...]]) -> None:
        self._running = {
            key: subprocess.Popen(
                [sys.executable, "-m", "oo_serving", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for key, args in commands.items()
        }
        self._done: dict[str, subprocess.CompletedProcess[str]] = {}

    def result(self, key: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The command `key` once it has ended: its exit code and output."""
        if key not in self._done:
            proc = self._running[key]
            stdout, stderr = proc.communicate(timeout=timeout)
            self._done[key] = subprocess.CompletedProcess(
                proc.args, proc.returncode, stdout, stderr
            )
        return self._done[key]

    def wait(self) -> None:
        """Until every command has ended."""
        for key in self._running:
            self.result(key)

    def close(self) -> None:
        """End whatever is still running (a test that failed before reading it)."""
        for proc in self._running.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
