"""API keys with scopes: who may call what.

Keys come from `OO_API_KEYS` and `OO_API_KEYS_FILE` as `KEY:SCOPES` entries, scopes
joined by `+`. In memory only their SHA-256 digests are kept, and a presented key is
compared with every digest in constant time; logs name a key by a short prefix of its
digest (`key_id`), never by the key. An entry may give the digest itself,
`sha256:<64 hex>:SCOPES`, so that the plain key need not be written down at all.

Scopes: `decide` (/score, /reward), `read` (/stats, /features, export), `admin` (/reset,
delete, and everything `decide` and `read` allow).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, Request
from pydantic import BaseModel

from oo_serving.api.scope_keys import KEY_ID_KEY

Scope = Literal["decide", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("decide", "read", "admin")
# What holding a scope allows.
GRANTS: dict[str, frozenset[str]] = {
    "decide": frozenset({"decide"}),
    "read": frozenset({"read"}),
    "admin": frozenset(SCOPES),
}
REALM = "oo-serving"
SHORT_KEY_LENGTH = 16  # keys shorter than this are accepted, with a warning at start
_DIGEST_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    digest: bytes
    allows: frozenset[str]
    short: bool = False  # given in clear and shorter than SHORT_KEY_LENGTH

    @property
    def key_id(self) -> str:
        """How logs name this key: the first 12 hex digits of its SHA-256."""
        return self.digest.hex()[:12]


class AuthError(Exception):
    """A request without a usable key (401) or without the scope it needs (403)."""

    def __init__(self, status: int, code: str, message: str, challenge: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.challenge = challenge


def parse_entries(entries: Iterable[str], source: str) -> list[ApiKey]:
    """`KEY:SCOPES` or `sha256:<64 hex>:SCOPES` entries; a ValueError names a bad one.

    Any key starting `sha256:` (in any case) is a digest, in hex of either case, or an
    error: never a plain key. Messages name an entry by its position, never by its text:
    it holds a key.
    """
    keys: list[ApiKey] = []
    for number, raw in enumerate(entries, start=1):
        entry = raw.strip()
        key, sep, scopes_text = entry.rpartition(":")
        where = f"{source}, entry {number}"
        if not sep or not key:
            raise ValueError(f"{where}: expected KEY:SCOPES, e.g. my-key:decide+read")
        if any(c.isspace() for c in key) or "," in key:
            raise ValueError(f"{where}: a key cannot hold spaces or commas")
        scopes = scopes_text.split("+")
        unknown = [s for s in scopes if s not in GRANTS]
        if unknown:
            raise ValueError(
                f"{where}: unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}"
            )
        allows = frozenset().union(*(GRANTS[s] for s in scopes))
        if key[: len(_DIGEST_PREFIX)].lower() == _DIGEST_PREFIX:
            # Read as a digest or refused: taken as a plain key, a mistyped digest would
            # configure a key equal to its own text, which is written down in the setting.
            digest = key[len(_DIGEST_PREFIX) :]
            if not _HEX_DIGEST.fullmatch(digest):
                raise ValueError(f"{where}: a sha256: entry needs exactly 64 hex digits")
            keys.append(ApiKey(bytes.fromhex(digest), allows))
        else:
            keys.append(ApiKey(digest_of(key), allows, short=len(key) < SHORT_KEY_LENGTH))
    return keys


class KeyRing:
    """The configured keys; empty means the service runs open."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = tuple(keys)
        digests = [k.digest for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same API key is configured twice")

    @classmethod
    def load(cls, keys_text: str, keys_file: Path | None) -> KeyRing:
        """From OO_API_KEYS (comma-separated) and OO_API_KEYS_FILE (one entry a line)."""
        entries = [e for e in keys_text.split(",") if e.strip()]
        keys = parse_entries(entries, "OO_API_KEYS")
        if keys_file is not None:
            try:
                lines = keys_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"OO_API_KEYS_FILE: cannot read {keys_file}: {exc}") from exc
            wanted = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
            keys += parse_entries(wanted, f"OO_API_KEYS_FILE {keys_file}")
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose digest matches; every digest is compared, in constant time."""
        digest = digest_of(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


# How the OpenAPI schema names and describes the key. Each guarded operation lists the
# scope it needs as the requirement's role (OpenAPI 3.1), e.g. {"ApiKey": ["decide"]}.
SCHEME_NAME = "ApiKey"
SECURITY_SCHEME: dict[str, Any] = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key: `Authorization: Bearer KEY`. Scopes: `decide` for /score and"
    " /reward, `read` for /stats, /features and export, `admin` for everything. Each"
    " operation names the scope it needs.",
}


def bearer_token(request: Request) -> str | None:
    """The KEY of an `Authorization: Bearer KEY` header, or None."""
    return bearer_of(request.headers.get("authorization", ""))


def bearer_of(authorization: str) -> str | None:
    """The KEY of an `Authorization` header's value `Bearer KEY`, or None."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _missing() -> AuthError:
    return AuthError(
        401,
        "missing_api_key",
        "an API key is required: send 'Authorization: Bearer KEY'",
        f'Bearer realm="{REALM}"',
    )


