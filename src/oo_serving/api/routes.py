"""The endpoints. Each parses, calls one service method, and shapes the answer."""

from contextlib import AsyncExitStack
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import AfterValidator, BaseModel, ValidationError
from starlette.convertors import Convertor, register_url_convertor

from oo_serving.api.auth import Access
from oo_serving.api.export import ExportStream
from oo_serving.api.observe import USER_ID_KEY
from oo_serving.api.schemas import (
    USER_ID_CONSTRAINTS,
    CandidateFeatures,
    DeletedResponse,
    ErrorResponse,
    ExportResponse,
    FeaturesResponse,
    HealthResponse,
    HistoryItem,
    OkResponse,
    RewardRequest,
    RewardResponse,
    ScoreResponse,
    StatsResponse,
    format_ts,
    refuse_dot_segments,
    score_request_model,
)
from oo_serving.api.unknown_fields import HEADER as UNKNOWN_FIELDS_HEADER
from oo_serving.api.unknown_fields import UnknownFields
from oo_serving.core.features import TaskFeatures
from oo_serving.metrics import CONTENT_TYPE, Metrics
from oo_serving.service import Candidate, Service


class _WholeSegmentConvertor(Convertor[str]):
    """Like `path`, but the match cannot stop short of a trailing newline.

    Starlette anchors route patterns with `$`, which also matches before a final "\n";
    with `.*` an id of "u\n" would reach the handler as "u". Matching everything lets
    the user_id pattern see, and refuse, the whole id.
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _WholeButExportConvertor(_WholeSegmentConvertor):
    """`whole`, except a path that ends in /export, which is another resource.

    Without it `DELETE /users/u/export` would reach the delete route with the id
    "u/export" and answer 422, instead of 405 for a method the export does not have.
    No valid id holds a "/", so this refuses no id that could be deleted.

    The test is a lookahead from the start of the value, not a lookbehind at its end: a
    lookbehind sees past the value into the route's "/users" prefix, so the id "export"
    itself (path "/users/export") could not be deleted. `\\Z`, not `$`: only a value that
    ends in "/export", not one followed by a newline.
    """

    regex = r"(?s:(?!.*/export\Z).*)"


register_url_convertor("whole", _WholeSegmentConvertor())
register_url_convertor("whole_but_export", _WholeButExportConvertor())

PathUserId = Annotated[str, Path(**USER_ID_CONSTRAINTS), AfterValidator(refuse_dot_segments)]

ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "A field is invalid; `loc` names it."},
    503: {"model": ErrorResponse, "description": "The database is unavailable; retry."},
}
# Every request but GET, HEAD and OPTIONS passes BodyLimitMiddleware, whatever its route
# takes as a body.
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    413: {"model": ErrorResponse, "description": "The body is larger than OO_MAX_BODY_BYTES."},
}


# A 200 of /score and /reward may name the body's unknown fields.
ACCEPTED_WITH_UNKNOWN_FIELDS: dict[str, Any] = {
    "headers": {
        UNKNOWN_FIELDS_HEADER: {
            "description": "Present when the body held fields the API does not know (they"
            " were ignored): their dotted paths, e.g. `candidates[].featrues, extra`, at most"
            " 10, each key percent-encoded outside A-Z a-z 0-9 _ - ~, a final `...` when"
            " there were more.",
            "schema": {"type": "string"},
        }
    }
}


def _task_features(f: CandidateFeatures) -> TaskFeatures:
    return TaskFeatures(f.hour_of_day, f.is_overdue, f.task_age_days, f.priority)


# The endpoints with a body, /score and /reward, skip FastAPI's body handling and response
# validation: `parse_body` parses and validates, and orjson writes the answer. The OpenAPI
# schema still states every constraint: `json_body` declares the model in the operation,
# and `install_body_schemas` adds its schema to the components.
M = TypeVar("M", bound=BaseModel)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra that declares `model` as the JSON request body."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body as `model`; a 422 naming each bad field otherwise.

    orjson parses (it refuses NaN, Infinity and numbers that overflow a double, anywhere
    in the body), then pydantic validates: measured faster than either alone.
    """
    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "ctx": {"error": exc.msg}}]) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [_body_error(e) for e in exc.errors(include_url=False)]
        ) from exc


