"""A typed Python client for the service's HTTP API, synchronous and asynchronous.

`Client` (on `httpx.Client`) and `AsyncClient` (on `httpx.AsyncClient`) have one method
per endpoint and the same arguments. Both build their requests, parse the answers and
decide on retries in one place, `_Api`; each only sends and sleeps its own way.

Retries (up to `retries` times after the first attempt):

- a `503` is retried for every call: the server wrote nothing. It is waited out for the
  answer's `Retry-After` seconds (at most `MAX_RETRY_AFTER_S`), else for an exponential
  back-off with jitter from `backoff`;
- a connection that could not be made (nothing was sent) is retried for every call;
- a time-out, a dropped connection or a broken answer after the request may have reached
  the server is retried only for calls that are safe to repeat: every GET, `reset`,
  `delete_user`, and `reward` with an `event_id`. `score` and `reward` without
  `event_id` are then not retried: they raise `OutcomeUnknown`, since the server may
  have logged the decision or learned the reward.

Every refusal raises a `ServiceError` carrying the status, the error JSON's `detail` and
the `X-Request-ID` of the answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from oo_serving import __version__

__all__ = [
    "AsyncClient",
    "Candidate",
    "Client",
    "Conflict",
    "Decision",
    "Explanation",
    "Forbidden",
    "NotFound",
    "OutcomeUnknown",
    "RewardAck",
    "ServiceError",
    "Stats",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
]

MAX_RETRY_AFTER_S = 10.0
"""The longest wait a `Retry-After` header (or the back-off) can ask for."""

USER_AGENT = f"oo-serving-client/{__version__}"

T = TypeVar("T")
ErrorItem = dict[str, Any]


# --- exceptions -------------------------------------------------------------------------


class ServiceError(Exception):
    """The service refused a request, or could not be reached.

    `status` is the HTTP status (None when no answer came), `detail` the error JSON's
    list of `{"loc", "msg", "type"}`, `request_id` the answer's `X-Request-ID`, if any.
    """

    def __init__(
        self, status: int | None, detail: list[ErrorItem], request_id: str | None = None
    ) -> None:
        self.status = status
        self.detail = detail
        self.request_id = request_id
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        for item in self.detail:
            loc = ".".join(str(part) for part in item.get("loc", ()))
            msg = str(item.get("msg", ""))
            parts.append(f"{loc}: {msg}" if loc else msg)
        text = "; ".join(parts) or "no detail"
        head = f"HTTP {self.status}" if self.status is not None else "no answer"
        tail = f" (request {self.request_id})" if self.request_id else ""
        return f"{head}: {text}{tail}"

    def __str__(self) -> str:
        return self._message()

    @property
    def locs(self) -> list[list[str | int]]:
        """The `loc` of every item of `detail`."""
        return [list(item.get("loc", ())) for item in self.detail]


class ValidationError(ServiceError):
    """422: a field is missing, of the wrong type or out of range; 413: body too large."""


class NotFound(ServiceError):
    """404: the `event_id` is not a decision of this user."""


class Conflict(ServiceError):
    """409: the `tip_id` is not the tip the `event_id` chose."""


class Unauthorized(ServiceError):
    """401: no API key, or one the server does not know."""


class Forbidden(ServiceError):
    """403: the API key lacks the scope the endpoint needs."""


class Unavailable(ServiceError):
    """503 still after every retry, or no connection to the service after every retry."""


class OutcomeUnknown(Unavailable):
    """A call that is not safe to repeat (`score`, `reward` without `event_id`) failed
    after the request may have reached the server (a time-out or a dropped connection).

    It was not retried: the server may have logged the decision or learned the reward.
    """


_ERRORS: dict[int, type[ServiceError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: ValidationError,
    422: ValidationError,
    503: Unavailable,
}


def _error_detail(response: httpx.Response) -> list[ErrorItem]:
    """The answer's `detail` list, or one item made from whatever else it holds."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), list):
        items = [item for item in body["detail"] if isinstance(item, dict)]
        if items:
            return items
    text = response.text.strip()[:200] or response.reason_phrase
    return [{"loc": [], "msg": text, "type": f"http_{response.status_code}"}]


