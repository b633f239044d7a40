"""/score and /reward as plain functions of the body: the hot path.

Every request the app sends in volume is one of these two, so they skip the framework:
no request object, no routing table, no dependency solving, no response model. `api/edge.py`
hands them the body it has read whole and sends what they return. The contract is the
one FastAPI documents for them (`api/routes.py` declares both operations, so `/docs` and
the OpenAPI schema are unchanged): the same validation and error shape (`api/bodies.py`),
the same key check, the same answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

import orjson
from fastapi.exceptions import RequestValidationError

from oo_serving.api.auth import AuthError, KeyRing, authorize, refuse_scope
from oo_serving.api.bodies import Bodies
from oo_serving.api.errors import auth_answer, service_answer, validation_body
from oo_serving.api.scope_keys import KEY_ID_KEY, USER_ID_KEY
from oo_serving.api.unknown_fields import HEADER as UNKNOWN_FIELDS_HEADER
from oo_serving.api.unknown_fields import UnknownFields
from oo_serving.errors import ServiceError
from oo_serving.metrics import Metrics
from oo_serving.service import Service

_UNKNOWN_FIELDS = UNKNOWN_FIELDS_HEADER.lower().encode()


class Answer(NamedTuple):
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


Handler = Callable[[bytes, MutableMapping[str, Any]], Awaitable[Answer]]


def json_answer(
    status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> Answer:
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Answer(status, orjson.dumps(content), extra)


def _accepted(content: dict[str, Any], unknown: UnknownFields) -> Answer:
    headers = [(_UNKNOWN_FIELDS, unknown.header().encode())] if unknown else []
    return Answer(200, orjson.dumps(content), headers)


class HotRoutes:
    """The two handlers, by path, for POST."""

    def __init__(self, service: Service, bodies: Bodies, ring: KeyRing, metrics: Metrics) -> None:
        self.service = service
        self.bodies = bodies
        self.ring = ring
        self.metrics = metrics
        self.routes: dict[str, Handler] = {"/score": self.score, "/reward": self.reward}

    async def score(self, raw: bytes, scope: MutableMapping[str, Any]) -> Answer:
        try:
            self._authorize(scope)
            body = self.bodies.score(raw)
            scope[USER_ID_KEY] = body.user_id
            if body.unknown:
                self.metrics.unknown_fields("/score")
            result = await self.service.score(
                body.user_id, body.candidates, body.context, explain=body.explain
            )
        except (AuthError, RequestValidationError, ServiceError) as exc:
            return refusal(exc)
        metrics = self.metrics
        metrics.decision(result.policy, result.explored)
        for name, agreed in result.agreement.items():
            metrics.shadow(result.policy, name, agreed)
        answer: dict[str, Any] = {
            "tip_id": result.tip_id,
            "score": result.score,
            "policy": result.policy,
            "event_id": result.event_id,
            "propensity": result.propensity,
        }
        if result.explanation is not None:
            answer["explanation"] = {
                "contributions": result.explanation.contributions,
                "exploration_bonus": result.explanation.exploration_bonus,
            }
        return _accepted(answer, body.unknown)

    async def reward(self, raw: bytes, scope: MutableMapping[str, Any]) -> Answer:
        try:
            self._authorize(scope)
            body = self.bodies.reward(raw)
            scope[USER_ID_KEY] = body.user_id
            if body.unknown:
                self.metrics.unknown_fields("/reward")
            result = await self.service.reward(
                body.user_id, body.tip_id, body.reward, body.features, body.event_id
            )
        except (AuthError, RequestValidationError, ServiceError) as exc:
            return refusal(exc)
        if body.event_id is not None:
            join = "event_id"
        else:
            join = "request_features" if result.event_id is None else "latest_decision"
        self.metrics.reward(join, result.learned, body.reward)
        answer = {
            "ok": True,
            "learned": result.learned,
            "event_id": result.event_id,
            "kept": result.kept,
            "late": result.late,
            "received": body.reward,
            "repeat": result.repeat,
            "reward_n": result.reward_n,
            "aggregation": result.aggregation,
        }
        return _accepted(answer, body.unknown)

    def _authorize(self, scope: MutableMapping[str, Any]) -> None:
        if not self.ring:
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        key = authorize(self.ring, authorization)
        scope[KEY_ID_KEY] = key.key_id
        refuse_scope(key, "decide")


def refusal(exc: AuthError | RequestValidationError | ServiceError) -> Answer:
    """An error as the API answers it (`api/errors.py` decides status, body and headers)."""
    if isinstance(exc, RequestValidationError):
        return json_answer(422, validation_body(exc))
    status, content, headers = (
        auth_answer(exc) if isinstance(exc, AuthError) else service_answer(exc)
    )
    return json_answer(status, content, headers)
