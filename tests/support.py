"""Helpers shared by test modules."""

from __future__ import annotations

import httpx


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