def _invalid() -> AuthError:
    return AuthError(
        401,
        "invalid_api_key",
        "this API key is not valid",
        f'Bearer realm="{REALM}", error="invalid_token"',
    )


def authorize(ring: KeyRing, authorization: str | None) -> ApiKey:
    """The configured key an `Authorization` header's value presents; AuthError 401
    without one. Its scopes are checked apart (`refuse_scope`), once the key's id is
    noted for the request log."""
    token = bearer_of(authorization or "")
    if token is None:
        raise _missing()
    key = ring.find(token)
    if key is None:
        raise _invalid()
    return key


def refuse_scope(key: ApiKey, scope: Scope) -> None:
    """AuthError 403 unless `key` allows `scope`."""
    if scope not in key.allows:
        raise AuthError(
            403,
            "insufficient_scope",
            f"this API key does not have the {scope!r} scope",
            f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"',
        )


def requires(ring: KeyRing, scope: Scope) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a request through only with a key allowing `scope`.

    The key's id is left in the ASGI scope for the request log.
    """

    # A plain function of the request, not a `Security` sub-dependency: FastAPI's solving
    # of one cost about 10 µs a request, more than the check. The schema is declared apart.
    async def check(request: Request) -> None:
        key = authorize(ring, request.headers.get("authorization"))
        request.scope[KEY_ID_KEY] = key.key_id
        refuse_scope(key, scope)

    return check


def requires_key(key: str) -> Callable[..., Awaitable[None]]:
    """A dependency that asks for one particular key (the metrics key), no scope."""
    ring = KeyRing([ApiKey(digest_of(key), frozenset())])

    async def check(request: Request) -> None:
        authorize(ring, request.headers.get("authorization"))

    return check


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


Kind = Literal["decide", "read", "admin", "metrics"]


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call each kind of endpoint, as keyword arguments for its route.

    A guarded kind takes a dependency that checks the key, may answer 401 (and 403), and
    states its security requirement in the OpenAPI schema. With no keys configured
    decide, read and admin are open and the schema asks for no key; /metrics has its own
    key, or none.
    """

    dependencies: dict[Kind, list[Any]]
    refusals: dict[Kind, dict[int | str, dict[str, Any]]]
    security: dict[Kind, dict[str, Any]]

    def route(
        self,
        kind: Kind,
        responses: dict[int | str, dict[str, Any]] | None = None,
        openapi_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "dependencies": self.dependencies[kind],
            "responses": {**(responses or {}), **self.refusals[kind]},
            "openapi_extra": {**(openapi_extra or {}), **self.security[kind]},
        }

    @property
    def security_schemes(self) -> dict[str, Any]:
        """For the schema's components: the scheme, if any operation asks for a key."""
        return {SCHEME_NAME: SECURITY_SCHEME} if any(self.security.values()) else {}

    @classmethod
    def of(cls, ring: KeyRing, metrics_key: str, error_model: type[BaseModel]) -> Access:
        unauthorized = {"model": error_model, "description": "No API key, or not a valid one."}
        forbidden = {"model": error_model, "description": "The key lacks the scope needed."}
        kinds: tuple[Kind, ...] = ("decide", "read", "admin", "metrics")
        access = cls({k: [] for k in kinds}, {k: {} for k in kinds}, {k: {} for k in kinds})
        if metrics_key:
            access.dependencies["metrics"] = [Depends(requires_key(metrics_key))]
            access.refusals["metrics"] = {401: unauthorized}
            access.security["metrics"] = {"security": [{SCHEME_NAME: []}]}
        if ring:
            for scope in SCOPES:
                access.dependencies[scope] = [Depends(requires(ring, scope))]
                access.refusals[scope] = {401: unauthorized, 403: forbidden}
                access.security[scope] = {"security": [{SCHEME_NAME: [scope]}]}
        return access