def error_from(response: httpx.Response) -> ServiceError:
    """The exception for an error answer, of the class its status maps to."""
    cls = _ERRORS.get(response.status_code, ServiceError)
    return cls(response.status_code, _error_detail(response), response.headers.get("x-request-id"))


# --- request and answer types ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A tip offered to `score`. `features` default on the server to hour 12, not
    overdue, age 0, priority 1 (`hour_of_day`, `is_overdue`, `task_age_days`, `priority`).
    """

    id: str
    content: str
    source: str
    features: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The candidate as the request body holds it."""
        body: dict[str, Any] = {"id": self.id, "content": self.content, "source": self.source}
        if self.features is not None:
            body["features"] = dict(self.features)
        return body


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a tip was chosen: its score split by feature, and its exploration bonus."""

    contributions: Mapping[str, float]
    exploration_bonus: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Explanation:
        """From the answer's `explanation` object; unknown fields are ignored."""
        return cls(
            contributions={str(k): float(v) for k, v in data["contributions"].items()},
            exploration_bonus=float(data["exploration_bonus"]),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of `POST /score`: the tip to show, and the `event_id` to reward."""

    tip_id: str
    score: float
    policy: str
    event_id: str
    propensity: float = 1.0
    explanation: Explanation | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        """From the answer's JSON; unknown fields are ignored."""
        explanation = data.get("explanation")
        return cls(
            tip_id=str(data["tip_id"]),
            score=float(data["score"]),
            policy=str(data["policy"]),
            event_id=str(data["event_id"]),
            propensity=float(data.get("propensity", 1.0)),
            explanation=None if explanation is None else Explanation.from_json(explanation),
        )


@dataclass(frozen=True, slots=True)
class RewardAck:
    """The answer of `POST /reward`: what happened to the reward.

    `kept` is the value the decision keeps; for a `repeat` (the decision had a reward
    already, `reward_n` counts them) it is chosen by `aggregation` and may differ from
    `received`, the value sent: under `first`, a second value is not kept. A retried call
    that had reached the server answers `repeat=True` too. Fields the server did not send
    (an older server) take their defaults.
    """

    ok: bool
    learned: bool
    event_id: str | None
    kept: float | None = None
    late: bool = False
    received: float | None = None
    repeat: bool = False
    reward_n: int | None = None
    aggregation: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RewardAck:
        """From the answer's JSON; unknown fields are ignored."""
        event_id = data.get("event_id")
        kept = data.get("kept")
        received = data.get("received")
        reward_n = data.get("reward_n")
        aggregation = data.get("aggregation")
        return cls(
            ok=bool(data.get("ok", True)),
            learned=bool(data["learned"]),
            event_id=None if event_id is None else str(event_id),
            kept=None if kept is None else float(kept),
            late=bool(data.get("late", False)),
            received=None if received is None else float(received),
            repeat=bool(data.get("repeat", False)),
            reward_n=None if reward_n is None else int(reward_n),
            aggregation=None if aggregation is None else str(aggregation),
        )


@dataclass(frozen=True, slots=True)
class Stats:
    """The answer of `GET /stats/{user_id}`: the user's counters and model weights."""

    user_id: str
    pulls: int
    reward_count: int
    cumulative_reward: float
    estimated_mean: float
    estimated_mean_reward: float
    policy: str
    feature_names: tuple[str, ...]
    theta: tuple[float, ...]
    last_updated: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Stats:
        """From the answer's JSON; unknown fields are ignored."""
        mean = float(data.get("estimated_mean", data.get("estimated_mean_reward", 0.0)))
        last = data.get("last_updated")
        return cls(
            user_id=str(data["user_id"]),
            pulls=int(data["pulls"]),
            reward_count=int(data["reward_count"]),
            cumulative_reward=float(data["cumulative_reward"]),
            estimated_mean=mean,
            estimated_mean_reward=float(data.get("estimated_mean_reward", mean)),
            policy=str(data.get("policy", "")),
            feature_names=tuple(str(n) for n in data.get("feature_names", ())),
            theta=tuple(float(v) for v in data["theta"]),
            last_updated=None if last is None else str(last),
        )


# --- the shared part: requests, answers, retry decisions ------------------------------


@dataclass(frozen=True, slots=True)
class _Request(Generic[T]):
    """One call: what to send, how to read a 2xx answer, and whether it may be repeated
    after it may have reached the server (`replayable`)."""

    method: str
    path: str
    body: dict[str, Any] | None
    replayable: bool
    parse: Callable[[Any], T]


@dataclass(frozen=True, slots=True)
class _Retry:
    """Send the request again after `delay` seconds."""

    delay: float


# Failures raised before any byte of the request left: safe to retry for every call.
_NOT_SENT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)


