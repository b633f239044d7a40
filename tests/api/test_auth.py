"""API keys with scopes, against real servers: who may call what, and what they are told.

Every refusal is the documented error JSON with `WWW-Authenticate`, and changes nothing.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import Server, free_port
from tests.support import error_locs

from oo_serving.api.auth import digest_of, parse_entries

DECIDE = "decide-key-0123456789"
READ = "read-key-0123456789ab"
ADMIN = "admin-key-0123456789a"
BOTH = "read-and-decide-key-01"
KEYS = f"{DECIDE}:decide,{READ}:read,{ADMIN}:admin,{BOTH}:read+decide"
METRICS_KEY = "metrics-key-0123456789"

Call = Callable[[httpx.Client, str, dict[str, str]], httpx.Response]


def _score_body(user: str) -> dict[str, Any]:
    return {"user_id": user, "candidates": [{"id": "t1", "content": "c", "source": "s"}]}


def _reward_body(user: str) -> dict[str, Any]:
    return {"user_id": user, "tip_id": "t1", "reward": 1.0, "features": {}}


# Each protected endpoint, the scope it needs, and how to call it for a user.
ENDPOINTS: dict[str, tuple[str, Call]] = {
    "score": ("decide", lambda c, u, h: c.post("/score", json=_score_body(u), headers=h)),
    "reward": ("decide", lambda c, u, h: c.post("/reward", json=_reward_body(u), headers=h)),
    "stats": ("read", lambda c, u, h: c.get(f"/stats/{u}", headers=h)),
    "features": ("read", lambda c, u, h: c.get(f"/features/{u}", headers=h)),
    "export": ("read", lambda c, u, h: c.get(f"/users/{u}/export", headers=h)),
    "reset": ("admin", lambda c, u, h: c.post(f"/reset/{u}", headers=h)),
    "delete": ("admin", lambda c, u, h: c.delete(f"/users/{u}", headers=h)),
}
ALLOWED = {
    DECIDE: {"decide"},
    READ: {"read"},
    BOTH: {"read", "decide"},
    ADMIN: {"decide", "read", "admin"},
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("guarded")
    srv = Server(
        db_path=folder / "oo.db",
        port=free_port(),
        workers=1,
        log_path=folder / "server.log",
        env={"OO_API_KEYS": KEYS, "OO_METRICS_KEY": METRICS_KEY, "OO_ACCESS_LOG": "true"},
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def api(guarded: Server) -> Any:
    with guarded.client() as c:
        yield c


def _seed(api: httpx.Client, user: str) -> dict[str, Any]:
    """A user with one decision and one reward; their export, as the state to compare."""
    assert api.post("/score", json=_score_body(user), headers=bearer(ADMIN)).status_code == 200
    assert api.post("/reward", json=_reward_body(user), headers=bearer(ADMIN)).status_code == 200
    return _state(api, user)


def _state(api: httpx.Client, user: str) -> dict[str, Any]:
    r = api.get(f"/users/{user}/export", headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    body.pop("exported_at")
    return body


def _challenge(r: httpx.Response) -> str:
    challenge = r.headers.get("www-authenticate", "")
    assert challenge.startswith('Bearer realm="oo-serving"'), r.headers
    return challenge


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_without_a_key_every_protected_endpoint_answers_401(
    api: httpx.Client, user_id: str, endpoint: str
) -> None:
    before = _seed(api, user_id)
    _, call = ENDPOINTS[endpoint]
    r = call(api, user_id, {})
    assert error_locs(r, 401) == [["header", "Authorization"]]
    assert r.json()["detail"][0]["type"] == "missing_api_key"
    assert "error=" not in _challenge(r)
    assert _state(api, user_id) == before


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {ADMIN}x",  # not a configured key
        f"Bearer {ADMIN[:-1]}",
        "Bearer sha256:" + hashlib.sha256(ADMIN.encode()).hexdigest(),  # its hash is not a key
        f"bearer-ish {ADMIN}",
        f"Basic {ADMIN}",
        "Bearer",
    ],
)
def test_a_wrong_key_answers_401_and_changes_nothing(
    api: httpx.Client, user_id: str, header: str
) -> None:
    before = _seed(api, user_id)
    r = api.post(f"/reset/{user_id}", headers={"Authorization": header})
    assert error_locs(r, 401) == [["header", "Authorization"]]
    assert r.json()["detail"][0]["type"] in {"invalid_api_key", "missing_api_key"}
    _challenge(r)
    assert _state(api, user_id) == before


@pytest.mark.parametrize("key", sorted(ALLOWED))
def test_each_key_reaches_exactly_its_scopes(api: httpx.Client, user_id: str, key: str) -> None:
    for name, (scope, call) in ENDPOINTS.items():
        before = _seed(api, user_id)
        r = call(api, user_id, bearer(key))
        if scope in ALLOWED[key]:
            assert r.status_code == 200, (name, r.text)
        else:
            assert error_locs(r, 403) == [["header", "Authorization"]], name
            assert r.json()["detail"][0]["type"] == "insufficient_scope"
            assert f'error="insufficient_scope", scope="{scope}"' in _challenge(r)
            assert _state(api, user_id) == before, name


def test_a_new_user_tries_it(api: httpx.Client, user_id: str) -> None:
    """The issue's walk-through: 401 without a key, 403 for reset with a decide key,
    200 with an admin key, and the reset really happened."""
    assert api.post("/score", json=_score_body(user_id)).status_code == 401
    assert api.post("/score", json=_score_body(user_id), headers=bearer(DECIDE)).status_code == 200
    assert api.post(f"/reset/{user_id}", headers=bearer(DECIDE)).status_code == 403
    assert api.get(f"/stats/{user_id}", headers=bearer(READ)).json()["pulls"] == 1
    assert api.post(f"/reset/{user_id}", headers=bearer(ADMIN)).status_code == 200
    assert api.get(f"/stats/{user_id}", headers=bearer(READ)).json()["pulls"] == 0


def test_a_key_is_checked_before_the_body(api: httpx.Client) -> None:
    """Without a key nothing about the input is revealed: 401, not 422."""
    r = api.post("/score", content=b"{not json")
    assert error_locs(r, 401) == [["header", "Authorization"]]
    r = api.get("/stats/" + "x" * 300)
    assert error_locs(r, 401) == [["header", "Authorization"]]


def test_operations_endpoints_need_no_key_and_metrics_its_own(api: httpx.Client) -> None:
    assert api.get("/health").status_code == 200
    assert api.get("/ready").status_code == 200
    r = api.get("/metrics")
    assert error_locs(r, 401) == [["header", "Authorization"]]
    _challenge(r)
    assert api.get("/metrics", headers=bearer(ADMIN)).status_code == 401
    r = api.get("/metrics", headers=bearer(METRICS_KEY))
    assert r.status_code == 200
    assert "oo_http_requests_total" in r.text


def test_openapi_states_which_operations_need_which_scope(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    secured = {
        (path, method): op["security"]
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    }
    assert secured == {
        ("/score", "post"): [{"ApiKey": ["decide"]}],
        ("/reward", "post"): [{"ApiKey": ["decide"]}],
        ("/stats/{user_id}", "get"): [{"ApiKey": ["read"]}],
        ("/features/{user_id}", "get"): [{"ApiKey": ["read"]}],
        ("/users/{user_id}/export", "get"): [{"ApiKey": ["read"]}],
        ("/reset/{user_id}", "post"): [{"ApiKey": ["admin"]}],
        ("/users/{user_id}", "delete"): [{"ApiKey": ["admin"]}],
        ("/metrics", "get"): [{"ApiKey": []}],
    }
    for path, method in set(secured) - {("/metrics", "get")}:
        assert {"401", "403"} <= set(schema["paths"][path][method]["responses"]), path
    for path, method in secured:
        # The body and the security requirement both stay in the operation.
        if method == "post" and path in ("/score", "/reward"):
            assert "requestBody" in schema["paths"][path][method]


def test_an_open_server_asks_for_no_key_in_its_schema(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema["components"]
    assert not any(op.get("security") for ops in schema["paths"].values() for op in ops.values())


def test_logs_name_keys_by_hash_only(api: httpx.Client, guarded: Server, user_id: str) -> None:
    api.post("/score", json=_score_body(user_id), headers=bearer(DECIDE))
    api.post("/reset/x", headers=bearer(f"{ADMIN}-wrong"))
    log = guarded.log()
    assert hashlib.sha256(DECIDE.encode()).hexdigest()[:12] in log
    for secret in (DECIDE, READ, ADMIN, BOTH, METRICS_KEY, f"{ADMIN}-wrong"):
        assert secret not in log


def test_keys_from_a_file_and_by_hash(server_factory, tmp_path: Path, user_id: str) -> None:
    keys = tmp_path / "keys"
    digest = hashlib.sha256(b"hashed-admin-key-0123").hexdigest()
    keys.write_text(
        f"# the app\n{DECIDE}:decide\n\n  # operators, by hash only\nsha256:{digest}:admin\n"
    )
    server: Server = server_factory(env={"OO_API_KEYS_FILE": str(keys)})
    with server.client() as c:
        body = _score_body(user_id)
        assert c.post("/score", json=body, headers=bearer(DECIDE)).status_code == 200
        assert c.post(f"/reset/{user_id}", headers=bearer(DECIDE)).status_code == 403
        assert (
            c.post(f"/reset/{user_id}", headers=bearer("hashed-admin-key-0123")).status_code == 200
        )
        assert c.post("/score", json=body).status_code == 401


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `serve` expecting it to stop by itself (it refuses, or cannot bind)."""
    return subprocess.run(
        [sys.executable, "-m", "oo_serving", "serve", "--port", str(free_port()), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("just-a-key-without-scopes", "OO_API_KEYS, entry 1: expected KEY:SCOPES"),
        ("fine-key-0123456789:read,bad-key-0123456789:write", "entry 2: unknown scope 'write'"),
        ("dup-key-0123456789:read,dup-key-0123456789:admin", "configured twice"),
        ("spaced key 0123456789:read", "cannot hold spaces"),
    ],
)
def test_a_bad_key_setting_stops_the_server_without_echoing_keys(
    tmp_path: Path, keys: str, message: str
) -> None:
    result = _serve("--database", f"sqlite:///{tmp_path / 'oo.db'}", env={"OO_API_KEYS": keys})
    assert result.returncode == 2
    assert message in result.stderr
    assert "0123456789" not in result.stderr
    assert not (tmp_path / "oo.db").exists()  # refused before touching the database


