"""IPS, SNIPS and DR with their intervals, on synthetic logs whose true values are known.

The log: 200 users with lognormal activity (a few heavy users) and a user random effect
u ~ N(0, 0.8²) on the reward's logit, so one user's rewards are correlated and the
standard error must be clustered by user. Each decision offers n ∈ {2, …, 8} candidates
with 4 random features x; the reward is Bernoulli with P(r = 1) = σ(β·x − 0.3 + u). The
logging policy is ε-greedy (ε = 0.2) around a fixed scorer that is not the true one, and
logs its probabilities exactly. Targets: `uniform`, `greedy` (the logging scorer's
argmax), `oracle` (the true best candidate: much better than logging) and `other` (the
argmax of a poor scorer: much worse, weights up to n/ε = 40).

The truth of a target at a decision is Σ_a π(a|x) E_u[σ(β·x_a − 0.3 + u)], the expectation
over the user effect by 60-point Gauss–Hermite quadrature (exact to ~1e-12), and the
estimand after N events is the mean of that over the first N decisions' contexts.

What 50 replicates × 2,000 events measured when the bounds were set (seeds 0–49), as
the share of replicates whose interval covers the truth (nominal 95%):

| estimates                         | ci at the end: min … max (mean) | cs at every checkpoint |
|-----------------------------------|---------------------------------|------------------------|
| values, 5 policies × 3 estimators | 0.94 … 0.98 (0.960)             | 0.98 … 1.00            |
| differences, 4 targets × 3        | 0.90 … 1.00 (0.947)             | 0.98 … 1.00            |
| IPS, 4 targets, probabilities claiming ε = 0.1 (25 replicates) | 0.00 … 0.60 | —      |
| logging, a new user id per event (25 replicates)               | 0.80        | —      |

The bound, ≥ 90% for every estimate, leaves room for binomial noise over 50 replicates
(one standard error is 3%) and still fails an estimator that uses wrong propensities or
ignores the user clusters, as the last two rows show. The sequences are conservative at
these sizes: they hold at every look, and are checked only at the checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from oo_serving.evaluation.estimators import (
    MIN_CS_ESS,
    PROPENSITY_EDGES,
    Evaluator,
    LoggedEvent,
    cs_half_width,
    design_rho,
    mixture_radius,
)
from oo_serving.evaluation.result import ESTIMATORS, EvaluationResult

Array = npt.NDArray[np.float64]

K = 4
MAX_N = 8
EPSILON = 0.2
SIGMA_U = 0.8
ACTIVITY_SIGMA = 1.0
BETA_TRUE = np.array([0.9, -0.6, 0.4, 0.0])
INTERCEPT = -0.3
BETA_LOGGING = np.array([0.6, 0.0, 0.6, 0.5])
BETA_OTHER = np.array([0.0, 0.3, 0.0, 1.0])
TARGETS = ("greedy", "oracle", "other")
POLICIES = ("logging", "uniform", *TARGETS)

REPLICATES = 50
EVENTS = 2_000
BROKEN_REPLICATES = 25
COVERAGE = 0.90

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(60)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def mean_reward(z: Array) -> Array:
    """E_u[σ(z + u)] for u ~ N(0, SIGMA_U²), elementwise (Gauss–Hermite quadrature)."""
    return (1.0 / (1.0 + np.exp(-(z[..., None] + SIGMA_U * _NODES)))) @ _WEIGHTS


@dataclass(frozen=True)
class Log:
    events: list[LoggedEvent]
    truth: dict[str, Array]
    """Policy → the true conditional value at each event, shape (events,)."""

    def value(self, policy: str, n: int) -> float:
        """The estimand after the first n events: the mean of the conditional values."""
        return float(self.truth[policy][:n].mean())


def make_log(
    seed: int,
    events: int,
    *,
    users: int = 200,
    claimed_epsilon: float = EPSILON,
    user_of: Callable[[int, int], str] = lambda user, i: f"user-{user}",
) -> Log:
    """A seeded log (see the module docstring). claimed_epsilon: the ε the logged
    probabilities say (the actions are always drawn with EPSILON); user_of: the user id
    written for event i of `user`."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(0.0, SIGMA_U, users)
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, users)
    who = rng.choice(users, size=events, p=activity / activity.sum())
    n = rng.integers(2, MAX_N + 1, size=events)
    valid = np.arange(MAX_N) < n[:, None]
    F = rng.normal(size=(events, MAX_N, K))
    z = F @ BETA_TRUE + INTERCEPT

    def best(scores: Array) -> Array:
        top = np.argmax(np.where(valid, scores, -np.inf), axis=1)
        return (np.arange(MAX_N) == top[:, None]).astype(np.float64)

    greedy = best(F @ BETA_LOGGING)

    def epsilon_greedy(epsilon: float) -> Array:
        return np.where(valid, epsilon / n[:, None] + (1.0 - epsilon) * greedy, 0.0)

    mu = epsilon_greedy(EPSILON)
    chosen = np.minimum((rng.random(events)[:, None] > np.cumsum(mu, axis=1)).sum(axis=1), n - 1)
    p_reward = 1.0 / (1.0 + np.exp(-(z[np.arange(events), chosen] + effect[who])))
    reward = (rng.random(events) < p_reward).astype(np.float64)
    probs = {
        "logging": mu,
        "uniform": np.where(valid, 1.0 / n[:, None], 0.0),
        "greedy": greedy,
        "oracle": best(z),
        "other": best(F @ BETA_OTHER),
    }
    m = np.where(valid, mean_reward(z), 0.0)
    truth = {name: (p * m).sum(axis=1) for name, p in probs.items()}
    logged = mu if claimed_epsilon == EPSILON else epsilon_greedy(claimed_epsilon)
    out = [
        LoggedEvent(
            user_id=user_of(int(who[i]), i),
            ts_ms=1_000 * i,
            chosen=int(chosen[i]),
            reward=float(reward[i]),
            logging_p=logged[i, : n[i]],
            features=F[i, : n[i]],
            targets={name: probs[name][i, : n[i]] for name in TARGETS},
        )
        for i in range(events)
    ]
    return Log(out, truth)


