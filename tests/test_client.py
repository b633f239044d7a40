"""`oo_serving.client` against real servers on loopback: the contract, errors and keys.

Only the retry-policy tests at the end replace the network with `httpx.MockTransport`, to
play a 503-then-200 sequence, a refused connection or a read time-out; everything else
talks to a running `oo-serving serve`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from oo_serving.client import (
    AsyncClient,
    Candidate,
    Client,
    Conflict,
    Decision,
    Forbidden,
    NotFound,
    OutcomeUnknown,
    RewardAck,
    ServiceError,
    Stats,
    Unauthorized,
    Unavailable,
    ValidationError,
    retry_after_seconds,
)
from tests.conftest import Server, free_port

CANDIDATES: list[Any] = [
    Candidate(
        "task-1",
        "Renew passport",
        "todoist",
        {"is_overdue": True, "task_age_days": 3, "priority": 4},
    ),
    {"id": "task-2", "content": "Water the plants", "source": "todoist"},
]

DECIDE = "client-decide-key-0123"
READ = "client-read-key-012345"
ADMIN = "client-admin-key-01234"


# --- against a real server --------------------------------------------------------------


def test_score_reward_stats_round_trip(server: Server, user_id: str) -> None:
    with Client(server.base_url) as oo:
        assert oo.health() == {"ok": True}
        assert oo.ready() == {"ok": True}
        decision = oo.score(user_id, CANDIDATES, context={"hour_of_day": 9, "day_of_week": 1})
        assert isinstance(decision, Decision)
        assert decision.tip_id in {"task-1", "task-2"}
        assert decision.policy
        assert decision.propensity == 1.0
        assert decision.explanation is None

        ack = oo.reward(user_id, 1.0, event_id=decision.event_id)
        assert ack == RewardAck(
            ok=True,
            learned=True,
            event_id=decision.event_id,
            kept=1.0,
            late=False,
            received=1.0,
            repeat=False,
            reward_n=1,
            aggregation=None,
        )
        # A repeat is safe: the default aggregation keeps the first, and the answer says
        # so, the value sent beside the one kept.
        again = oo.reward(user_id, -1.0, event_id=decision.event_id, tip_id=decision.tip_id)
        assert again == RewardAck(
            ok=True,
            learned=False,
            event_id=decision.event_id,
            kept=1.0,
            late=False,
            received=-1.0,
            repeat=True,
            reward_n=2,
            aggregation="first",
        )

        stats = oo.stats(user_id)
        assert isinstance(stats, Stats)
        assert (stats.user_id, stats.pulls, stats.reward_count) == (user_id, 1, 1)
        assert stats.cumulative_reward == 1.0
        assert len(stats.theta) == len(stats.feature_names)

        history = oo.features(user_id)["history"]
        assert [h["event_id"] for h in history] == [decision.event_id]
        exported = oo.export(user_id)
        assert [d["event_id"] for d in exported["decisions"]] == [decision.event_id]

        oo.reset(user_id)
        assert oo.stats(user_id).pulls == 0
        assert oo.delete_user(user_id) is False


def test_explain_and_a_reward_without_event_id(server: Server, user_id: str) -> None:
    with Client(server.base_url) as oo:
        decision = oo.score(user_id, CANDIDATES, explain=True)
        assert decision.explanation is not None
        parts = sum(decision.explanation.contributions.values())
        assert parts + decision.explanation.exploration_bonus == pytest.approx(decision.score)
        ack = oo.reward(
            user_id, 0.5, tip_id=decision.tip_id, features={"hour_of_day": 12, "priority": 2}
        )
        assert ack.learned is True
        assert ack.event_id == decision.event_id  # joined to the latest decision for the tip
        assert oo.delete_user(user_id) is True


def test_async_round_trip(server: Server, user_id: str) -> None:
    async def run() -> tuple[Decision, RewardAck, Stats]:
        async with AsyncClient(server.base_url) as oo:
            assert await oo.health() == {"ok": True}
            decision = await oo.score(user_id, CANDIDATES)
            ack = await oo.reward(user_id, -0.5, event_id=decision.event_id)
            stats = await oo.stats(user_id)
            assert (await oo.features(user_id))["user_id"] == user_id
            return decision, ack, stats

    decision, ack, stats = asyncio.run(run())
    assert ack.learned is True
    assert ack.event_id == decision.event_id
    assert ack.kept == -0.5
    assert (stats.pulls, stats.reward_count, stats.cumulative_reward) == (1, 1, -0.5)


def test_a_refused_field_is_a_validation_error_naming_it(server: Server, user_id: str) -> None:
    with Client(server.base_url) as oo, pytest.raises(ValidationError) as caught:
        oo.reward(user_id, 2.0, event_id="no-such-event")
    error = caught.value
    assert error.status == 422
    assert ["body", "reward"] in error.locs
    assert "body.reward" in str(error)
    assert error.request_id  # the server names every answer


def test_missing_fields_without_event_id_are_named(server: Server, user_id: str) -> None:
    with Client(server.base_url) as oo, pytest.raises(ValidationError) as caught:
        oo.reward(user_id, 1.0)
    assert ["body", "tip_id"] in caught.value.locs
    assert ["body", "features"] in caught.value.locs


def test_values_are_sent_as_given_so_a_wrong_type_is_refused(server: Server, user_id: str) -> None:
    """The client does not coerce: a caller's `True` for a reward, or `"9"` for an hour,
    reaches the server as JSON true and "9", which it refuses, naming the field."""
    with Client(server.base_url) as oo:
        with pytest.raises(ValidationError) as caught:
            oo.reward(user_id, True, tip_id="task-1", features={})
        assert caught.value.locs == [["body", "reward"]]
        with pytest.raises(ValidationError) as caught:
            oo.score(user_id, CANDIDATES, context={"hour_of_day": "9"})
        assert caught.value.locs == [["body", "context", "hour_of_day"]]
        assert oo.stats(user_id).pulls == 0
        # Integers and floats are JSON numbers, whichever Python type carries them.
        decision = oo.score(user_id, CANDIDATES, context={"hour_of_day": 9.0, "day_of_week": 1})
        assert oo.reward(user_id, 1, event_id=decision.event_id).kept == 1.0


def test_an_unknown_event_id_is_not_found(server: Server, user_id: str) -> None:
    with Client(server.base_url) as oo, pytest.raises(NotFound) as caught:
        oo.reward(user_id, 1.0, event_id="01a21ce4-d360-703f-a75d-04061ec41447")
    assert caught.value.status == 404
    assert isinstance(caught.value, ServiceError)


def test_another_tip_for_the_event_is_a_conflict(server: Server, user_id: str) -> None:
    with Client(server.base_url) as oo:
        decision = oo.score(user_id, CANDIDATES)
        other = "task-2" if decision.tip_id == "task-1" else "task-1"
        with pytest.raises(Conflict) as caught:
            oo.reward(user_id, 1.0, event_id=decision.event_id, tip_id=other)
        assert caught.value.status == 409
        assert oo.stats(user_id).reward_count == 0  # a refusal changes nothing


def test_user_ids_that_cannot_be_a_path_are_refused_before_sending(server: Server) -> None:
    with Client(server.base_url) as oo:
        for bad in ("", ".", ".."):
            with pytest.raises(ValueError, match="URL path"):
                oo.stats(bad)


def test_api_keys(server_factory: Callable[..., Server], user_id: str) -> None:
    keys = f"{DECIDE}:decide,{READ}:read,{ADMIN}:admin"
    server = server_factory(env={"OO_API_KEYS": keys})
    with Client(server.base_url) as anonymous:
        assert anonymous.health() == {"ok": True}  # open without a key
        with pytest.raises(Unauthorized) as missing:
            anonymous.score(user_id, CANDIDATES)
    assert missing.value.status == 401
    assert ["header", "Authorization"] in missing.value.locs

    wrong = Client(server.base_url, api_key="not-a-configured-key")
    with wrong, pytest.raises(Unauthorized):
        wrong.stats(user_id)

    with Client(server.base_url, api_key=READ) as reader:
        with pytest.raises(Forbidden) as forbidden:
            reader.score(user_id, CANDIDATES)
        assert forbidden.value.status == 403
        assert reader.stats(user_id).pulls == 0

    with Client(server.base_url, api_key=DECIDE) as app:
        decision = app.score(user_id, CANDIDATES)
        assert app.reward(user_id, 1.0, event_id=decision.event_id).learned
        with pytest.raises(Forbidden):
            app.delete_user(user_id)

    async def as_admin() -> bool:
        async with AsyncClient(server.base_url, api_key=ADMIN) as ops:
            assert (await ops.stats(user_id)).reward_count == 1
            return await ops.delete_user(user_id)

    assert asyncio.run(as_admin()) is True


def test_no_server_is_unavailable_after_the_retries() -> None:
    # A port nothing listens on: refused at once, retried, then Unavailable.
    oo = Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.0)
    with oo, pytest.raises(Unavailable) as caught:
        oo.health()
    assert caught.value.status is None


# --- retry policy (the network simulated by httpx.MockTransport) --------------------------

DECISION = {
    "tip_id": "task-1",
    "score": 1.0,
    "policy": "linucb-v1",
    "event_id": "e-1",
    "propensity": 1.0,
    "added_by_a_newer_server": {"ignored": True},
}
UNAVAILABLE = {"detail": [{"loc": [], "msg": "database unavailable", "type": "unavailable"}]}


class Script:
    """Answers requests in turn from `steps` (a response, or an exception to raise);
    the last step repeats. Counts the attempts."""

    def __init__(self, *steps: httpx.Response | Exception) -> None:
        self.steps = steps
        self.attempts = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        step = self.steps[min(self.attempts, len(self.steps) - 1)]
        self.attempts += 1
        if isinstance(step, Exception):
            raise step
        return step


def busy(retry_after: str | None = "1") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    headers["X-Request-ID"] = "req-503"
    return httpx.Response(503, json=UNAVAILABLE, headers=headers)


def scripted(script: Script, *, retries: int = 3) -> tuple[Client, list[float]]:
    """A Client on the script, whose waits are recorded instead of slept."""
    slept: list[float] = []
    oo = Client(
        "http://oo.test", retries=retries, backoff=0.2, transport=httpx.MockTransport(script)
    )
    setattr(oo, "_sleep", slept.append)  # noqa: B010 (a method replaced)
    return oo, slept


def test_retry_policy_503_then_200_honours_retry_after() -> None:
    script = Script(busy("1"), busy("120"), httpx.Response(200, json=DECISION))
    oo, slept = scripted(script)
    with oo:
        decision = oo.score("u", CANDIDATES)
    assert decision.event_id == "e-1"  # and the unknown field was ignored
    assert script.attempts == 3
    assert slept == [1.0, 10.0]  # Retry-After, capped


def test_retry_policy_503_without_retry_after_backs_off_then_gives_up() -> None:
    script = Script(busy(None))
    oo, slept = scripted(script, retries=2)
    with oo, pytest.raises(Unavailable) as caught:
        oo.stats("u")
    assert script.attempts == 3
    assert len(slept) == 2
    assert 0.1 <= slept[0] <= 0.2  # half to all of backoff, then of twice that
    assert 0.2 <= slept[1] <= 0.4
    assert caught.value.status == 503
    assert caught.value.request_id == "req-503"
    assert "database unavailable" in str(caught.value)


def test_retry_policy_connect_errors_are_retried_even_for_score() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json=DECISION))
    oo, _ = scripted(script)
    with oo:
        assert oo.score("u", CANDIDATES).tip_id == "task-1"
    assert script.attempts == 2


def test_retry_policy_score_is_not_retried_after_a_read_timeout() -> None:
    script = Script(httpx.ReadTimeout("slow"), httpx.Response(200, json=DECISION))
    oo, slept = scripted(script)
    with oo, pytest.raises(OutcomeUnknown) as caught:
        oo.score("u", CANDIDATES)
    assert script.attempts == 1
    assert slept == []
    assert isinstance(caught.value, Unavailable)


def test_retry_policy_reward_without_event_id_is_not_retried_after_a_drop() -> None:
    script = Script(httpx.RemoteProtocolError("dropped"), httpx.Response(200, json={}))
    oo, _ = scripted(script)
    with oo, pytest.raises(OutcomeUnknown):
        oo.reward("u", 1.0, tip_id="task-1", features={})
    assert script.attempts == 1


def test_retry_policy_reward_with_event_id_is_retried_after_a_read_timeout() -> None:
    # An older server's answer, without received, repeat, reward_n and aggregation.
    ack = {"ok": True, "learned": True, "event_id": "e-1", "kept": 1.0, "late": False}
    script = Script(httpx.ReadTimeout("slow"), httpx.Response(200, json=ack))
    oo, _ = scripted(script)
    with oo:
        answer = oo.reward("u", 1.0, event_id="e-1")
    assert answer == RewardAck(ok=True, learned=True, event_id="e-1", kept=1.0, late=False)
    assert (answer.received, answer.repeat, answer.reward_n, answer.aggregation) == (
        None,
        False,
        None,
        None,
    )
    assert script.attempts == 2


def test_retry_policy_reads_give_up_after_the_retries() -> None:
    script = Script(httpx.ReadTimeout("slow"))
    oo, slept = scripted(script, retries=3)
    with oo, pytest.raises(Unavailable) as caught:
        oo.export("u")
    assert not isinstance(caught.value, OutcomeUnknown)
    assert script.attempts == 4
    assert len(slept) == 3


def test_retry_policy_async_client_follows_the_same_rules() -> None:
    busy_then_ok = Script(busy("2"), httpx.Response(200, json=DECISION))
    timeout = Script(httpx.ReadTimeout("slow"))
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> None:
        async with AsyncClient("http://oo.test", transport=httpx.MockTransport(busy_then_ok)) as oo:
            setattr(oo, "_sleep", record)  # noqa: B010 (a method replaced)
            assert (await oo.score("u", CANDIDATES)).event_id == "e-1"
        async with AsyncClient("http://oo.test", transport=httpx.MockTransport(timeout)) as oo:
            with pytest.raises(OutcomeUnknown):
                await oo.score("u", CANDIDATES)

    asyncio.run(run())
    assert busy_then_ok.attempts == 2
    assert slept == [2.0]
    assert timeout.attempts == 1


def test_retry_after_forms() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("-1") == 0.0
    assert retry_after_seconds("600") == 10.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:05 GMT") == 0.0  # in the past