DIGEST = hashlib.sha256(b"hashed-admin-key-0123").hexdigest()


@pytest.mark.parametrize(
    "key",
    [
        f"sha256:{DIGEST}",
        f"sha256:{DIGEST.upper()}",
        f"SHA256:{DIGEST}",
        f"Sha256:{DIGEST[:32]}{DIGEST[32:].upper()}",
    ],
)
def test_a_digest_entry_is_read_in_any_case(key: str) -> None:
    [parsed] = parse_entries([f"{key}:admin"], "OO_API_KEYS")
    assert parsed.digest == bytes.fromhex(DIGEST)
    assert parsed.digest == digest_of("hashed-admin-key-0123")
    assert parsed.allows == frozenset({"decide", "read", "admin"})


@pytest.mark.parametrize(
    "digest",
    [
        DIGEST[:-1],  # 63 digits
        DIGEST + "0",  # 65
        DIGEST[:-1] + "g",  # not hex
        "",
        "0x" + DIGEST[2:],
        DIGEST[:-2] + "٣٣",  # Arabic-Indic digits: not hex, though str.isdigit says so
        "sha256:" + DIGEST,
    ],
)
@pytest.mark.parametrize("prefix", ["sha256:", "SHA256:", "sHa256:"])
def test_a_malformed_digest_entry_is_refused_by_position(prefix: str, digest: str) -> None:
    """Not a plain key equal to its own text: that key is written in the setting."""
    entries = ["fine-key-0123456789:read", f"{prefix}{digest}:admin"]
    message = "OO_API_KEYS, entry 2: a sha256: entry needs exactly 64 hex digits"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_entries(entries, "OO_API_KEYS")