def evaluate(events: list[LoggedEvent]) -> EvaluationResult:
    evaluator = Evaluator(TARGETS)
    for event in events:
        evaluator.add(event)
    return evaluator.result()


Key = tuple[str, str, str]  # ("value" | "difference", policy, estimator)


def final_coverage(log: Log, result: EvaluationResult) -> dict[Key, bool]:
    n = result.events
    covered: dict[Key, bool] = {}
    for e in result.estimates:
        covered["value", e.policy, e.estimator] = e.ci_low <= log.value(e.policy, n) <= e.ci_high
    for d in result.differences:
        truth = log.value(d.policy, n) - log.value("logging", n)
        covered["difference", d.policy, d.estimator] = d.ci_low <= truth <= d.ci_high
    return covered


def sequence_coverage(log: Log, result: EvaluationResult) -> dict[Key, bool]:
    """Whether each confidence sequence covers the truth at every checkpoint."""
    covered: dict[Key, bool] = {}
    for cp in result.checkpoints:
        n = cp.events
        for e in cp.estimates:
            ok = e.cs_low <= log.value(e.policy, n) <= e.cs_high
            key: Key = ("value", e.policy, e.estimator)
            covered[key] = covered.get(key, True) and ok
        for d in cp.differences:
            truth = log.value(d.policy, n) - log.value("logging", n)
            key = ("difference", d.policy, d.estimator)
            covered[key] = covered.get(key, True) and d.cs_low <= truth <= d.cs_high
    return covered


def shares(rows: list[dict[Key, bool]]) -> dict[Key, float]:
    keys = {k for row in rows for k in row}
    return {k: float(np.mean([row.get(k, False) for row in rows])) for k in sorted(keys)}


def ci_width(result: EvaluationResult, policy: str, estimator: str) -> float:
    e = next(e for e in result.estimates if (e.policy, e.estimator) == (policy, estimator))
    return e.ci_high - e.ci_low


@dataclass(frozen=True)
class Replicates:
    ci: dict[Key, float]
    """Share of the replicates whose normal interval covers the truth at the end."""
    cs: dict[Key, float]
    """Share of the replicates whose confidence sequence covers it at every checkpoint."""
    logging_width: list[float]
    """Per seed, the width of the logging policy's IPS interval."""


@pytest.fixture(scope="module")
def replicates() -> Replicates:
    ci, cs, width = [], [], []
    for seed in range(REPLICATES):
        log = make_log(seed, EVENTS)
        result = evaluate(log.events)
        assert result.enough
        ci.append(final_coverage(log, result))
        cs.append(sequence_coverage(log, result))
        width.append(ci_width(result, "logging", "ips"))
    return Replicates(shares(ci), shares(cs), width)


def every_key() -> list[Key]:
    values = [("value", p, e) for p in POLICIES for e in ESTIMATORS]
    return values + [("difference", p, e) for p in POLICIES[1:] for e in ESTIMATORS]


