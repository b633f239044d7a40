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
