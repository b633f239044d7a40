"""The endpoints. Each parses, calls one service method, and shapes the answer."""

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request, Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator
from starlette.convertors import Convertor, register_url_convertor

from oo_serving.api.schemas import (
    USER_ID_CONSTRAINTS,
    CandidateFeatures,
    ErrorResponse,
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
from oo_serving.core.features import TaskFeatures
from oo_serving.service import Candidate, Service


class _StrictJSONRequest(Request):
    """Parses bodies with orjson: faster, and NaN, Infinity and 1e400 are refused."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler


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


register_url_convertor("whole", _WholeSegmentConvertor())

PathUserId = Annotated[str, Path(**USER_ID_CONSTRAINTS), AfterValidator(refuse_dot_segments)]

ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "A field is invalid; `loc` names it."},
    503: {"model": ErrorResponse, "description": "The database is unavailable; retry."},
}


def _task_features(f: CandidateFeatures, hour_of_day: int | None = None) -> TaskFeatures:
    return TaskFeatures(
        hour_of_day=f.hour_of_day if hour_of_day is None else hour_of_day,
        is_overdue=f.is_overdue,
        task_age_days=f.task_age_days,
        priority=f.priority,
    )


def build_router(service: Service, max_candidates: int) -> APIRouter:
    router = APIRouter(route_class=StrictJSONRoute)
    ScoreRequest = score_request_model(max_candidates)

    @router.get("/health", tags=["operations"])
    async def health() -> HealthResponse:
        """Liveness: the process answers. It does not touch the database."""
        return HealthResponse()

    @router.post("/score", tags=["decisions"], responses=ERRORS)
    async def score(request: ScoreRequest) -> ScoreResponse:  # type: ignore[valid-type]
        """Choose the tip to show. Every candidate is scored at `context.hour_of_day`.

        The decision is logged with its `event_id`, probability and every candidate
        offered; send the `event_id` back with the reward.
        """
        hour = request.context.hour_of_day  # type: ignore[attr-defined]
        candidates = [
            Candidate(id=c.id, features=_task_features(c.features, hour))
            for c in request.candidates  # type: ignore[attr-defined]
        ]
        result = await service.score(request.user_id, candidates)  # type: ignore[attr-defined]
        return ScoreResponse(
            tip_id=result.tip_id, score=result.score, policy=result.policy, event_id=result.event_id
        )

    @router.post(
        "/reward",
        tags=["decisions"],
        responses={
            **ERRORS,
            404: {"model": ErrorResponse, "description": "event_id is not this user's decision."},
            409: {"model": ErrorResponse, "description": "tip_id is not the tip event_id chose."},
        },
    )
    async def reward(request: RewardRequest) -> RewardResponse:
        """Learn from what the user did with a tip.

        With `event_id`: learned once on the vector that decision scored (a repeat is
        acknowledged with `learned: false`). Without: learned on the user's latest
        decision for `tip_id`, or on `features` if none is logged.
        """
        result = await service.reward(
            request.user_id,
            request.tip_id,
            request.reward,
            _task_features(request.features),
            request.event_id,
        )
        return RewardResponse(learned=result.learned, event_id=result.event_id)

    @router.post("/reset/{user_id:whole}", tags=["users"], responses=ERRORS)
    async def reset(user_id: PathUserId) -> OkResponse:
        """Forget this user's model, history and decision log (nobody else's)."""
        await service.reset(user_id)
        return OkResponse()

    @router.get("/stats/{user_id:whole}", tags=["users"], responses=ERRORS)
    async def stats(user_id: PathUserId) -> StatsResponse:
        """The user's counters and θ. An unknown user has zeros and last_updated null."""
        s = await service.stats(user_id)
        return StatsResponse(
            user_id=s.user_id,
            pulls=s.pulls,
            reward_count=s.reward_count,
            cumulative_reward=s.cumulative_reward,
            estimated_mean=s.estimated_mean,
            estimated_mean_reward=s.estimated_mean,
            theta=s.theta,
            last_updated=None if s.last_updated_ms is None else format_ts(s.last_updated_ms),
        )

    @router.get("/features/{user_id:whole}", tags=["users"], responses=ERRORS)
    async def features(user_id: PathUserId) -> FeaturesResponse:
        """The user's last decisions (100 by default), oldest first, as scored."""
        entries = await service.history(user_id)
        return FeaturesResponse(
            user_id=user_id,
            history=[
                HistoryItem(
                    ts=format_ts(e.ts_ms),
                    features=CandidateFeatures.model_validate(e.features),
                    score=e.score,
                    tip_id=e.tip_id,
                    event_id=e.event_id,
                )
                for e in entries
            ],
        )

    return router
