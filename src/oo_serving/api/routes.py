"""The endpoints FastAPI serves, and the documentation of the two it does not.

/score and /reward are served by `api/hot.py` through `api/edge.py`; their operations are
declared here all the same, so that the OpenAPI schema and /docs describe them, and their
endpoints hand the request to the same handlers should the app be driven without the edge.
"""

from contextlib import AsyncExitStack
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response
from pydantic import AfterValidator, BaseModel

from oo_serving.api.auth import Access
from oo_serving.api.export import ExportStream
from oo_serving.api.hot import Answer, HotRoutes
from oo_serving.api.openapi import json_body
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
)
from oo_serving.api.unknown_fields import HEADER as UNKNOWN_FIELDS_HEADER
from oo_serving.metrics import CONTENT_TYPE, Metrics
from oo_serving.service import Service

PathUserId = Annotated[str, Path(**USER_ID_CONSTRAINTS), AfterValidator(refuse_dot_segments)]

ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "A field is invalid; `loc` names it."},
    503: {"model": ErrorResponse, "description": "The database is unavailable; retry."},
}
# Every request but GET, HEAD and OPTIONS has its body limited (api/edge.py), whatever its route
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


def _response(answer: Answer) -> Response:
    response = Response(answer.body, answer.status, media_type="application/json")
    for name, value in answer.headers:
        response.headers[name.decode()] = value.decode()
    return response


def build_router(
    service: Service, hot: HotRoutes, access: Access, metrics: Metrics
) -> tuple[APIRouter, list[type[BaseModel]]]:
    """The endpoints, and the request models to add to the OpenAPI schema."""
    router = APIRouter()
    ScoreRequest = hot.bodies.score_model

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
        return _response(await hot.score(await request.body(), request.scope))

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
        return _response(await hot.reward(await request.body(), request.scope))

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
