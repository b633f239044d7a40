"""Who may open the dashboard: with API keys configured, a key with the `read` scope.

A browser cannot send `Authorization: Bearer KEY` by itself, so the dashboard also takes
HTTP Basic authentication, with any user name and the key as the password: a 401 names
the Basic scheme, and the browser asks for it. The key is looked up in the same KeyRing
as every other route (SHA-256, compared in constant time with every configured digest).
Without keys the dashboard is open, like the API.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from fastapi import Request

from oo_serving.api.auth import REALM, KeyRing, bearer_token
from oo_serving.api.scope_keys import KEY_ID_KEY

SCOPE = "read"
CHALLENGE = f'Basic realm="{REALM}", charset="UTF-8"'


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not see the dashboard: 401 (no usable key) or 403 (no scope)."""

    status: int
    title: str
    message: str

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": CHALLENGE} if self.status == 401 else {}


def basic_password(request: Request) -> str | None:
    """The password of an `Authorization: Basic ...` header, or None."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep and password else None


def refusal(ring: KeyRing, request: Request) -> Refusal | None:
    """None if the request may see the dashboard; otherwise why not. The key's id is left
    in the ASGI scope for the request log, as for the API's routes."""
    if not ring:
        return None
    presented = bearer_token(request) or basic_password(request)
    if presented is None:
        return Refusal(
            401,
            "API key needed",
            "This server asks for an API key with the read scope: give it as the"
            " password (any user name), or send 'Authorization: Bearer KEY'.",
        )
    key = ring.find(presented)
    if key is None:
        return Refusal(401, "Not a valid API key", "This API key is not valid.")
    request.scope[KEY_ID_KEY] = key.key_id
    if SCOPE not in key.allows:
        return Refusal(
            403,
            "Not allowed",
            f"This API key does not have the {SCOPE!r} scope the dashboard needs.",
        )
    return None