def test_normal_intervals_cover_the_truth(replicates: Replicates) -> None:
    assert sorted(replicates.ci) == sorted(every_key())
    low = {k: v for k, v in replicates.ci.items() if v < COVERAGE}
    assert not low, low
    # Nominal 95%: on average over all estimates the coverage must be near it, too.
    assert np.mean(list(replicates.ci.values())) >= 0.93


def test_confidence_sequences_cover_the_truth_at_every_checkpoint(
    replicates: Replicates,
) -> None:
    assert sorted(replicates.cs) == sorted(every_key())
    low = {k: v for k, v in replicates.cs.items() if v < COVERAGE}
    assert not low, low


def test_wrong_propensities_fail_the_coverage_bound() -> None:
    """The same logs, but the probabilities say ε = 0.1 where the actions used 0.2."""
    rows = []
    for seed in range(BROKEN_REPLICATES):
        log = make_log(seed, EVENTS, claimed_epsilon=0.1)
        rows.append(final_coverage(log, evaluate(log.events)))
    coverage = shares(rows)
    for policy in ("uniform", *TARGETS):
        assert coverage["value", policy, "ips"] < COVERAGE, policy
        assert coverage["difference", policy, "ips"] < COVERAGE, policy


def test_ignoring_the_users_fails_the_coverage_bound(replicates: Replicates) -> None:
    """The same logs with a new user id at every event: one cluster per event, so the
    standard error misses the user effect (the seeds give the same events)."""
    rows, ratio = [], []
    for seed in range(BROKEN_REPLICATES):
        log = make_log(seed, EVENTS, user_of=lambda user, i: f"user-{user}-{i}")
        result = evaluate(log.events)
        rows.append(final_coverage(log, result))
        ratio.append(ci_width(result, "logging", "ips") / replicates.logging_width[seed])
    coverage = shares(rows)
    # Measured: the per-event interval is 0.58 (0.46 … 0.73) of the clustered one.
    assert max(ratio) < 0.85
    assert np.mean(ratio) < 0.7
    for estimator in ESTIMATORS:
        assert coverage["value", "logging", estimator] < COVERAGE, estimator


def uniform_log(seed: int, events: int, users: int = 30) -> list[LoggedEvent]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(events):
        n = int(rng.integers(2, 7))
        p = np.full(n, 1.0 / n)
        out.append(
            LoggedEvent(
                user_id=f"u{rng.integers(users)}",
                ts_ms=i,
                chosen=int(rng.integers(n)),
                reward=float(rng.normal(1.0, 2.0)),
                logging_p=p,
                features=rng.normal(size=(n, 3)),
                targets={},
            )
        )
    return out


def test_ips_on_a_uniform_log_is_the_mean_reward() -> None:
    events = uniform_log(3, 500)
    evaluator = Evaluator(())
    for event in events:
        evaluator.add(event)
    result = evaluator.result()
    mean = float(np.mean([e.reward for e in events]))
    by = {(e.policy, e.estimator): e for e in result.estimates}
    for policy in ("logging", "uniform"):
        assert by[policy, "ips"].value == pytest.approx(mean, abs=1e-12)
        assert by[policy, "snips"].value == pytest.approx(mean, abs=1e-12)
        assert by[policy, "ips"].ess == pytest.approx(len(events))
    d = next(d for d in result.differences if d.policy == "uniform" and d.estimator == "ips")
    assert d.value == 0.0
    assert d.ci_low == d.ci_high == 0.0


def test_a_policy_against_itself_differs_by_exactly_zero() -> None:
    log = make_log(7, 1_000)
    copies = [
        LoggedEvent(
            e.user_id, e.ts_ms, e.chosen, e.reward, e.logging_p, e.features,
            {"logging-copy": e.logging_p.copy()},
        )
        for e in log.events
    ]  # fmt: skip
    evaluator = Evaluator(["logging-copy"])
    for event in copies:
        evaluator.add(event)
    result = evaluator.result()
    diffs = [d for d in result.differences if d.policy == "logging-copy"]
    assert [d.estimator for d in diffs] == list(ESTIMATORS)
    for d in diffs:
        for x in (d.value, d.ci_low, d.ci_high, d.cs_low, d.cs_high):
            assert abs(x) <= 1e-12, d
    by = {(e.policy, e.estimator): e for e in result.estimates}
    for estimator in ESTIMATORS:
        copy = by["logging-copy", estimator]
        assert copy == dataclasses.replace(by["logging", estimator], policy="logging-copy")
    (verdict,) = result.verdicts
    assert not verdict.decided
    assert verdict.better is None
    assert verdict.events_needed is None
    assert "too small to resolve" in verdict.text


