"""Request and response bodies, one pair per endpoint, every constraint stated.

Field names and defaults are the prototype's wire contract; the constraints are new and
appear in the OpenAPI schema so that a client can read every limit there.

Request bodies take JSON types as they are, unlike the prototype, which coerced: a number
must be a JSON number (an integer one with no fractional part, `9` or `9.0`), a boolean
`true` or `false`, a string a JSON string. `"9"`, `"yes"` or `true` for a number are
refused with 422, so a client's type bug is seen instead of learned. Fields a request model
does not know are kept aside (`extra="allow"`), not refused: the routes count them and name
them in the answer (see `api/unknown_fields.py`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

USER_ID_PATTERN = r"^[A-Za-z0-9\-._~:@+=]+$"
USER_ID_MAX_LENGTH = 256
TIP_ID_MAX_LENGTH = 256
TEXT_MAX_LENGTH = 16_384
# No NUL in any string the service stores or compares: PostgreSQL's text cannot hold one,
# so SQLite would accept what PostgreSQL fails on. Refused by validation on every backend,
# and stated in the schema.
NO_NUL_PATTERN = r"^[^\x00]*$"

USER_ID_DESCRIPTION = (
    "1–256 characters from A–Z a–z 0–9 - . _ ~ : @ + =, and not `.` or `..`,"
    " so that every id can be written in a URL path as it is."
)


DOT_SEGMENTS = (".", "..")


def refuse_dot_segments(user_id: str) -> str:
    """`.` and `..` match the pattern but cannot be sent in a URL path: refuse them."""
    if user_id in DOT_SEGMENTS:
        raise ValueError("user_id cannot be '.' or '..': they are not addressable in a URL path")
    return user_id


# The same constraints for a user_id in a body (Field) and in a path (fastapi.Path).
USER_ID_CONSTRAINTS: dict[str, Any] = {
    "min_length": 1,
    "max_length": USER_ID_MAX_LENGTH,
    "pattern": USER_ID_PATTERN,
    "description": USER_ID_DESCRIPTION,
    "examples": ["user-42"],
    # What `refuse_dot_segments` refuses, stated in the schema: the pattern alone allows it.
    "json_schema_extra": {"not": {"enum": list(DOT_SEGMENTS)}},
}
UserId = Annotated[str, Field(**USER_ID_CONSTRAINTS), AfterValidator(refuse_dot_segments)]
TipId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=TIP_ID_MAX_LENGTH,
        pattern=NO_NUL_PATTERN,
        description="The tip's id, 1–256 characters, no NUL (U+0000).",
    ),
]
# Beyond 2**53 a double no longer holds every integer, so JSON parsers disagree on them.
INTEGRAL_FLOAT_LIMIT = 2.0**53


class JsonInteger:
    """Metadata for an `int` field: a JSON integer, written `9` or `9.0`, and nothing else.

    JSON has one number type, and JSON Schema's `integer` is any number with no fractional
    part, so `9.0` (as many serialisers write a float) is accepted as 9; `9.5`, `"9"`,
    `true` and `null` are refused. Done in pydantic-core, with no Python call per value:
    a strict gate (a JSON integer, else a JSON number within ±2**53) then the field's own
    int validation, lax only there so that it turns an integral float into an int. The
    schema stays the field's own: `integer` with its bounds.

    Put it after the field's `Field(...)`, whose constraints it keeps.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        field = handler(source)
        gate = core_schema.union_schema(
            [
                core_schema.int_schema(strict=True),
                core_schema.float_schema(
                    strict=True, ge=-INTEGRAL_FLOAT_LIMIT, le=INTEGRAL_FLOAT_LIMIT
                ),
            ],
            mode="left_to_right",
            custom_error_type="int_type",  # one error, "Input should be a valid integer"
        )
        return core_schema.chain_schema([gate, {**field, "strict": False}])

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        assert schema["type"] == "chain"
        return handler(schema["steps"][1])


HourOfDay = Annotated[int, Field(ge=0, le=23, description="Hour of the day, 0–23."), JsonInteger()]
Priority = Annotated[
    int, Field(ge=1, le=4, description="Todoist priority, 1 (lowest) to 4."), JsonInteger()
]
TaskAgeDays = Annotated[
    float,
    Field(
        ge=0.0,
        allow_inf_nan=False,
        description="Days since the due date, finite and ≥ 0; values over 30 count as 30.",
    ),
]
Reward = Annotated[
    float,
    Field(
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="+1 done, +0.5 helpful, 0 snoozed, −0.5 not helpful, −1 dismissed;"
        " any finite value in [−1, 1].",
    ),
]
EventId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=NO_NUL_PATTERN,
        description="The event_id a /score returned for the decision being rewarded.",
    ),
]

TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_ts(ms: int) -> str:
    """Unix milliseconds as the prototype's UTC timestamp, e.g. 2026-11-27T12:00:00Z."""
    return time.strftime(TS_FORMAT, time.gmtime(ms / 1000))


def format_ts_ms(ms: int) -> str:
    """Unix milliseconds as a UTC timestamp to the millisecond: 2026-11-27T12:00:00.123Z."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ms // 1000))}.{ms % 1000:03d}Z"


# Shared by every request model. `strict`: JSON types as they are, no coercion. `extra`:
# unknown fields are accepted, as the prototype accepted them, and kept in
# `__pydantic_extra__` for the route to name (never used otherwise).
BODY_CONFIG = ConfigDict(extra="allow", strict=True)


class _Body(BaseModel):
    """A request body: strict JSON types; unknown fields accepted and kept aside."""

    model_config = BODY_CONFIG


class CandidateFeatures(_Body):
    hour_of_day: HourOfDay = 12
    is_overdue: bool = False
    task_age_days: TaskAgeDays = 0.0
    priority: Priority = 1


class Candidate(_Body):
    id: TipId
    content: Annotated[str, Field(max_length=TEXT_MAX_LENGTH, pattern=NO_NUL_PATTERN)]
    source: Annotated[str, Field(max_length=TIP_ID_MAX_LENGTH, pattern=NO_NUL_PATTERN)]
    source_id: Annotated[
        str | None, Field(max_length=TIP_ID_MAX_LENGTH, pattern=NO_NUL_PATTERN)
    ] = None
    features: CandidateFeatures = Field(default_factory=CandidateFeatures)


class Context(_Body):
    hour_of_day: Annotated[
        int,
        Field(ge=0, le=23, description="Hour of the day, 0–23; every candidate is scored at it."),
        JsonInteger(),
    ] = 12
    day_of_week: Annotated[int, Field(ge=0, le=6, description="0–6."), JsonInteger()] = 0


class ScoreRequestBase(_Body):
    """The /score body; `candidates` is added by `score_request_model` with its limit."""

    user_id: UserId
    context: Context = Field(default_factory=Context)
    explain: bool = Field(
        False,
        description="Add the chosen candidate's score split by feature, and its exploration"
        " bonus, to the answer.",
    )

    model_config = ConfigDict(
        **BODY_CONFIG,
        json_schema_extra={
            "examples": [
                {
                    "user_id": "user-42",
                    "candidates": [
                        {
                            "id": "task-1",
                            "content": "Renew passport",
                            "source": "todoist",
                            "features": {"is_overdue": True, "task_age_days": 3, "priority": 4},
                        },
                        {"id": "task-2", "content": "Water the plants", "source": "todoist"},
                    ],
                    "context": {"hour_of_day": 9, "day_of_week": 1},
                }
            ]
        },
    )


def _unique_ids(candidates: list[Candidate]) -> list[Candidate]:
    seen: dict[str, int] = {}
    for index, candidate in enumerate(candidates):
        if candidate.id in seen:
            raise ValueError(
                f"candidate ids must be unique: {candidate.id!r} is at index"
                f" {seen[candidate.id]} and {index}"
            )
        seen[candidate.id] = index
    return candidates


def score_request_model(max_candidates: int) -> type[ScoreRequestBase]:
    """The /score request body with `max_candidates` stated in its schema."""
    candidates: Any = Annotated[
        list[Candidate],
        Field(
            min_length=1,
            max_length=max_candidates,
            description=f"1–{max_candidates} tips with unique ids.",
        ),
    ]
    return create_model(
        "ScoreRequest",
        __base__=ScoreRequestBase,
        __validators__={"unique_candidate_ids": field_validator("candidates")(_unique_ids)},
        candidates=(candidates, ...),
    )


class Explanation(BaseModel):
    contributions: dict[str, float] = Field(
        description="Per feature name, θᵢ·xᵢ: the estimated reward, split by feature."
    )
    exploration_bonus: float = Field(description="α·sqrt(xᵀA⁻¹x): the part that explores.")


class ScoreResponse(BaseModel):
    tip_id: str = Field(description="The chosen candidate's id.")
    score: float = Field(
        description="Its upper confidence bound θ·x + α·sqrt(xᵀA⁻¹x): the sum of the"
        " contributions and the exploration bonus."
    )
    policy: str = Field(
        description="The policy that decided: linucb-v1 or linucb-v2.", examples=["linucb-v1"]
    )
    event_id: str = Field(description="This decision's id; send it back with the reward.")
    propensity: float = Field(
        description="The probability with which this tip was to be shown (1.0 without"
        " exploration, OO_EXPLORATION), as logged with the decision.",
        examples=[1.0],
    )
    explanation: Explanation | None = Field(
        None, description='Present only when the request asked for it ("explain": true).'
    )


# Put by RewardRequest in place of a field the body must send and did not.
_REQUIRED: Any = object()


def _optional_not_null(null_type: str, null_message: str) -> BeforeValidator:
    """For a field that may be left out but not sent as null (refused as pydantic refuses
    a null for its type), and that is required after all where `_REQUIRED` stands in it."""

    def check(value: Any) -> Any:
        if value is _REQUIRED:
            raise PydanticCustomError("missing", "Field required")
        if value is None:
            raise PydanticCustomError(null_type, null_message)
        return value

    return BeforeValidator(check)


def _not_null(schema: dict[str, Any]) -> None:
    """A field's schema without its null branch and `"default": null`: it may be left
    out, but null is refused. (The type stays `X | None`, which pydantic validates as a
    nullable X and whose errors it names by the field alone, not by union member.)"""
    schema.pop("default", None)
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        for key, value in branches[0].items():
            schema.setdefault(key, value)
    elif branches:
        schema["anyOf"] = branches


# The decision an event_id names holds the tip it chose and the vector it scored, so a
# client that sends the event_id need not repeat either. The schema says so with an
# `anyOf` over the required fields; the check puts `_REQUIRED` in place of each one
# missing, so that it is refused as missing along with the body's other errors.
class RewardRequest(_Body):
    """With `event_id`, `tip_id` and `features` may be left out; without, both are required."""

    user_id: UserId
    tip_id: Annotated[
        TipId | None,
        _optional_not_null("string_type", "Input should be a valid string"),
        Field(
            description="The tip shown, 1–256 characters, no NUL (U+0000). Required without"
            " event_id. With event_id it may be left out; if sent, it must be the tip that"
            " decision chose (else 409).",
            json_schema_extra=_not_null,
        ),
    ] = None
    reward: Reward
    features: Annotated[
        CandidateFeatures | None,
        _optional_not_null(
            "model_type", "Input should be a valid dictionary or instance of CandidateFeatures"
        ),
        Field(
            description="The shown tip's features. Required without event_id, and learned on"
            " only if no decision for tip_id is logged. With event_id they may be left out;"
            " if sent, they are validated but not used (the decision's vector is).",
            json_schema_extra=_not_null,
        ),
    ] = None
    event_id: EventId | None = None

    @model_validator(mode="before")
    @classmethod
    def _tip_and_features_without_event_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("event_id") is None:
            return {"tip_id": _REQUIRED, "features": _REQUIRED, **data}
        return data

    model_config = ConfigDict(
        **BODY_CONFIG,
        json_schema_extra={
            "anyOf": [
                # event_id sent, and not null
                {"required": ["event_id"], "properties": {"event_id": {"type": "string"}}},
                {"required": ["tip_id", "features"]},
            ],
            "examples": [
                {
                    "user_id": "user-42",
                    "tip_id": "task-1",
                    "reward": 1.0,
                    "features": {
                        "hour_of_day": 9,
                        "is_overdue": True,
                        "task_age_days": 3,
                        "priority": 4,
                    },
                    "event_id": "019a1f2e-8c3b-7d4e-9f00-0123456789ab",
                },
                {
                    "user_id": "user-42",
                    "reward": 1.0,
                    "event_id": "019a1f2e-8c3b-7d4e-9f00-0123456789ab",
                },
            ],
        },
    )


class RewardResponse(BaseModel):
    ok: bool = True
    learned: bool = Field(
        description="Whether the model changed: false for a repeat that changes nothing"
        " under OO_REWARD_AGGREGATION, and for a late reward."
    )
    event_id: str | None = Field(
        description="The decision the reward was joined to; null when no logged decision"
        " matched and the request's features were used."
    )
    kept: float | None = Field(
        None,
        description="The reward the decision keeps under OO_REWARD_AGGREGATION (for"
        " `first`, the first one sent); with no decision, the reward learned.",
    )
    late: bool = Field(
        False,
        description="The decision is older than the reward window (OO_REWARD_WAIT): the"
        " reward was stored, not learned.",
    )
    received: float = Field(
        description="The reward this request sent. Compare with `kept`: under"
        " OO_REWARD_AGGREGATION=first a repeat's value is not the one kept.",
    )
    repeat: bool = Field(
        False,
        description="The decision had a reward already: this one was combined with it under"
        " `aggregation`, and `kept` is the result.",
    )
    reward_n: int | None = Field(
        None,
        description="How many rewards the decision has received, this one included (1 for"
        " the first); null when no decision holds the reward (learned on the request's"
        " features, or, without event_id, as a new observation of an already rewarded"
        " decision).",
    )
    aggregation: str | None = Field(
        None,
        description="For a repeat, the rule that chose `kept`: first, latest, sum or max"
        " (OO_REWARD_AGGREGATION); null otherwise. After the reward window a learned"
        " reward's `kept` no longer changes, whatever the rule (`late`).",
        examples=["first"],
    )


class OkResponse(BaseModel):
    ok: bool = True


class StatsResponse(BaseModel):
    user_id: str
    pulls: int = Field(description="Decisions made for this user.")
    reward_count: int = Field(description="Rewards learned.")
    cumulative_reward: float
    estimated_mean: float = Field(description="cumulative_reward / reward_count, or 0.")
    estimated_mean_reward: float = Field(description="The same value as estimated_mean.")
    policy: str = Field(
        description="The policy that learned this model (for an unknown user: the one that"
        " would serve it)."
    )
    feature_names: list[str] = Field(description="The names of theta's entries, in order.")
    theta: list[float] = Field(
        description="The policy's estimated weights, one per feature (linucb-v1: θ = A⁻¹b, d = 5)."
    )
    last_updated: str | None = Field(
        description="UTC, e.g. 2026-11-27T12:00:00Z; null if unknown user."
    )


class HistoryItem(BaseModel):
    ts: str
    features: CandidateFeatures
    score: float
    tip_id: str
    event_id: str


class FeaturesResponse(BaseModel):
    user_id: str
    history: list[HistoryItem] = Field(description="The last decisions, oldest first.")


class HealthResponse(BaseModel):
    ok: bool = True


class DeletedResponse(BaseModel):
    ok: bool = True
    deleted: bool = Field(description="False when nothing was stored about this user.")


class ExportedModel(BaseModel):
    policy: str = Field(description="The policy that learned it, e.g. linucb-v1.")
    pulls: int
    reward_count: int
    cumulative_reward: float
    feature_names: list[str] = Field(description="The names of theta's entries, in order.")
    theta: list[float] = Field(description="The policy's estimated weights.")
    state_version: int = Field(description="The format of `state`, per policy.")
    state: dict[str, list[Any]] = Field(
        description="The policy's stored state as named arrays, e.g. linucb-v1: A_inv (d × d,"
        " row by row) and b; linucb-v2: D (the discounted Σ x xᵀ) and b."
    )
    last_updated: str = Field(description="UTC, to the millisecond.")


class ExportedCandidate(BaseModel):
    id: str
    x: list[float] = Field(description="The feature vector it was scored on.")
    features: CandidateFeatures | None = Field(
        description="Its raw features as scored; null for decisions logged before they were kept."
    )
    probability: float = Field(
        description="The probability it was to be shown (exploration included); for"
        " decisions logged before probabilities were kept, 1 for the chosen tip, 0 else."
    )


class ExportedDecision(BaseModel):
    event_id: str
    seq: int = Field(description="The user's pull number that made this decision.")
    ts: str = Field(description="When it was made, UTC, to the millisecond.")
    tip_id: str
    features: CandidateFeatures = Field(description="The chosen tip's features, as scored.")
    x: list[float] = Field(description="The chosen tip's feature vector.")
    score: float
    policy: str
    propensity: float = Field(
        description="Probability the chosen tip was to be shown (its candidate's probability)."
    )
    greedy: int | None = Field(
        description="Index in candidates of the policy's own choice, before exploration;"
        " null for decisions logged before it was kept."
    )
    shadow: dict[str, int] = Field(
        description="Each shadow policy's choice on this request, as an index in candidates."
    )
    model_version: int = Field(description="The user's reward_count when it was made.")
    context: dict[str, int] = Field(description="The request's context, as scored.")
    candidates: list[ExportedCandidate] = Field(description="Every tip offered, in order.")
    reward: float | None = Field(
        description="The reward it keeps under OO_REWARD_AGGREGATION, if any."
    )
    rewarded_at: str | None = Field(description="When its first reward arrived.")
    reward_n: int = Field(description="How many rewards arrived for it.")
    learned: bool = Field(
        description="Whether the model holds the reward (false: it came after the window)."
    )
    reward_source: str | None = Field(
        description="client, or default (OO_DEFAULT_REWARD given by the sweep)."
    )


class ExportResponse(BaseModel):
    user_id: str
    exported_at: str = Field(description="UTC, to the millisecond.")
    model: ExportedModel | None = Field(description="null when no model is stored.")
    decisions: list[ExportedDecision] = Field(
        description="Every decision kept in the log, oldest first."
    )


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "reward"].')
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem]
