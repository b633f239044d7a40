"""Exploration, the reward window, aggregation rules and shadow policies, on real stores.

Each aggregation rule is checked against re-learning from scratch: the stored model (and
each shadow's) must equal the model learned from an empty state on every decision's kept
reward, in the order the decisions were first learned, whatever order and repeats the
rewards came in.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oo_serving.assignment import Assignment
from oo_serving.core import registry
from oo_serving.core.exploration import Exploration, parse
from oo_serving.core.features import TaskFeatures
from oo_serving.core.policy import Policy
from oo_serving.service import AGGREGATIONS, Candidate, Service, aggregate
from oo_serving.settings import Settings
from oo_serving.shadow import decode as decode_shadows
from oo_serving.store import open_store
from oo_serving.store.base import DecisionRecord, Store

V1 = registry.make("linucb-v1")
V2 = registry.make("linucb-v2", discount=0.9)  # forgetting strong enough to matter
WAIT_MS = 60_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/oo.db"
    return str(request.getfixturevalue("postgres_url"))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = open_store(Settings(database_url=url, sqlite_synchronous="normal"))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def service(store: Store, policy: Policy, clock: Clock, **options: Any) -> Service:
    return Service(
        store, Assignment.single(policy), clock_ms=clock, reward_wait_ms=WAIT_MS, **options
    )


def candidates(rng: np.random.Generator, n: int = 4) -> list[Candidate]:
    return [
        Candidate(
            f"t{i}",
            TaskFeatures(
                int(rng.integers(24)),
                bool(rng.random() < 0.4),
                float(rng.uniform(0, 40)),
                int(rng.integers(1, 5)),
            ),
        )
        for i in range(n)
    ]


async def decisions(store: Store, user_id: str | None = None) -> list[DecisionRecord]:
    out: list[DecisionRecord] = []
    async with store.decision_log(0, 2**62, None if user_id is None else [user_id]) as pages:
        async for page in pages:
            out += page
    return out


def scratch(policy: Policy, learned: list[tuple[TaskFeatures, float]]) -> Any:
    state = policy.initial_state()
    for features, reward in learned:
        state = policy.update(state, policy.features([features])[0], reward)
    return state


def assert_same_state(policy: Policy, stored: Any, expected: Any) -> None:
    for name, array in policy.arrays(expected).items():
        np.testing.assert_allclose(
            policy.arrays(stored)[name], array, rtol=0, atol=1e-12, err_msg=name
        )


# ── aggregation ──────────────────────────────────────────────────────────────

# (decision index, reward) in the order they arrive; None: a reward on the request's
# features for a tip never decided on (a new observation every time).
ARRIVALS: list[tuple[int | None, float]] = [
    (0, 0.5),
    (1, -1.0),
    (0, 1.0),
    (2, 0.25),
    (None, 0.75),
    (0, -0.5),
    (1, 1.0),
    (4, 0.75),
    (4, 0.75),
    (2, -0.25),
]


@pytest.mark.parametrize("rule", AGGREGATIONS)
@pytest.mark.parametrize(("live", "shadow"), [(V1, V2), (V2, V1)], ids=["v1", "v2"])
def test_each_aggregation_equals_relearning_from_scratch(
    database_url: str, rule: str, live: Policy, shadow: Policy
) -> None:
    async def scenario() -> None:
        rng = np.random.default_rng(7)
        clock = Clock()
        async with opened(database_url) as store:
            svc = service(store, live, clock, aggregation=rule, shadows=[shadow])
            user = f"agg-{rule}-{live.name}"
            shown: list[tuple[str, TaskFeatures]] = []
            for _ in range(5):
                offered = candidates(rng)
                result = await svc.score(user, offered)
                chosen = next(c for c in offered if c.id == result.tip_id)
                shown.append((result.event_id, chosen.features))
                clock.now += 10
            kept: dict[int, float] = {}
            order: list[tuple[int | None, float]] = []  # first learning, in order
            extra = TaskFeatures(7, True, 3.0, 4)
            for index, value in ARRIVALS:
                clock.now += 10
                if index is None:
                    await svc.reward(user, "never-shown", value, extra)
                    order.append((None, value))
                    continue
                answer = await svc.reward(user, None, value, None, shown[index][0])
                if index not in kept:
                    order.append((index, 0.0))
                before = kept.get(index)
                kept[index] = aggregate(rule, before, value)
                assert answer.kept == kept[index]
                assert answer.learned == (before is None or kept[index] != before)
                assert not answer.late
            learned = [
                (extra, value) if index is None else (shown[index][1], kept[index])
                for index, value in order
            ]
            user_row = await store.get_user(user)
            assert user_row is not None
            assert user_row.reward_count == len(learned)
            assert user_row.cumulative_reward == pytest.approx(
                sum(r for _, r in learned), abs=1e-12
            )
            stored = live.decode(user_row.state, user_row.state_version)
            assert_same_state(live, stored, scratch(live, learned))
            version, raw = decode_shadows(user_row.shadows)[shadow.name]
            assert_same_state(shadow, shadow.decode(raw, version), scratch(shadow, learned))
            logged = {d.event_id: d for d in await decisions(store, user)}
            for index, (event_id, _) in enumerate(shown):
                d = logged[event_id]
                arrivals = sum(1 for i, _ in ARRIVALS if i == index)
                assert d.reward_n == arrivals
                assert d.reward == kept.get(index)
                assert d.learned == (index in kept)
                assert d.reward_source == ("client" if index in kept else None)

    asyncio.run(scenario())


def test_a_broken_rule_would_fail_the_scratch_comparison() -> None:
    """The comparison above is not vacuous: learning every repeat as a new observation
    (what a service without aggregation would do) gives another model."""
    f = TaskFeatures(9, True, 2.0, 3)
    right = scratch(V2, [(f, aggregate("sum", 0.5, 1.0))])
    wrong = scratch(V2, [(f, 0.5), (f, 1.0)])
    assert not np.allclose(V2.arrays(right)["b"], V2.arrays(wrong)["b"], atol=1e-12)


# ── the reward window ────────────────────────────────────────────────────────


def test_a_reward_after_the_window_is_stored_not_learned(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with opened(f"sqlite:///{tmp_path}/w.db") as store:
            svc = service(store, V1, clock, aggregation="latest")
            rng = np.random.default_rng(3)
            on_time = await svc.score("w", candidates(rng))
            late = await svc.score("w", candidates(rng))
            clock.now += WAIT_MS  # exactly the window: still learned
            answer = await svc.reward("w", None, 1.0, None, on_time.event_id)
            assert (answer.learned, answer.late) == (True, False)
            before = await store.get_user("w")
            clock.now += 1  # one ms past it
            answer = await svc.reward("w", None, -1.0, None, late.event_id)
            assert (answer.learned, answer.late, answer.kept) == (False, True, -1.0)
            # A repeat after the window changes nothing learned, even under `latest`.
            answer = await svc.reward("w", None, -1.0, None, on_time.event_id)
            assert (answer.learned, answer.kept) == (False, 1.0)
            after = await store.get_user("w")
            assert after is not None
            assert before is not None
            assert (after.state, after.reward_count, after.cumulative_reward) == (
                before.state,
                before.reward_count,
                before.cumulative_reward,
            )
            logged = {d.event_id: d for d in await decisions(store, "w")}
            assert (logged[late.event_id].reward, logged[late.event_id].learned) == (-1.0, False)
            assert logged[on_time.event_id].reward_n == 2
            assert logged[on_time.event_id].reward == 1.0

    asyncio.run(scenario())


def test_the_default_reward_fills_only_what_the_window_closed_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with opened(f"sqlite:///{tmp_path}/d.db") as store:
            svc = service(store, V1, clock)
            rng = np.random.default_rng(5)
            rewarded = await svc.score("d", candidates(rng))
            silent = await svc.score("d", candidates(rng))
            await svc.reward("d", None, 1.0, None, rewarded.event_id)
            clock.now += 1000
            recent = await svc.score("d", candidates(rng))
            clock.now += WAIT_MS - 500  # the first two are past the window, `recent` not
            assert await svc.sweep_default_rewards(0.0) == 1
            assert await svc.sweep_default_rewards(0.0) == 0  # idempotent
            logged = {d.event_id: d for d in await decisions(store, "d")}
            assert (logged[silent.event_id].reward, logged[silent.event_id].reward_source) == (
                0.0,
                "default",
            )
            assert logged[silent.event_id].learned
            assert logged[rewarded.event_id].reward_source == "client"
            assert logged[recent.event_id].reward is None
            # A client reward after the default is late: counted, never learned.
            clock.now += WAIT_MS
            answer = await svc.reward("d", None, 1.0, None, silent.event_id)
            assert (answer.learned, answer.kept) == (False, 0.0)
            user = await store.get_user("d")
            assert user is not None
            assert user.reward_count == 2  # the client's and the default
            assert await svc.sweep_default_rewards(0.0) == 1  # `recent`, now past the window

    asyncio.run(scenario())


# ── exploration ──────────────────────────────────────────────────────────────


def test_parse_exploration() -> None:
    assert parse("none") == Exploration(0.0)
    assert parse("epsilon:0.1").epsilon == 0.1
    assert parse("epsilon:0.1").spec == "epsilon:0.1"
    for bad in ("epsilon", "epsilon:", "epsilon:x", "epsilon:1", "epsilon:-0.1", "softmax:1"):
        with pytest.raises(ValueError, match=r"epsilon|exploration"):
            parse(bad)


def test_logged_propensities_match_the_choice_frequencies(tmp_path: Path) -> None:
    """A fixed user (no reward, so its model never changes) and fixed candidates: the
    shown tip's frequencies over many decisions match the logged probabilities, and each
    draw is recomputed from its event id alone."""
    epsilon, draws = 0.3, 1500

    async def scenario() -> list[DecisionRecord]:
        async with opened(f"sqlite:///{tmp_path}/e.db") as store:
            svc = Service(
                store,
                Assignment.single(V1),
                exploration=Exploration(epsilon),
                decision_log_per_user=draws,
            )
            offered = candidates(np.random.default_rng(11), n=3)
            for _ in range(draws):
                await svc.score("e", offered)
            return await decisions(store, "e")

    log = asyncio.run(scenario())
    assert len(log) == draws
    p = log[0].candidate_p
    assert p is not None
    greedy = log[0].greedy
    assert greedy is not None
    np.testing.assert_allclose(p, Exploration(epsilon).probabilities(3, greedy), atol=1e-15)
    assert math.isclose(p.sum(), 1.0)
    counts = Counter(d.candidate_ids.index(d.tip_id) for d in log)
    for i in range(3):
        assert log[i].candidate_p is not None
        se = math.sqrt(p[i] * (1 - p[i]) / draws)
        assert abs(counts[i] / draws - p[i]) <= 4.5 * se, (i, counts[i], p[i])
    for d in log:
        shown = d.candidate_ids.index(d.tip_id)
        assert d.greedy == greedy
        assert d.propensity == p[shown]
        assert Exploration(epsilon).choose(d.event_id, 3, greedy) == shown


def test_a_broken_draw_would_fail_the_frequency_bound() -> None:
    """The bound above is not vacuous: a draw that explores twice as often as it logs
    lands outside it."""
    draws, epsilon = 1500, 0.3
    p_logged = epsilon / 3 + (1 - epsilon)
    p_real = 2 * epsilon / 3 + (1 - 2 * epsilon)
    se = math.sqrt(p_logged * (1 - p_logged) / draws)
    assert abs(p_real - p_logged) > 4.5 * se


def test_without_exploration_every_decision_is_deterministic(tmp_path: Path) -> None:
    async def scenario() -> list[DecisionRecord]:
        async with opened(f"sqlite:///{tmp_path}/n.db") as store:
            svc = Service(store, Assignment.single(V1))
            rng = np.random.default_rng(2)
            for _ in range(20):
                result = await svc.score("n", candidates(rng))
                assert result.propensity == 1.0
                assert not result.explored
            return await decisions(store, "n")

    for d in asyncio.run(scenario()):
        assert d.candidate_p is not None
        assert d.greedy == d.candidate_ids.index(d.tip_id)
        assert d.candidate_p[d.greedy] == 1.0
        assert d.candidate_p.sum() == 1.0


# ── shadow policies ──────────────────────────────────────────────────────────


def test_a_shadow_chooses_as_it_would_serve_and_never_changes_the_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        rng = np.random.default_rng(13)
        clock = Clock()
        async with opened(f"sqlite:///{tmp_path}/s.db") as store:
            plain = service(store, V1, clock)
            shadowed = service(store, V1, clock, shadows=[V2, V1])
            learned: list[tuple[TaskFeatures, float]] = []
            for step in range(30):
                offered = candidates(rng)
                # Both services see the same stored model: the shadow must not change
                # what the live policy answers.
                live = V1.choose(
                    await state_of(store, "s", V1), V1.features([c.features for c in offered]), None
                )
                result = await shadowed.score("s", offered)
                assert result.tip_id == offered[live.index].id
                v2_state = scratch(V2, learned)
                expected = V2.choose(v2_state, V2.features([c.features for c in offered]), None)
                d = (await decisions(store, "s"))[-1]
                assert d.shadow == {"linucb-v2": expected.index, "linucb-v1": d.greedy}
                assert result.agreement == {
                    "linucb-v2": expected.index == d.greedy,
                    "linucb-v1": True,
                }
                value = float(rng.choice([-1.0, 0.0, 1.0]))
                chosen = offered[live.index].features
                await (shadowed if step % 2 else plain).reward(
                    "s", None, value, None, result.event_id
                ) if step % 3 else await shadowed.reward("s", None, value, None, result.event_id)
                learned.append((chosen, value))
                clock.now += 1

    async def state_of(store: Store, user: str, policy: Policy) -> Any:
        row = await store.get_user(user)
        if row is None:
            return policy.initial_state()
        return policy.decode(row.state, row.state_version)

    asyncio.run(scenario())


def test_a_shadow_added_later_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    async def scenario() -> None:
        rng = np.random.default_rng(17)
        clock = Clock()
        async with opened(f"sqlite:///{tmp_path}/r.db") as store:
            before = service(store, V1, clock)
            learned: list[tuple[TaskFeatures, float]] = []
            for _ in range(12):
                offered = candidates(rng)
                result = await before.score("r", offered)
                value = float(rng.choice([-1.0, 1.0]))
                await before.reward("r", None, value, None, result.event_id)
                learned.append((next(c.features for c in offered if c.id == result.tip_id), value))
            after = service(store, V1, clock, shadows=[V2])
            await after.score("r", candidates(rng))
            row = await store.get_user("r")
            assert row is not None
            version, raw = decode_shadows(row.shadows)["linucb-v2"]
            assert_same_state(V2, V2.decode(raw, version), scratch(V2, learned))

    asyncio.run(scenario())