def test_a_clear_effect_is_decided_and_a_small_one_is_not() -> None:
    log = make_log(11, 6_000)
    result = evaluate(log.events)
    verdicts = {v.policy: v for v in result.verdicts}
    assert verdicts["oracle"].decided
    assert verdicts["oracle"].better is True
    assert verdicts["oracle"].text.startswith("`oracle` is better than the logging policy by +")
    assert "(DR, 95% anytime-valid)" in verdicts["oracle"].text
    assert verdicts["other"].decided
    assert verdicts["other"].better is False
    assert "`other` is worse than the logging policy" in verdicts["other"].text
    assert result.verdict == "\n".join(verdicts[p].text for p in TARGETS)

    # greedy vs its own ε-greedy: a real but small gain, ε (V(greedy) − V(uniform)) ≈ 0.03.
    early = evaluate(log.events[:400])
    greedy = next(v for v in early.verdicts if v.policy == "greedy")
    assert not greedy.decided
    assert greedy.better is None
    assert greedy.events_needed is not None
    assert greedy.events_needed > 0
    assert f"about {greedy.events_needed} more needed" in greedy.text
    # The number solves the boundary: half-width ≤ |difference| at 400 + needed, not before.
    dr = next(d for d in early.differences if d.policy == "greedy" and d.estimator == "dr")
    rho = design_rho(10_000, 0.05)
    z = 1.959963984540054
    sd = (dr.ci_high - dr.ci_low) / (2 * z) * math.sqrt(400)  # the per-event SD, from the CI
    total = 400 + greedy.events_needed
    assert cs_half_width(sd, total, rho, 0.05) <= abs(dr.value) * (1 + 1e-9)
    assert cs_half_width(sd, total - 1, rho, 0.05) > abs(dr.value) * (1 - 1e-9)


def test_too_few_events_or_users_estimate_nothing() -> None:
    empty = Evaluator(TARGETS).result()
    assert not empty.enough
    assert empty.events == 0
    assert empty.users == 0
    assert "empty" in empty.verdict
    assert empty.estimates == ()
    assert empty.checkpoints == ()
    assert empty.verdicts == ()

    log = make_log(5, 2_000, users=4)
    tiny = evaluate(log.events[:37])
    assert not tiny.enough
    assert (tiny.events, tiny.users) == (37, len({e.user_id for e in log.events[:37]}))
    assert tiny.verdict == (
        f"too few events to evaluate: 37 rewarded decisions from {tiny.users} users; "
        "at least 200 decisions from 10 users are needed"
    )
    assert tiny.estimates == ()
    assert tiny.differences == ()
    assert tiny.checkpoints == ()
    assert tiny.verdicts == ()

    few_users = evaluate(log.events)  # 2,000 events, but from 4 users
    assert few_users.users == len({e.user_id for e in log.events}) == 4
    assert not few_users.enough
    assert few_users.estimates == ()
    assert "2000 rewarded decisions from 4 users" in few_users.verdict


def test_result_does_not_change_the_state() -> None:
    log = make_log(13, 700)
    evaluator = Evaluator(TARGETS)
    for event in log.events[:450]:
        evaluator.add(event)
    first = evaluator.result()
    assert evaluator.result() == first
    for event in log.events[450:]:
        evaluator.add(event)
    assert evaluator.result() == evaluate(log.events)
    assert first.checkpoints[-1].events == 450
    assert [c.events for c in first.checkpoints] == [100, 125, 157, 197, 247, 309, 387, 450]


def test_descriptive_numbers() -> None:
    log = make_log(17, 1_500)
    result = evaluate(log.events)
    assert (result.first_ts_ms, result.last_ts_ms) == (0, 1_000 * 1_499)
    assert result.users == len({e.user_id for e in log.events})
    assert result.propensities is not None
    assert result.propensities.edges == PROPENSITY_EDGES
    assert sum(result.propensities.counts) == 1_500
    for name in TARGETS:
        agree = np.mean([e.targets[name][e.chosen] == 1.0 for e in log.events])
        assert result.agreement[name] == pytest.approx(agree)
    assert set(result.agreement) == set(TARGETS)
    assert result.skipped == {}
    for e in result.estimates:
        assert all(math.isfinite(x) for x in (e.value, e.ci_low, e.cs_low, e.ess))
        assert e.ci_low <= e.value <= e.ci_high
        assert e.cs_low <= e.cs_high
    # A deterministic target's ESS is about the number of events on which it agreed.
    ess = {e.policy: e.ess for e in result.estimates}
    assert ess["logging"] == pytest.approx(1_500)
    assert 0.8 < ess["greedy"] / (result.agreement["greedy"] * 1_500) <= 1.0 + 1e-9


