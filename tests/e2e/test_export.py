"""`GET /users/{id}/export` streams: memory stays bounded whatever the user's log holds,
and exports running at once do not starve the other routes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

DECISIONS = 100
CANDIDATES = 1000
# One page (16 decisions of 1,000 candidates) as Python objects and JSON, and allocator
# noise. Built whole, this export (about 7 MB of JSON) took over 100 MB.
MAX_PEAK_GROWTH_BYTES = 40 * 1024 * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def _fill(client: httpx.Client, user: str) -> list[str]:
    candidates = [
        {"id": f"task-{i:04d}", "content": "c", "source": "s", "features": {"priority": 1 + i % 4}}
        for i in range(CANDIDATES)
    ]
    events = []
    for _ in range(DECISIONS):
        r = client.post("/score", json={"user_id": user, "candidates": candidates})
        assert r.status_code == 200, r.text
        events.append(r.json()["event_id"])
    return events


def test_a_large_export_streams_in_bounded_memory(server_factory, user_id: str) -> None:
    server: Server = server_factory(workers=1)
    assert server.proc is not None
    pid = server.proc.pid
    with server.client() as client:
        events = _fill(client, user_id)
        # Reset the peak, then measure the peak the export itself reaches.
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before_kb = _status_kb(pid, "VmRSS")
        size = 0
        with client.stream("GET", f"/users/{user_id}/export") as r:
            assert r.status_code == 200
            assert "content-length" not in r.headers  # streamed, not built whole
            body = b"".join(r.iter_bytes())
            size = len(body)
        peak_kb = _status_kb(pid, "VmHWM")
    export = json.loads(body)
    assert [d["event_id"] for d in export["decisions"]] == events
    assert all(len(d["candidates"]) == CANDIDATES for d in export["decisions"])
    assert export["model"]["pulls"] == DECISIONS
    assert size > 6 * 1024 * 1024
    assert (peak_kb - before_kb) * 1024 < MAX_PEAK_GROWTH_BYTES, (before_kb, peak_kb, size)


def _slow_export(port: int, user: str) -> socket.socket:
    """An export whose client reads nothing: the server holds it mid-stream."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET /users/{user}/export HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_exports_held_open_do_not_starve_reads_or_readiness(server_factory, user_id: str) -> None:
    server: Server = server_factory(workers=1, env={"OO_SQLITE_BUSY_TIMEOUT_MS": "1000"})
    with server.client(timeout=10) as client:
        _fill(client, user_id)
        stalled = [_slow_export(server.port, user_id) for _ in range(4)]
        try:
            time.sleep(1.0)
            for path in (f"/stats/{user_id}", "/ready", f"/features/{user_id}"):
                r = client.get(path)  # starved, it would time out (the client's 10 s)
                assert r.status_code == 200, (path, r.text)
            r = asyncio.run(_export_when_slots_taken(server.base_url, user_id))
            # Two exports stream; the others wait for a slot and are refused at the deadline.
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"]
        finally:
            for sock in stalled:
                sock.close()
        r = client.get(f"/users/{user_id}/export")  # the slots come back
        assert r.status_code == 200
        assert r.json()["model"]["pulls"] == DECISIONS


async def _export_when_slots_taken(base_url: str, user: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        return await client.get(f"/users/{user}/export")


def test_an_export_path_with_a_trailing_newline_is_not_found(
    client: httpx.Client, user_id: str
) -> None:
    body = {"user_id": user_id, "candidates": [{"id": "a", "content": "a", "source": "s"}]}
    assert client.post("/score", json=body).status_code == 200
    assert client.get(f"/users/{user_id}/export").status_code == 200
    r = client.get(f"/users/{user_id}/export%0A")
    assert r.status_code == 404, r.text