# The errors of a value of the wrong JSON type: their message says which type came.
_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type", "string_type"})


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _body_error(error: Any) -> dict[str, Any]:
    """A pydantic error as the API reports it: located in the body, its input left out,
    and, for a value of the wrong type, the JSON type that came instead."""
    value = error.pop("input", None)
    if error["type"] in _TYPE_ERRORS:
        got = _json_type(value)
        if error["type"] == "int_type" and got == "a number":
            got = "a number too large to be an exact integer"  # beyond ±2**53
        error["msg"] = f"{error['msg']}, got {got}"
    error["loc"] = ("body", *error["loc"])
    return dict(error)


def json_response(content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def name_unknown_fields(response: Response, unknown: UnknownFields) -> Response:
    if unknown:
        response.headers[UNKNOWN_FIELDS_HEADER] = unknown.header()
    return response


def install_body_schemas(
    app: FastAPI, models: list[type[BaseModel]], security_schemes: dict[str, Any]
) -> None:
    """Add the models that `json_body` declared, and the security schemes that routes name
    in their openapi_extra, to the app's OpenAPI components.

    Their nested models go in under `<name>-Input`, apart from FastAPI's own schemas of the
    same models as responses, where fields with defaults are shown as always present.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}-Input")
            for name, definition in body.pop("$defs", {}).items():
                components[f"{name}-Input"] = definition
            components[model.__name__] = body
        if security_schemes:
            schema["components"]["securitySchemes"] = security_schemes
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_router(
    service: Service, max_candidates: int, access: Access, metrics: Metrics
) -> tuple[APIRouter, list[type[BaseModel]]]:
    """The endpoints, and the request models to add to the OpenAPI schema."""
    router = APIRouter()
    ScoreRequest = score_request_model(max_candidates)

    @router.get("/health", tags=["operations"])
    async def health() -> HealthResponse:
        """Liveness: the process answers. It does not touch the database."""
        return HealthResponse()

    @router.get("/ready", tags=["operations"], responses={503: ERRORS[503]})
    async def ready() -> HealthResponse:
        """Readiness: the database answers reads, and a write could start now (SQLite: the
        writer runs and gets the write lock within the deadline; PostgreSQL: not a
        read-only standby). 503 while it cannot."""
        await service.ping()
        return HealthResponse()

    @router.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        **access.route(
            "metrics",
            {200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."}},
        ),
    )
    async def metrics_endpoint() -> Response:
        """Every metric in Prometheus' text format, added up over all workers."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @router.post(
        "/score",
        tags=["decisions"],
        response_model=ScoreResponse,
        **access.route(
            "decide", {200: ACCEPTED_WITH_UNKNOWN_FIELDS, **BODY_ERRORS}, json_body(ScoreRequest)
        ),
    )
    async def score(request: Request) -> Response:
        """Choose the tip to show. Every candidate is scored at `context.hour_of_day`.

        The decision is logged with its `event_id`, probability and every candidate
        offered; send the `event_id` back with the reward.

        Fields the API does not know are ignored, and named in `X-Unknown-Fields`.
        """
        body = await parse_body(request, ScoreRequest)
        request.scope[USER_ID_KEY] = body.user_id
        unknown = UnknownFields()
        unknown.add("", body.__pydantic_extra__)
        unknown.add("context.", body.context.__pydantic_extra__)
        hour = body.context.hour_of_day
        candidates = []
        for c in body.candidates:  # type: ignore[attr-defined]
            f = c.features
            # The one walk over the candidates: their unknown fields are looked at here.
            if c.__pydantic_extra__ or f.__pydantic_extra__:
                unknown.add("candidates[].", c.__pydantic_extra__)
                unknown.add("candidates[].features.", f.__pydantic_extra__)
            candidates.append(
                Candidate(c.id, TaskFeatures(hour, f.is_overdue, f.task_age_days, f.priority))
            )
        if unknown:
            metrics.unknown_fields("/score")
        context = {"hour_of_day": hour, "day_of_week": body.context.day_of_week}
        result = await service.score(
            body.user_id,
            candidates,
            context,
            explain=body.explain,
        )
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
        return name_unknown_fields(json_response(answer), unknown)

    @router.post(
        "/reward",
        tags=["decisions"],
        response_model=RewardResponse,
        **access.route(
            "decide",
            {
                200: ACCEPTED_WITH_UNKNOWN_FIELDS,
                **BODY_ERRORS,
                404: {
                    "model": ErrorResponse,
                    "description": "event_id is not this user's decision.",
                },
                409: {
                    "model": ErrorResponse,
                    "description": "tip_id is not the tip event_id chose.",
                },
            },
            json_body(RewardRequest),
        ),
    )
    async def reward(request: Request) -> Response:
        """Learn from what the user did with a tip.

        With `event_id`: learned on the vector that decision scored; `tip_id` and
        `features` may be left out. Without: `tip_id` and `features` are required, and
        the reward is learned on the user's latest decision for `tip_id`, or on
        `features` if none is logged.

        A reward later than the reward window (OO_REWARD_WAIT) after its decision is
        stored, not learned (`late: true`). Several rewards for one decision are kept by
        OO_REWARD_AGGREGATION: a repeat answers `repeat: true`, how many rewards the
        decision has had (`reward_n`), the rule (`aggregation`) and the value it keeps
        (`kept`), which may differ from the one sent (`received`); `learned` says whether
        the model changed.

        Fields the API does not know are ignored, and named in `X-Unknown-Fields`.
        """
        body = await parse_body(request, RewardRequest)
        request.scope[USER_ID_KEY] = body.user_id
        unknown = UnknownFields()
        unknown.add("", body.__pydantic_extra__)
        if body.features is not None:
            unknown.add("features.", body.features.__pydantic_extra__)
        if unknown:
            metrics.unknown_fields("/reward")
        result = await service.reward(
            body.user_id,
            body.tip_id,
            body.reward,
            None if body.features is None else _task_features(body.features),
            body.event_id,
        )
        if body.event_id is not None:
            join = "event_id"
        else:
            join = "request_features" if result.event_id is None else "latest_decision"
        metrics.reward(join, result.learned, body.reward)
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
        return name_unknown_fields(json_response(answer), unknown)

    @router.post(
        "/reset/{user_id:whole}",
        tags=["users"],
        **access.route("admin", BODY_ERRORS),
    )
    async def reset(user_id: PathUserId) -> OkResponse:
        """Forget this user's model, history and decision log (nobody else's)."""
        await service.reset(user_id)
        return OkResponse()

    @router.get(
        "/stats/{user_id:whole}",
        tags=["users"],
        **access.route("read", ERRORS),
    )
    async def stats(user_id: PathUserId) -> StatsResponse:
        """The user's counters, and the weights its policy estimates, by feature name. An
        unknown user has zero counters, last_updated null, and the weights a new user starts
        from (linucb-v2: the population's)."""
        s = await service.stats(user_id)
        return StatsResponse(
            user_id=s.user_id,
            pulls=s.pulls,
            reward_count=s.reward_count,
            cumulative_reward=s.cumulative_reward,
            estimated_mean=s.estimated_mean,
            estimated_mean_reward=s.estimated_mean,
            policy=s.policy,
            feature_names=list(s.feature_names),
            theta=s.theta,
            last_updated=None if s.last_updated_ms is None else format_ts(s.last_updated_ms),
        )

    @router.get(
        "/features/{user_id:whole}",
        tags=["users"],
        **access.route("read", ERRORS),
    )
    async def features(user_id: PathUserId) -> FeaturesResponse:
        """The user's last decisions (100 by default), oldest first, as scored."""
        entries = await service.history(user_id)
        return FeaturesResponse(
            user_id=user_id,
            history=[
                HistoryItem(
                    ts=format_ts(e.ts_ms),
                    # As logged by this service; lax, for rows of any earlier version.
                    features=CandidateFeatures.model_validate(e.features, strict=False),
                    score=e.score,
                    tip_id=e.tip_id,
                    event_id=e.event_id,
                )
                for e in entries
            ],
        )

    @router.delete(
        "/users/{user_id:whole_but_export}",
        tags=["users"],
        **access.route("admin", BODY_ERRORS),
    )
    async def delete_user(user_id: PathUserId) -> DeletedResponse:
        """Erase everything stored about this user: model, history and decision log."""
        return DeletedResponse(deleted=await service.reset(user_id))

    @router.get(
        "/users/{user_id:whole}/export",
        tags=["users"],
        response_model=ExportResponse,
        **access.route("read", ERRORS),
    )
    async def export_user(request: Request, user_id: PathUserId) -> Response:
        """Everything stored about this user, read in one snapshot: the model and every
        decision kept in the log, with the candidates offered and the rewards learned.

        Streamed a page of decisions at a time, so memory stays bounded whatever the
        retention; should the database fail mid-way the answer is cut short (not valid
        JSON). At most two exports run at once per worker; more wait, then answer 503.
        """
        if not request.scope["path"].endswith("/export"):
            # Starlette's `$` also matches before a final newline: "/users/u/export\n".
            raise HTTPException(404, "Not Found")
        snapshot = AsyncExitStack()
        export = await snapshot.enter_async_context(service.export(user_id))
        return ExportStream(user_id, export, snapshot, service)

    return router, [ScoreRequest, RewardRequest]