def test_a_malformed_digest_entry_stops_the_server(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\nsha256:{DIGEST[:-1]}z:admin\n")
    result = _serve(
        "--database",
        f"sqlite:///{tmp_path / 'oo.db'}",
        env={"OO_API_KEYS_FILE": str(keys)},
    )
    assert result.returncode == 2, result.stderr
    assert "entry 1: a sha256: entry needs exactly 64 hex digits" in result.stderr
    assert DIGEST[:16] not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "oo.db").exists()


def test_without_keys_it_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    # 192.0.2.1 is a documentation address: nothing here could bind it anyway, so the
    # refusal must come before any attempt to listen.
    result = _serve("--host", "192.0.2.1", "--database", f"sqlite:///{tmp_path / 'a.db'}", env={})
    assert result.returncode == 2
    assert "refusing to serve 192.0.2.1" in result.stderr
    assert "--insecure" in result.stderr

    # With --insecure it goes on (and then fails to bind that address), saying so loudly.
    result = _serve(
        "--host", "192.0.2.1", "--insecure", "--database", f"sqlite:///{tmp_path / 'b.db'}", env={}
    )
    assert "refusing" not in result.stderr
    assert "INSECURE: no API keys" in result.stderr


def test_open_on_loopback_says_so_at_start(server: Server) -> None:
    assert "no API keys configured: every endpoint is open" in server.log()


def test_a_metrics_key_alone_guards_only_metrics(server_factory, user_id: str) -> None:
    server: Server = server_factory(env={"OO_METRICS_KEY": METRICS_KEY})
    with server.client() as c:
        assert c.post("/score", json=_score_body(user_id)).status_code == 200
        assert error_locs(c.get("/metrics"), 401) == [["header", "Authorization"]]
        assert c.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200