def test_memory_does_not_grow_with_events_or_users() -> None:
    log = make_log(19, 20_000, users=5_000)
    evaluator = Evaluator(TARGETS, exact_users=1_000)

    def arrays() -> dict[str, int]:
        state = {**vars(evaluator), "users": evaluator._users._registers}
        return {k: v.nbytes for k, v in state.items() if isinstance(v, np.ndarray)}

    for event in log.events[:1_000]:
        evaluator.add(event)
    small = arrays()
    for event in log.events[1_000:]:
        evaluator.add(event)
    assert arrays() == small
    assert sum(small.values()) < 400_000  # 1024 buckets × 16 sums, the Gram, 16 KiB of HLL
    assert evaluator._users.tracked_ids == 0  # the exact set was dropped at 1,000 ids
    distinct = len({e.user_id for e in log.events})
    assert evaluator.result().users == pytest.approx(distinct, rel=0.04)
    # One checkpoint per factor 1.25 of growth: logarithmic in the events.
    assert len(evaluator._checkpoints) <= math.ceil(math.log(20_000 / 100, 1.25)) + 1


def test_confidence_sequence_formula() -> None:
    alpha = 0.05
    rho = design_rho(10_000, alpha)
    assert rho == pytest.approx(10_000 / (2 * math.log(20) + math.log(1 + 2 * math.log(20))))
    # The two-sided normal mixture: |S| ≤ sqrt((V + ρ) log((V + ρ) / (ρ α²))).
    assert mixture_radius(3.0, 2.0, alpha) == pytest.approx(
        math.sqrt(5 * math.log(5 / (2 * alpha**2)))
    )
    # ρ from design_rho makes the half-width nearly the tightest at the design size.
    widths = {r: cs_half_width(1.0, 10_000, r, alpha) for r in (rho / 2, rho, rho * 2)}
    assert widths[rho] < min(widths[rho / 2], widths[rho * 2])
    # About 1.5× the fixed-N interval there: the price of looking at every checkpoint.
    assert 1.3 < widths[rho] / (1.959964 / math.sqrt(10_000)) < 1.8


def test_sequences_are_running_intersections_guarded_while_the_ess_is_small() -> None:
    log = make_log(29, 3_000)
    result = evaluate(log.events)
    seen: dict[Key, tuple[float, float]] = {}
    small_ess = 0
    for cp in result.checkpoints:
        for e in cp.estimates:
            key: Key = ("value", e.policy, e.estimator)
            if e.ess < MIN_CS_ESS:  # too few effective events: the range of the rewards
                small_ess += 1
                assert (e.cs_low, e.cs_high) == (0.0, 1.0)
            low, high = seen.get(key, (-math.inf, math.inf))
            assert low <= e.cs_low <= e.cs_high <= high  # nested: a running intersection
            seen[key] = (e.cs_low, e.cs_high)
        for d in cp.differences:
            assert -1.0 <= d.cs_low <= d.cs_high <= 1.0  # IPS itself may be outside early
    assert small_ess > 0  # `other` agrees with what was shown on few events at first


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: {"targets": {}}, "no probabilities for policy"),
        (lambda e: {"logging_p": np.full(len(e.logging_p), 0.3)}, "sum to 1"),
        (lambda e: {"features": e.features[:, :2]}, "columns"),
        (lambda e: {"chosen": len(e.logging_p)}, "outside"),
        (lambda e: {"reward": math.nan}, "finite"),
    ],
)
def test_malformed_events_are_refused(
    change: Callable[[LoggedEvent], Mapping[str, object]], message: str
) -> None:
    log = make_log(23, 3)
    evaluator = Evaluator(TARGETS)
    evaluator.add(log.events[0])
    bad = log.events[1]
    with pytest.raises(ValueError, match=message):
        evaluator.add(dataclasses.replace(bad, **change(bad)))
    assert evaluator.result() == evaluate(log.events[:1])  # the state is as it was


def test_reserved_or_repeated_names_are_refused() -> None:
    for names in (["logging"], ["uniform"], ["a", "a"], [""]):
        with pytest.raises(ValueError, match="name"):
            Evaluator(names)
