"""`GET /users/{user_id}/export`, streamed: bounded memory whatever the retention.

The answer is the JSON object that `ExportResponse` describes, written as it is read: the
head (user id, time, model), then the decisions one page of the store's snapshot at a
time, then the closing brackets. At most one page of decisions is in memory. The status
(200) is sent before the first page is read, so a database failure in the middle cuts the
answer short: the body is then not valid JSON, which a client must treat as a failure.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from oo_serving.api.schemas import CandidateFeatures, Context, format_ts_ms
from oo_serving.service import Service, now_ms
from oo_serving.store.base import DecisionRecord, UserExport, UserRecord


def model_json(service: Service, user: UserRecord | None) -> dict[str, Any] | None:
    """The stored model as `ExportedModel` states it; a policy this release does not know,
    or a state that does not decode, is exported with empty theta and state."""
    if user is None:
        return None
    policy, decoded, theta = service.stored_model(user)
    state: dict[str, Any] = {}
    if policy is not None and decoded is not None:
        state = {name: a.tolist() for name, a in policy.arrays(decoded).items()}
    return {
        "policy": user.policy,
        "pulls": user.pulls,
        "reward_count": user.reward_count,
        "cumulative_reward": user.cumulative_reward,
        "feature_names": list(policy.feature_names) if policy is not None else [],
        "theta": theta.tolist() if theta is not None else [],
        "state_version": user.state_version,
        "state": state,
        "last_updated": format_ts_ms(user.last_updated_ms),
    }


def decision_json(d: DecisionRecord) -> dict[str, Any]:
    """One decision as `ExportedDecision` states it (the same keys, in the same order)."""
    return {
        "event_id": d.event_id,
        "seq": d.seq,
        "ts": format_ts_ms(d.ts_ms),
        "tip_id": d.tip_id,
        "features": _in_schema_order(d.features),
        "x": d.x.tolist(),
        "score": d.score,
        "policy": d.policy,
        "propensity": d.propensity,
        "greedy": d.greedy,
        "shadow": dict(sorted(d.shadow.items())),
        "model_version": d.model_version,
        "context": _context_in_order(d.context),
        "candidates": [
            {"id": c, "x": x, "features": raw, "probability": p}
            for c, x, raw, p in zip(
                d.candidate_ids,
                d.candidate_X.tolist(),
                _raw_features(d),
                _probabilities(d),
                strict=True,
            )
        ],
        "reward": d.reward,
        "rewarded_at": None if d.rewarded_ms is None else format_ts_ms(d.rewarded_ms),
        "reward_n": d.reward_n,
        "learned": d.learned,
        "reward_source": d.reward_source,
    }


def _probabilities(d: DecisionRecord) -> list[float]:
    """Each candidate's logged probability; for a decision logged before they were kept
    (deterministic), 1 for the chosen tip and 0 for the others."""
    if d.candidate_p is not None:
        return [float(p) for p in d.candidate_p]
    return [1.0 if c == d.tip_id else 0.0 for c in d.candidate_ids]


def _context_in_order(context: dict[str, Any]) -> dict[str, Any]:
    """The context in the schema's order (PostgreSQL's jsonb sorts keys), so that both
    backends answer the same bytes."""
    return {name: context[name] for name in CONTEXT_ORDER if name in context} | context


def _raw_features(d: DecisionRecord) -> list[dict[str, Any] | None]:
    """Each candidate's raw features (columns base.RAW_FEATURES) as the schema names them,
    or None for each when the decision was logged before they were kept."""
    if d.candidate_features is None:
        return [None] * len(d.candidate_ids)
    return [
        {
            "hour_of_day": int(row[0]),
            "is_overdue": bool(row[1]),
            "task_age_days": float(row[2]),
            "priority": int(row[3]),
        }
        for row in d.candidate_features
    ]


def _in_schema_order(features: dict[str, Any]) -> dict[str, Any]:
    """The stored features in the order the schema lists them, whatever order the database
    kept (PostgreSQL's jsonb sorts keys), so that both backends answer the same bytes."""
    return {name: features[name] for name in FEATURE_ORDER if name in features}


FEATURE_ORDER = tuple(CandidateFeatures.model_fields)
CONTEXT_ORDER = tuple(Context.model_fields)


class ExportStream(Response):
    """Streams an export whose snapshot is already open; closes it when done, whether the
    answer was sent whole, cut by a failure, or abandoned by the client."""

    media_type = "application/json"

    def __init__(
        self, user_id: str, export: UserExport, snapshot: AsyncExitStack, service: Service
    ) -> None:
        # No Content-Length: the length is known only at the end (chunked encoding).
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"application/json")]
        self._user_id = user_id
        self._export = export
        self._snapshot = snapshot
        self._service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            head = orjson.dumps(
                {
                    "user_id": self._user_id,
                    "exported_at": format_ts_ms(now_ms()),
                    "model": model_json(self._service, self._export.user),
                }
            )
            await _more(send, head[:-1] + b',"decisions":[')
            separator = b""
            async for page in self._export.pages:
                chunk = b",".join(orjson.dumps(decision_json(d)) for d in page)
                await _more(send, separator + chunk)
                separator = b","
            await send({"type": "http.response.body", "body": b"]}", "more_body": False})
        finally:
            await self._snapshot.aclose()


async def _more(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})
