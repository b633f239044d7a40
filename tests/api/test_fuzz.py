"""Fuzz every operation against the service's own OpenAPI schema (schemathesis).

A real server is asked requests generated from the /openapi.json it serves: valid ones
(positive) and ones that break a stated constraint (negative), in schemathesis' three
phases: the schema's examples, boundary values of every constraint (coverage), and random
inputs (fuzzing). Every answer must be:

- no 5xx;
- a status code the operation documents, with the documented content type, headers and
  body schema;
- for a valid request, accepted: 2xx, or a documented refusal that depends on state (404,
  409) or size (413). So the schema states every constraint the server checks;
- for a method the path does not have, 405 with an Allow header.

Generation is seeded and bounded, so a run is reproducible and takes well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from requests.adapters import BaseAdapter, HTTPAdapter
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from tests.conftest import Server

API_KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SEED = 20261127
# Random inputs per operation and mode, on top of the examples and boundary cases; raise it
# locally to search longer (1500 found nothing more than 200 in about 90 s).
MAX_EXAMPLES = 500

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    unsupported_method,
    allow_header_conformance,
    ignored_auth,  # an operation that declares a key answers 401 without one
]

CONFIG = {
    "seed": SEED,
    "generation": {
        "mode": "all",  # positive and negative
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",  # nothing replayed from, or written to, a local example database
    },
    "checks": {
        # A valid body can still be refused for what a schema cannot say: its size in bytes
        # (413), an event_id that is not logged (404) or whose tip differs (409).
        "positive_data_acceptance": {"expected-statuses": ["2xx", "404", "409", "413"]},
    },
}


class _Refuse(BaseAdapter):
    """Mounted for every URL but the server's: a request anywhere else fails the test."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the fuzz test talks only to its server on loopback: {request.url}")

    def close(self) -> None:
        pass


@pytest.fixture
def fuzz_server(server_factory: Any) -> Server:
    server: Server = server_factory(env={"OO_API_KEYS": f"{API_KEY}:admin"})
    return server


@pytest.fixture
def loopback_session(fuzz_server: Server) -> Iterator[requests.Session]:
    """A requests session that reaches the server under test and nothing else."""
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment
        session.mount("http://", _Refuse())
        session.mount("https://", _Refuse())
        # requests picks the longest matching prefix: only this one gets through.
        session.mount(f"{fuzz_server.base_url}/", HTTPAdapter())
        yield session


@pytest.fixture
def api_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    """The schema the live server serves, set up to be fuzzed."""
    assert fuzz_server.base_url.startswith("http://127.0.0.1:")
    return schemathesis.openapi.from_url(
        f"{fuzz_server.base_url}/openapi.json",
        config=schemathesis.Config.from_dict(CONFIG),
        headers=AUTH,
        timeout=10,
    )


@pytest.fixture(autouse=True)
def _legacy_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schemas read `item._nodeid`, which pytest 9.2 renamed to
    `_id`: give it back, until schemathesis follows."""
    request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_answer_conforms(
    case: schemathesis.Case, fuzz_server: Server, loopback_session: requests.Session
) -> None:
    repeats_ids = _repeats_candidate_ids(case)
    checks = CHECKS
    if repeats_ids:
        # JSON Schema cannot say "unique by id" (the schema says it in words), so a body it
        # finds valid may repeat an id; such a body must be refused.
        checks = [check for check in CHECKS if check is not positive_data_acceptance]
    response = case.call_and_validate(
        base_url=fuzz_server.base_url,
        session=loopback_session,
        headers=AUTH,
        checks=checks,
        timeout=10,
    )
    keyed = response.request.headers.get("Authorization") == AUTH["Authorization"]
    if _needs_key(case) and not keyed:
        # A negative case may drop or garble the key: the key is checked before anything.
        assert response.status_code == 401, response.text
    elif repeats_ids:
        assert response.status_code in (413, 422), response.text


def _needs_key(case: schemathesis.Case) -> bool:
    return bool(case.operation.definition.raw.get("security"))


def _repeats_candidate_ids(case: schemathesis.Case) -> bool:
    """Whether `case` is a /score body whose candidates repeat a (string) id."""
    body = case.body
    if case.operation.path != "/score" or not isinstance(body, dict):
        return False
    candidates = body.get("candidates")
    if not isinstance(candidates, list):
        return False
    ids = [c["id"] for c in candidates if isinstance(c, dict) and isinstance(c.get("id"), str)]
    return len(ids) != len(set(ids))


def test_the_session_reaches_only_the_server(
    fuzz_server: Server, loopback_session: requests.Session
) -> None:
    assert loopback_session.get(f"{fuzz_server.base_url}/health", timeout=10).status_code == 200
    elsewhere = [
        f"http://127.0.0.1:{fuzz_server.port + 1}/health",  # another port on loopback
        f"https://127.0.0.1:{fuzz_server.port}/health",
        "http://fuzz-target.invalid/health",  # .invalid never resolves: nothing leaves
    ]
    for url in elsewhere:
        with pytest.raises(AssertionError, match="only to its server"):
            loopback_session.get(url, timeout=10)