def _path_id(user_id: str) -> str:
    """A user id as a path segment. `.` and `..` cannot be one (nor can the server
    accept them), so they are refused here rather than sent to another path."""
    if user_id in ("", ".", ".."):
        raise ValueError(f"user_id {user_id!r} cannot be written in a URL path")
    return quote(user_id, safe="")


def _candidate_json(candidate: Candidate | Mapping[str, Any]) -> dict[str, Any]:
    return candidate.to_json() if isinstance(candidate, Candidate) else dict(candidate)


def _as_dict(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _ok(data: Any) -> None:
    _as_dict(data)


def _deleted(data: Any) -> bool:
    return bool(_as_dict(data).get("deleted", True))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds to wait (delta-seconds or an HTTP date), at most
    `MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _Api:
    """Settings, request building, answer parsing and retry decisions, shared by
    `Client` and `AsyncClient`."""

    def __init__(
        self, base_url: str, api_key: str | None, timeout: float, retries: int, backoff: float
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if backoff < 0:
            raise ValueError("backoff must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout)
        self.retries = retries
        self.backoff = backoff
        self.headers = {"user-agent": USER_AGENT, "accept": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    # Requests, one per endpoint.

    def score_request(
        self,
        user_id: str,
        candidates: Iterable[Candidate | Mapping[str, Any]],
        context: Mapping[str, Any] | None,
        explain: bool,
    ) -> _Request[Decision]:
        body: dict[str, Any] = {
            "user_id": user_id,
            "candidates": [_candidate_json(c) for c in candidates],
        }
        if context is not None:
            body["context"] = dict(context)
        if explain:
            body["explain"] = True
        return _Request("POST", "/score", body, False, Decision.from_json)

    def reward_request(
        self,
        user_id: str,
        reward: float,
        event_id: str | None,
        tip_id: str | None,
        features: Mapping[str, Any] | None,
    ) -> _Request[RewardAck]:
        body: dict[str, Any] = {"user_id": user_id, "reward": reward}
        # The server refuses these as null: they are left out when not given.
        if event_id is not None:
            body["event_id"] = event_id
        if tip_id is not None:
            body["tip_id"] = tip_id
        if features is not None:
            body["features"] = dict(features)
        # With event_id a repeat joins the same decision: under the default aggregation
        # (`first`) it changes nothing. Without, each call learns once more.
        return _Request("POST", "/reward", body, event_id is not None, RewardAck.from_json)

    def reset_request(self, user_id: str) -> _Request[None]:
        return _Request("POST", f"/reset/{_path_id(user_id)}", None, True, _ok)

    def stats_request(self, user_id: str) -> _Request[Stats]:
        return _Request("GET", f"/stats/{_path_id(user_id)}", None, True, Stats.from_json)

    def features_request(self, user_id: str) -> _Request[dict[str, Any]]:
        return _Request("GET", f"/features/{_path_id(user_id)}", None, True, _as_dict)

    def export_request(self, user_id: str) -> _Request[dict[str, Any]]:
        return _Request("GET", f"/users/{_path_id(user_id)}/export", None, True, _as_dict)

    def delete_request(self, user_id: str) -> _Request[bool]:
        return _Request("DELETE", f"/users/{_path_id(user_id)}", None, True, _deleted)

    def health_request(self) -> _Request[dict[str, Any]]:
        return _Request("GET", "/health", None, True, _as_dict)

    def ready_request(self) -> _Request[dict[str, Any]]:
        return _Request("GET", "/ready", None, True, _as_dict)

    # Answers and failures: a result, a `_Retry`, or an exception raised.

    def backoff_delay(self, attempt: int) -> float:
        """Exponential back-off with jitter before retry number `attempt` (1, 2, ...):
        between half and all of `backoff * 2**(attempt - 1)`, at most MAX_RETRY_AFTER_S."""
        full = min(self.backoff * 2.0 ** (attempt - 1), MAX_RETRY_AFTER_S)
        return full / 2 + random.uniform(0, full / 2)

    def after_response(
        self, request: _Request[T], attempt: int, response: httpx.Response
    ) -> T | _Retry:
        """The parsed answer, a `_Retry`, or the error raised."""
        can_retry = attempt <= self.retries
        if response.is_success:
            try:
                data = response.json()
            except ValueError:
                # E.g. an export cut short: not an answer. Repeat it if that is safe.
                if request.replayable and can_retry:
                    return _Retry(self.backoff_delay(attempt))
                raise ServiceError(
                    response.status_code,
                    [{"loc": [], "msg": "the answer is not valid JSON", "type": "bad_answer"}],
                    response.headers.get("x-request-id"),
                ) from None
            return request.parse(data)
        if response.status_code == 503 and can_retry:
            wait = retry_after_seconds(response.headers.get("retry-after"))
            return _Retry(self.backoff_delay(attempt) if wait is None else wait)
        raise error_from(response)

    def after_error(
        self, request: _Request[T], attempt: int, error: httpx.TransportError
    ) -> _Retry:
        """A `_Retry` for a failure worth retrying, else `Unavailable` raised."""
        sent = not isinstance(error, _NOT_SENT)
        msg = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if sent and not request.replayable:
            msg += "; not retried, the server may have acted on the request"
        kind = "no_answer" if sent else "connection_error"
        detail: list[ErrorItem] = [
            {"loc": [request.method, request.path], "msg": msg, "type": kind}
        ]
        if sent and not request.replayable:
            raise OutcomeUnknown(None, detail) from error
        if attempt > self.retries:
            raise Unavailable(None, detail) from error
        return _Retry(self.backoff_delay(attempt))


# --- the two clients -------------------------------------------------------------------


class Client:
    """A synchronous client of the service, on `httpx.Client`.

    `timeout` is in seconds, for connecting and for each read and write. `retries` is
    how many times a failed call is sent again (see the module's doc for which calls are
    retried when), `backoff` the first back-off in seconds. `transport` replaces the
    network (e.g. `httpx.MockTransport`). Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._api = _Api(base_url, api_key, timeout, retries, backoff)
        self._http = httpx.Client(
            base_url=self._api.base_url,
            headers=self._api.headers,
            timeout=self._api.timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _call(self, request: _Request[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            outcome: T | _Retry
            try:
                response = self._http.request(request.method, request.path, json=request.body)
            except httpx.TransportError as error:
                outcome = self._api.after_error(request, attempt, error)
            else:
                outcome = self._api.after_response(request, attempt, response)
            if not isinstance(outcome, _Retry):
                return outcome
            self._sleep(outcome.delay)

    def score(
        self,
        user_id: str,
        candidates: Iterable[Candidate | Mapping[str, Any]],
        *,
        context: Mapping[str, Any] | None = None,
        explain: bool = False,
    ) -> Decision:
        """`POST /score`: choose the tip to show among `candidates`.

        Retried on a 503 and when no connection could be made, but not after a time-out
        or a dropped connection once the request may have been sent: that raises
        `OutcomeUnknown` (the decision may have been logged).
        """
        return self._call(self._api.score_request(user_id, candidates, context, explain))

    def reward(
        self,
        user_id: str,
        reward: float,
        *,
        event_id: str | None = None,
        tip_id: str | None = None,
        features: Mapping[str, Any] | None = None,
    ) -> RewardAck:
        """`POST /reward`: learn from what the user did with a tip.

        With `event_id` (recommended) it is retried like a read: a repeat for the same
        decision changes nothing under the default `OO_REWARD_AGGREGATION=first`.
        Without, `tip_id` and `features` are required, and after a time-out or a dropped
        connection it is not retried but raises `OutcomeUnknown`.
        """
        return self._call(self._api.reward_request(user_id, reward, event_id, tip_id, features))

    def reset(self, user_id: str) -> None:
        """`POST /reset/{user_id}`: forget the user's model, history and decision log."""
        self._call(self._api.reset_request(user_id))

    def stats(self, user_id: str) -> Stats:
        """`GET /stats/{user_id}`: the user's counters and model weights."""
        return self._call(self._api.stats_request(user_id))

    def features(self, user_id: str) -> dict[str, Any]:
        """`GET /features/{user_id}`: the user's last decisions, as the JSON answer."""
        return self._call(self._api.features_request(user_id))

    def export(self, user_id: str) -> dict[str, Any]:
        """`GET /users/{user_id}/export`: everything stored about the user, as JSON."""
        return self._call(self._api.export_request(user_id))

    def delete_user(self, user_id: str) -> bool:
        """`DELETE /users/{user_id}`: erase the user; False if nothing was stored."""
        return self._call(self._api.delete_request(user_id))

    def health(self) -> dict[str, Any]:
        """`GET /health`: liveness of the process."""
        return self._call(self._api.health_request())

    def ready(self) -> dict[str, Any]:
        """`GET /ready`: readiness; `Unavailable` if still not ready after the retries."""
        return self._call(self._api.ready_request())


class AsyncClient:
    """An asynchronous client of the service, on `httpx.AsyncClient`.

    The same arguments, methods and retry rules as `Client`, with `async` methods; use
    with `async with`, or await `aclose()`. `transport` takes an
    `httpx.AsyncBaseTransport`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api = _Api(base_url, api_key, timeout, retries, backoff)
        self._http = httpx.AsyncClient(
            base_url=self._api.base_url,
            headers=self._api.headers,
            timeout=self._api.timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _call(self, request: _Request[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            outcome: T | _Retry
            try:
                response = await self._http.request(request.method, request.path, json=request.body)
            except httpx.TransportError as error:
                outcome = self._api.after_error(request, attempt, error)
            else:
                outcome = self._api.after_response(request, attempt, response)
            if not isinstance(outcome, _Retry):
                return outcome
            await self._sleep(outcome.delay)

    async def score(
        self,
        user_id: str,
        candidates: Iterable[Candidate | Mapping[str, Any]],
        *,
        context: Mapping[str, Any] | None = None,
        explain: bool = False,
    ) -> Decision:
        """`POST /score`, as `Client.score` (not retried once it may have been sent)."""
        return await self._call(self._api.score_request(user_id, candidates, context, explain))

    async def reward(
        self,
        user_id: str,
        reward: float,
        *,
        event_id: str | None = None,
        tip_id: str | None = None,
        features: Mapping[str, Any] | None = None,
    ) -> RewardAck:
        """`POST /reward`, as `Client.reward` (retried freely only with `event_id`)."""
        return await self._call(
            self._api.reward_request(user_id, reward, event_id, tip_id, features)
        )

    async def reset(self, user_id: str) -> None:
        """`POST /reset/{user_id}`, as `Client.reset`."""
        await self._call(self._api.reset_request(user_id))

    async def stats(self, user_id: str) -> Stats:
        """`GET /stats/{user_id}`, as `Client.stats`."""
        return await self._call(self._api.stats_request(user_id))

    async def features(self, user_id: str) -> dict[str, Any]:
        """`GET /features/{user_id}`, as `Client.features`."""
        return await self._call(self._api.features_request(user_id))

    async def export(self, user_id: str) -> dict[str, Any]:
        """`GET /users/{user_id}/export`, as `Client.export`."""
        return await self._call(self._api.export_request(user_id))

    async def delete_user(self, user_id: str) -> bool:
        """`DELETE /users/{user_id}`, as `Client.delete_user`."""
        return await self._call(self._api.delete_request(user_id))

    async def health(self) -> dict[str, Any]:
        """`GET /health`, as `Client.health`."""
        return await self._call(self._api.health_request())

    async def ready(self) -> dict[str, Any]:
        """`GET /ready`, as `Client.ready`."""
        return await self._call(self._api.ready_request())
