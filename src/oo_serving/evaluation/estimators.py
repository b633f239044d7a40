"""Off-policy values of target policies from the decision log, in one streaming pass.

Each logged decision i shows candidate aᵢ out of nᵢ, drawn by the logging policy μ with
the recorded probabilities μ(·|xᵢ), and earns the reward rᵢ. A target policy π is any
other rule giving probabilities π(·|xᵢ) over the same candidates. Its value is the mean
reward per decision it would have earned, V(π) = E_x Σ_a π(a|x) E[r | x, a]. With the
importance weight wᵢ = π(aᵢ|xᵢ) / μ(aᵢ|xᵢ) (finite because μ(aᵢ|xᵢ) > 0):

    IPS    V̂ = (1/N) Σᵢ wᵢ rᵢ                  unbiased, E[w r | x] = Σ_a π(a|x) E[r|x,a]
    SNIPS  V̂ = Σᵢ wᵢ rᵢ / Σᵢ wᵢ                 consistent (E[w|x] = 1); smaller variance
    DR     V̂ = (1/N) Σᵢ [Σ_a π(a|xᵢ) q̂ᵢ(xᵢ,a) + wᵢ (rᵢ − q̂ᵢ(xᵢ,aᵢ))]

The doubly robust (DR) term is unbiased for Σ_a π(a|xᵢ) E[r|xᵢ,a] whatever q̂ᵢ is, as
long as q̂ᵢ does not depend on rᵢ; a good q̂ only lowers the variance. Here q̂ᵢ is a ridge
regression of reward on the chosen candidate's `features` row plus an intercept, fitted
on events 1..i−1 only (progressive validation): every event is predicted by a model that
never saw it, the model slice and the evaluated event are disjoint, and the DR terms
minus their conditional means form a martingale difference sequence, which is what the
confidence sequence below needs. The ridge keeps A⁻¹ = (λI + Σ x xᵀ)⁻¹ current with the
Sherman–Morrison identity (O(d²) per event, d = k + 1; the intercept is penalised like
the rest, negligible after a few events) and rebuilds it from A every 4096 events so
rounding does not accumulate. q̂ is clipped to the range of the rewards seen so far.

The effective sample size of the weights is ESS = (Σ w)² / Σ w²: N when π = μ, and
about the number of events on which π agrees with what was shown when π is
deterministic.

Differences against the logging policy are paired on the same events: the IPS and DR
difference terms are the per-event differences (wᵢ − 1) rᵢ and DRᵢ(π) − DRᵢ(μ); SNIPS,
a ratio, is linearised (delta method) into ψᵢ(π) − ψᵢ(μ) with
ψᵢ = (wᵢ rᵢ − V̂ wᵢ) / w̄.

Standard errors are clustered by user. Each user id is hashed (blake2b, stable across
runs and processes) into one of B buckets; a bucket is a union of whole users, so buckets
are independent clusters even when a user's rewards are correlated. For a mean of terms
tᵢ with value t̄, with S_b the sum of the terms in bucket b, n_b its count, and G the
number of non-empty buckets,

    Var(t̄) = G/(G−1) · Σ_b (S_b − t̄ n_b)² / N²

(the CR1 small-sample factor G/(G−1)). Every estimate and difference is a linear
combination c of per-event quantities y = (1, w r, w, DR) per policy, so one Gram matrix
M = Σ_b y_b y_bᵀ of the bucket sums gives them all as cᵀ M c / N². Adding δ to bucket b
changes M by (y_b + δ/2) δᵀ + δ (y_b + δ/2)ᵀ: O(1) per event, so the variance is
available at any time without a pass over the buckets.

`ci_*` is the normal interval V̂ ± z_{1−α/2} · SE, valid at one look fixed in advance.
`cs_*` is an asymptotic confidence sequence (Waudby-Smith, Arbour, Sinha, Kennedy &
Ramdas 2021, "Time-uniform central limit theory and asymptotic confidence sequences"),
valid however often one looks. It applies the two-sided normal-mixture boundary of
Robbins (Howard, Ramdas, McAuliffe & Sekhon 2021) to the centred sum S_N with the
empirical variance process V_N = N σ̂²:

    |S_N| ≤ sqrt((V_N + ρ σ̂²) · log((V_N + ρ σ̂²) / (ρ σ̂² α²)))

so the half-width for the mean is  σ̂ · sqrt((N + ρ) · log((N + ρ) / (ρ α²))) / N,  with
σ̂² = N · Var(t̄) the clustered per-event variance. The mixture is exp(λ S − λ² V / 2)
integrated over λ ~ N(0, 1/(ρ σ̂²)), whose crossing of 1/α is the boundary above.
ρ, in events, makes the boundary tightest near N* = `cs_design_events`:

    ρ = N* / (2 log(1/α) + log(1 + 2 log(1/α)))

(the closed form of Waudby-Smith et al.; the exact minimiser u = N*/ρ solves
u = 2 log(1/α) + log(1 + u), of which this is the first iterate). Any intersection of
confidence sequences is one, so every interval reported is the running intersection of
the sequence over the checkpoints so far (running max of lows, running min of highs).
Should that intersection ever be empty (probability at most α when the assumptions
hold), the current interval is reported and the intersection restarts from it.

Short logs. Both intervals rest on a central limit theorem, which is slow for
importance-weighted terms when large weights are rare: early on, the events that carry
them may not have happened yet, or happened with low rewards, and then the estimate and
its variance are too small together (as with a Wald interval for a rare Poisson count).
Two guards, both vanishing as the log grows:

- the variance of every term weighted by π is multiplied by max(1, Σᵢ E[wᵢ²|xᵢ] / Σᵢ wᵢ²),
  where E[w²|x] = Σ_a π(a|x)² / μ(a|x) is known exactly from the logged probabilities:
  when fewer large weights were realised than expected, the variance is raised by the
  shortfall. The ratio tends to 1 by the law of large numbers, so the asymptotic validity
  is unchanged;
- while π's ESS is below MIN_CS_ESS (100), its confidence sequences are the range of the
  rewards seen, [r_min, r_max] for values and ±(r_max − r_min) for differences; later
  they are clipped to that range. This assumes rewards lie within the range seen (true
  for 0/1 rewards once both have been seen).

A target that gives probability 0 to every candidate shown so far (Σ w = 0) has no
estimates at all: the log says nothing about it, and SNIPS would be 0/0.

Memory does not grow with the log: the state is O(B · m + m² + k²) floats for
m = 1 + 3 × (number of policies), plus a 16 KiB HyperLogLog and an exact set of user
ids up to `exact_users` ids (after which the set is dropped and the distinct-user count
is the HyperLogLog estimate, relative standard error 1.04/√16384 ≈ 0.8%), plus one
checkpoint per factor `checkpoint_growth` of growth (logarithmic in the events).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from oo_serving.evaluation.result import (
    ESTIMATORS,
    Checkpoint,
    Difference,
    Estimate,
    EvaluationResult,
    Histogram,
    Verdict,
)

__all__ = [
    "LOGGING",
    "PROPENSITY_EDGES",
    "UNIFORM",
    "Evaluator",
    "LoggedEvent",
    "cs_half_width",
    "design_rho",
    "events_to_resolve",
    "mixture_radius",
]

Vector = npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float64]

LOGGING = "logging"
"""The target π = μ: the logging policy itself, evaluated on its own log."""
UNIFORM = "uniform"
"""The target π(a|x) = 1/n: every candidate equally likely."""

PROPENSITY_EDGES: tuple[float, ...] = (0.0, *(10.0 ** (i / 5.0 - 4.0) for i in range(21)))
"""Bins of the logged propensity μ(a|x): [0, 1e-4), then 20 log-spaced bins, five per
decade, from 1e-4 to 1 (the last one closed at 1). Log-spaced because the small
propensities are the ones that make importance weights large."""

PROBABILITY_TOLERANCE = 1e-6
"""How far from 1 a probability vector's sum may be (rounding in the logging code)."""
RIDGE_REFRESH_EVENTS = 4096
"""Every this many events the ridge inverse is recomputed from A (drops rounding)."""
HLL_BITS = 14
"""HyperLogLog registers: 2¹⁴, relative standard error 1.04 / 2⁷ ≈ 0.8%."""
MIN_CS_ESS = 100.0
"""Below this effective sample size a policy's confidence sequence is the reward range."""
RESOLVE_FACTOR = 1000
"""A difference needing more than this many times the events so far is "too small"."""


@dataclass(frozen=True, slots=True, eq=False)
class LoggedEvent:
    """One logged decision with its reward, as the evaluator reads it.

    chosen: index of the candidate shown. logging_p: shape (n,), the logging policy's
    probability of showing each candidate (sums to 1, logging_p[chosen] > 0). features:
    shape (n, k), each candidate's vector for the DR reward model (k fixed per run).
    targets: policy name → shape (n,) probabilities of that target policy.
    """

    user_id: str
    ts_ms: int
    chosen: int
    reward: float
    logging_p: np.ndarray
    features: np.ndarray
    targets: Mapping[str, np.ndarray]


def design_rho(design_events: int, alpha: float) -> float:
    """ρ (in events) that makes the normal-mixture boundary tightest near design_events.

    ρ = N* / (2 log(1/α) + log(1 + 2 log(1/α))), Waudby-Smith et al. (2021).
    """
    two_log = 2.0 * math.log(1.0 / alpha)
    return design_events / (two_log + math.log1p(two_log))


def mixture_radius(v: float, rho: float, alpha: float) -> float:
    """The two-sided normal-mixture boundary sqrt((v + ρ) · log((v + ρ) / (ρ α²))).

    With probability ≥ 1 − α a martingale S with variance process V stays below it in
    absolute value at every time (Howard et al. 2021). v and ρ in the same units.
    """
    total = v + rho
    return math.sqrt(total * math.log(total / (rho * alpha * alpha)))


def cs_half_width(sd: float, events: int, rho: float, alpha: float) -> float:
    """Half-width of the confidence sequence for a mean of `events` terms whose per-event
    standard deviation is sd: sd · sqrt((N + ρ) log((N + ρ) / (ρ α²))) / N."""
    return sd * mixture_radius(float(events), rho, alpha) / events


def events_to_resolve(
    difference: float, sd: float, events: int, rho: float, alpha: float
) -> int | None:
    """How many more events the confidence sequence needs to exclude 0, if the difference
    and the per-event standard deviation stay what they are.

    The smallest T with cs_half_width(sd, T) ≤ |difference|, minus `events` (at least 1);
    the half-width decreases in T, so bisection finds it. None when |difference| is ~0
    or T would exceed RESOLVE_FACTOR × events.
    """
    target = abs(difference)
    if not target > 1e-12 or not math.isfinite(sd):
        return None
    events = max(events, 1)
    limit = RESOLVE_FACTOR * events
    if cs_half_width(sd, limit, rho, alpha) > target:
        return None
    lo, hi = events, limit  # half-width(lo) may already be ≤ target: then 1 more
    if cs_half_width(sd, lo, rho, alpha) <= target:
        return 1
    while hi - lo > 1:  # invariant: half-width(lo) > target ≥ half-width(hi)
        mid = (lo + hi) // 2
        if cs_half_width(sd, mid, rho, alpha) <= target:
            hi = mid
        else:
            lo = mid
    return hi - events


class _DistinctUsers:
    """Distinct user ids, exact up to `exact` ids, then a HyperLogLog estimate.

    The HyperLogLog (Flajolet et al. 2007) keeps, per register j (the top 14 bits of a
    64-bit hash), the largest M_j = position of the first 1-bit among the remaining 50
    bits; the estimate is α_m m² / Σ_j 2^(−M_j), with linear counting m log(m / V) while
    at most 2.5 m are expected (V = empty registers). It is fed from the first event so
    the switch loses nothing.
    """

    __slots__ = ("_exact", "_ids", "_registers")

    def __init__(self, exact: int) -> None:
        self._exact = exact
        self._ids: set[str] | None = set()
        self._registers = np.zeros(1 << HLL_BITS, dtype=np.uint8)

    def add(self, user_id: str, hash64: int) -> None:
        index = hash64 >> (64 - HLL_BITS)
        rest = hash64 & ((1 << (64 - HLL_BITS)) - 1)
        rank = (64 - HLL_BITS) - rest.bit_length() + 1
        if rank > self._registers[index]:
            self._registers[index] = rank
        if self._ids is not None:
            self._ids.add(user_id)
            if len(self._ids) > self._exact:
                self._ids = None

    @property
    def tracked_ids(self) -> int:
        """How many ids the exact set holds now (0 once dropped)."""
        return 0 if self._ids is None else len(self._ids)

    def count(self) -> int:
        if self._ids is not None:
            return len(self._ids)
        m = float(self._registers.size)
        alpha_m = 0.7213 / (1.0 + 1.079 / m)
        estimate = alpha_m * m * m / float(np.sum(np.ldexp(1.0, -self._registers.astype(np.int32))))
        empty = int(np.count_nonzero(self._registers == 0))
        if estimate <= 2.5 * m and empty > 0:
            estimate = m * math.log(m / empty)
        return round(estimate)


@dataclass(slots=True)
class _Interval:
    """A running intersection of confidence-sequence intervals."""

    low: float
    high: float


def _intersect(previous: _Interval | None, low: float, high: float) -> _Interval:
    if previous is None:
        return _Interval(low, high)
    new_low, new_high = max(previous.low, low), min(previous.high, high)
    if new_low > new_high:  # the sequence has been contradicted: restart from now
        return _Interval(low, high)
    return _Interval(new_low, new_high)


class Evaluator:
    """IPS, SNIPS and DR values of target policies, with clustered confidence intervals
    and anytime-valid confidence sequences, from one pass over the log.

    policies: the names of the caller's target policies; every event's `targets` carries
    each of them (extra keys are ignored). `logging` and `uniform` are always evaluated
    too. Feed events in the order they happened with `add`; `result` summarises what has
    been added so far without changing the state, so it may be called at any time.
    alpha: 1 − the level of every interval. buckets: B, the user clusters. ridge: λ of
    the DR reward model. min_events, min_users: below either, `result` estimates nothing.
    A checkpoint is recorded at first_checkpoint events and then at every growth by a
    factor checkpoint_growth. cs_design_events: N*, where the confidence sequence is
    tightest. exact_users: how many distinct user ids are counted exactly before the
    HyperLogLog estimate takes over.
    """

    def __init__(
        self,
        policies: Sequence[str],
        *,
        alpha: float = 0.05,
        buckets: int = 1024,
        ridge: float = 1.0,
        min_events: int = 200,
        min_users: int = 10,
        checkpoint_growth: float = 1.25,
        first_checkpoint: int = 100,
        cs_design_events: int = 10_000,
        exact_users: int = 100_000,
    ) -> None:
        names = tuple(policies)
        for name in names:
            if not name or name in (LOGGING, UNIFORM):
                raise ValueError(f"target policy name {name!r} is empty or reserved")
        if len(set(names)) != len(names):
            raise ValueError(f"target policy names repeat: {names!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2, got {buckets!r}")
        if not (math.isfinite(ridge) and ridge > 0.0):
            raise ValueError(f"ridge must be finite and > 0, got {ridge!r}")
        if min_events < 1 or min_users < 1 or first_checkpoint < 1 or cs_design_events < 1:
            raise ValueError(
                "min_events, min_users, first_checkpoint, cs_design_events must be >= 1"
            )
        if not (math.isfinite(checkpoint_growth) and checkpoint_growth > 1.0):
            raise ValueError(f"checkpoint_growth must be > 1, got {checkpoint_growth!r}")
        if exact_users < 0:
            raise ValueError(f"exact_users must be >= 0, got {exact_users!r}")

        self.policies: tuple[str, ...] = (LOGGING, UNIFORM, *names)
        self.alpha = alpha
        self.min_events = min_events
        self.min_users = min_users
        self._targets = names
        self._buckets = buckets
        self._ridge = ridge
        self._growth = checkpoint_growth
        self._z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
        self._rho = design_rho(cs_design_events, alpha)

        J = len(self.policies)
        m = 1 + 3 * J  # (count, w r per policy, w per policy, DR term per policy)
        self._J = J
        self._bucket_sums: Matrix = np.zeros((buckets, m))
        self._gram: Matrix = np.zeros((m, m))
        self._totals: Vector = np.zeros(m)
        self._sum_w2: Vector = np.zeros(J)
        self._sum_expected_w2: Vector = np.zeros(J)
        self._delta: Vector = np.zeros(m)
        self._clusters = 0
        self._agree = np.zeros(len(names), dtype=np.int64)
        self._propensity_counts = np.zeros(len(PROPENSITY_EDGES) - 1, dtype=np.int64)
        self._users = _DistinctUsers(exact_users)

        self._k: int | None = None
        self._A: Matrix = np.zeros((0, 0))
        self._A_inv: Matrix = np.zeros((0, 0))
        self._b: Vector = np.zeros(0)
        self._theta: Vector = np.zeros(0)
        self._reward_low = math.inf
        self._reward_high = -math.inf

        self._events = 0
        self._first_ts: int | None = None
        self._last_ts: int | None = None
        self._next_checkpoint = first_checkpoint
        self._checkpoints: list[Checkpoint] = []
        self._intervals: dict[tuple[str, str, str], _Interval] = {}

    # --- one event ---------------------------------------------------------------------

    def add(self, event: LoggedEvent) -> None:
        """Fold one event into the state; O(m² + k²) time, no per-event storage.

        Raises ValueError, leaving the state unchanged, when the event is malformed.
        """
        P, X, a, r, ts = self._validated(event)
        n = P.shape[1]
        mu = P[0]
        p_chosen = float(mu[a])
        if self._k is None:
            self._start_ridge(X.shape[1])

        # The reward model's predictions use only the events before this one.
        X1 = np.empty((n, X.shape[1] + 1))
        X1[:, 0] = 1.0
        X1[:, 1:] = X
        q = X1 @ self._theta
        if self._reward_low <= self._reward_high:
            q = q.clip(self._reward_low, self._reward_high)
        w = P[:, a] / p_chosen
        dr = P @ q + w * (r - q[a])

        J = self._J
        delta = self._delta
        delta[0] = 1.0
        np.multiply(w, r, out=delta[1 : 1 + J])
        delta[1 + J : 1 + 2 * J] = w
        delta[1 + 2 * J :] = dr

        digest = hashlib.blake2b(event.user_id.encode("utf-8"), digest_size=16).digest()
        self._users.add(event.user_id, int.from_bytes(digest[:8], "little"))
        sums = self._bucket_sums[int.from_bytes(digest[8:], "little") % self._buckets]
        if sums[0] == 0.0:
            self._clusters += 1
        # M += (y + δ/2) δᵀ + δ (y + δ/2)ᵀ  =  (y + δ)(y + δ)ᵀ − y yᵀ
        update = (sums + 0.5 * delta)[:, None] * delta[None, :]
        self._gram += update
        self._gram += update.T
        sums += delta
        self._totals += delta
        self._sum_w2 += w * w
        if mu.min() > 0.0:  # E[w² | x] = Σ_a π(a|x)² / μ(a|x), over μ's support
            self._sum_expected_w2 += (P * P) @ (1.0 / mu)
        else:
            support = mu > 0.0
            self._sum_expected_w2 += (P[:, support] ** 2) @ (1.0 / mu[support])

        if J > 2:
            targets = P[2:]
            self._agree += targets[:, a] >= targets.max(axis=1)
        bin_index = bisect.bisect_right(PROPENSITY_EDGES, p_chosen) - 1
        self._propensity_counts[min(bin_index, self._propensity_counts.size - 1)] += 1

        self._update_ridge(X1[a], r)

        self._events += 1
        self._first_ts = ts if self._first_ts is None else min(self._first_ts, ts)
        self._last_ts = ts if self._last_ts is None else max(self._last_ts, ts)
        if self._events >= self._next_checkpoint:
            self._next_checkpoint = max(
                self._events + 1, math.ceil(self._next_checkpoint * self._growth)
            )
            if self._clusters >= 2:
                checkpoint, self._intervals = self._checkpoint(self._intervals)
                self._checkpoints.append(checkpoint)

    def _validated(self, event: LoggedEvent) -> tuple[Matrix, Matrix, int, float, int]:
        """(P, features, chosen, reward, ts_ms): P has shape (policies, n), row 0 the
        logging policy, row 1 uniform, then the targets in the order given at construction."""
        if not isinstance(event.user_id, str):
            raise ValueError(f"user_id must be a string, got {event.user_id!r}")
        ts = int(event.ts_ms)
        mu = np.asarray(event.logging_p, dtype=np.float64)
        if mu.ndim != 1 or mu.size < 1:
            raise ValueError(f"logging_p must have shape (n,), got {mu.shape}")
        n = mu.size
        a = int(event.chosen)
        if not 0 <= a < n:
            raise ValueError(f"chosen={a} is outside the {n} candidates")
        r = float(event.reward)
        if not math.isfinite(r):
            raise ValueError(f"reward must be finite, got {event.reward!r}")
        X = np.asarray(event.features, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != n:
            raise ValueError(f"features must have shape ({n}, k), got {X.shape}")
        if self._k is not None and X.shape[1] != self._k:
            raise ValueError(f"features have {X.shape[1]} columns, earlier events {self._k}")
        if not math.isfinite(float(X.sum())):  # a NaN or an infinity makes the sum one
            raise ValueError("features must be finite")

        P = np.empty((self._J, n))
        P[0] = mu
        P[1] = 1.0 / n
        for row, name in enumerate(self._targets, start=2):
            try:
                target = event.targets[name]
            except KeyError:
                raise ValueError(f"the event has no probabilities for policy {name!r}") from None
            if np.shape(target) != (n,):
                raise ValueError(f"{name!r} probabilities must have shape ({n},)")
            P[row] = target
        # NaN fails both comparisons, so this also rejects non-finite probabilities.
        if not (P.min() >= 0.0 and (np.abs(P.sum(axis=1) - 1.0) <= PROBABILITY_TOLERANCE).all()):
            raise ValueError("every probability vector must be >= 0 and sum to 1")
        if not mu[a] > 0.0:
            raise ValueError("logging_p[chosen] must be > 0")
        return P, X, a, r, ts

    def _start_ridge(self, k: int) -> None:
        d = k + 1
        self._k = k
        self._A = self._ridge * np.identity(d)
        self._A_inv = np.identity(d) / self._ridge
        self._b = np.zeros(d)
        self._theta = np.zeros(d)

    def _update_ridge(self, x: Vector, r: float) -> None:
        """A += x xᵀ, b += r x, θ = A⁻¹ b, with A⁻¹ by Sherman–Morrison."""
        self._A += x[:, None] * x[None, :]
        self._b += r * x
        if (self._events + 1) % RIDGE_REFRESH_EVENTS == 0:
            self._A_inv = np.asarray(np.linalg.inv(self._A), dtype=np.float64)
        else:
            Ax = self._A_inv @ x
            self._A_inv -= (Ax[:, None] * Ax[None, :]) / (1.0 + float(x @ Ax))
        self._theta = self._A_inv @ self._b
        self._reward_low = min(self._reward_low, r)
        self._reward_high = max(self._reward_high, r)

    # --- estimates at the current state ------------------------------------------------

    def _inflation(self, j: int) -> float:
        """max(1, Σ E[w²|x] / Σ w²) for policy j (Σ w² > 0): see "Short logs" above."""
        return max(1.0, float(self._sum_expected_w2[j] / self._sum_w2[j]))

    def _spread(self, c: Vector, j: int) -> tuple[float, float]:
        """(SE of the mean, per-event SD) of the linear combination c of bucket sums, for
        terms weighted by policy j's importance weights."""
        n = float(self._events)
        g = self._clusters
        ss = max(float(c @ self._gram @ c), 0.0) * g / (g - 1) * self._inflation(j)
        return math.sqrt(ss) / n, math.sqrt(ss / n)

    def _checkpoint(
        self, intervals: Mapping[tuple[str, str, str], _Interval]
    ) -> tuple[Checkpoint, dict[tuple[str, str, str], _Interval]]:
        """The estimates now, and the running intersections updated with them."""
        J, N = self._J, float(self._events)
        T = self._totals
        m = T.size
        updated = dict(intervals)

        reward_span = self._reward_high - self._reward_low

        def interval(
            key: tuple[str, str, str], value: float, c: Vector, j: int, ess: float
        ) -> tuple[float, float, float, float]:
            se, sd = self._spread(c, j)
            ci = self._z * se
            if key[0] == "value":
                floor, ceiling = self._reward_low, self._reward_high
            else:
                floor, ceiling = -reward_span, reward_span
            if ess < MIN_CS_ESS:
                low, high = floor, ceiling
            else:
                cs = cs_half_width(sd, self._events, self._rho, self.alpha)
                low, high = max(value - cs, floor), min(value + cs, ceiling)
            kept = _intersect(updated.get(key), low, high)
            updated[key] = kept
            return value - ci, value + ci, kept.low, kept.high

        def unit(index: int) -> Vector:
            e = np.zeros(m)
            e[index] = 1.0
            return e

        # Per policy: (value, c) of IPS, SNIPS and DR, c being the centred combination whose
        # bucket sums give the variance. None when Σw = 0: π never gave positive probability
        # to a candidate that was shown, so the log holds nothing about it.
        count = unit(0)
        terms: list[tuple[tuple[float, Vector], ...] | None] = []
        for j in range(J):
            A, W, D = 1 + j, 1 + J + j, 1 + 2 * J + j
            if not T[W] > 0.0:
                terms.append(None)
                continue
            ips, dr, snips = float(T[A] / N), float(T[D] / N), float(T[A] / T[W])
            terms.append(
                (
                    (ips, unit(A) - ips * count),
                    (snips, (unit(A) - snips * unit(W)) * (N / T[W])),
                    (dr, unit(D) - dr * count),
                )
            )

        estimates: list[Estimate] = []
        differences: list[Difference] = []
        base = terms[0]  # the logging policy: w = 1, always defined
        assert base is not None
        for j, policy in enumerate(self.policies):
            own = terms[j]
            if own is None:
                continue
            w_sum, w2_sum = T[1 + J + j], self._sum_w2[j]
            ess = float(w_sum * w_sum / w2_sum)
            for estimator, (value, c) in zip(ESTIMATORS, own, strict=True):
                lo, hi, cs_lo, cs_hi = interval(("value", policy, estimator), value, c, j, ess)
                estimates.append(Estimate(policy, estimator, value, lo, hi, cs_lo, cs_hi, ess))
            if j == 0:
                continue
            for estimator, (value, c), (base_value, base_c) in zip(
                ESTIMATORS, own, base, strict=True
            ):
                # Paired per event: (t(π) − v̂(π)) − (t(μ) − v̂(μ)), or ψ(π) − ψ(μ) for SNIPS.
                key = ("difference", policy, estimator)
                bounds = interval(key, value - base_value, c - base_c, j, ess)
                differences.append(Difference(policy, estimator, value - base_value, *bounds))

        ts = self._last_ts if self._last_ts is not None else 0
        checkpoint = Checkpoint(ts, self._events, tuple(estimates), tuple(differences))
        return checkpoint, updated

    # --- the summary -------------------------------------------------------------------

    def result(self) -> EvaluationResult:
        """Everything found so far; the state is left as it was."""
        events, users = self._events, self._users.count()
        if events == 0:
            return EvaluationResult(
                events=0,
                users=0,
                alpha=self.alpha,
                enough=False,
                verdict="the log is empty: there are no rewarded decisions to evaluate",
            )
        described = EvaluationResult(
            events=events,
            users=users,
            alpha=self.alpha,
            enough=False,
            verdict="",
            first_ts_ms=self._first_ts,
            last_ts_ms=self._last_ts,
            propensities=Histogram(
                edges=PROPENSITY_EDGES,
                counts=tuple(int(c) for c in self._propensity_counts),
            ),
            agreement={
                name: float(self._agree[i]) / events for i, name in enumerate(self._targets)
            },
        )
        if events < self.min_events or users < self.min_users:
            verdict = (
                f"too few events to evaluate: {events} rewarded decisions from {users} "
                f"users; at least {self.min_events} decisions from {self.min_users} users "
                "are needed"
            )
            return replace(described, verdict=verdict)
        if self._clusters < 2:
            verdict = (
                f"all {users} users fell into one cluster: the clustered variance needs "
                "at least two; use more buckets"
            )
            return replace(described, verdict=verdict)

        checkpoints = list(self._checkpoints)
        if checkpoints and checkpoints[-1].events == events:
            final = checkpoints[-1]
        else:
            final, _ = self._checkpoint(self._intervals)
            checkpoints.append(final)
        verdicts = tuple(self._verdict(final, name) for name in self._targets)
        if verdicts:
            verdict = "\n".join(v.text for v in verdicts)
        else:
            verdict = (
                f"evaluated {events} decisions from {users} users; no target policy "
                "besides the logging policy and uniform was given"
            )
        return replace(
            described,
            enough=True,
            verdict=verdict,
            estimates=final.estimates,
            differences=final.differences,
            checkpoints=tuple(checkpoints),
            verdicts=verdicts,
        )

    def _verdict(self, final: Checkpoint, policy: str) -> Verdict:
        """Decide on the DR difference's confidence sequence (running intersection)."""
        diff = next(d for d in final.differences if d.policy == policy and d.estimator == "dr")
        level = f"{100.0 * (1.0 - self.alpha):g}%"
        interval = f"[{diff.cs_low:+.4f}, {diff.cs_high:+.4f}]"
        if diff.cs_low > 0.0 or diff.cs_high < 0.0:
            better = diff.cs_low > 0.0
            word = "better" if better else "worse"
            text = (
                f"`{policy}` is {word} than the logging policy by {diff.value:+.4f} "
                f"{interval} (DR, {level} anytime-valid)"
            )
            return Verdict(policy, text, decided=True, better=better, events_needed=None)
        j = self.policies.index(policy)
        J = self._J
        c = np.zeros(self._totals.size)
        c[1 + 2 * J + j], c[1 + 2 * J], c[0] = 1.0, -1.0, -diff.value
        _, sd = self._spread(c, j)
        needed = events_to_resolve(diff.value, sd, self._events, self._rho, self.alpha)
        head = f"not enough events to tell whether `{policy}` beats the logging policy"
        tail = f"(DR difference {diff.value:+.4f} {interval}, {level} anytime-valid)"
        if needed is None:
            text = (
                f"{head}: the difference is too small to resolve with up to "
                f"{RESOLVE_FACTOR}× the events so far {tail}"
            )
        else:
            text = f"{head}: about {needed} more needed {tail}"
        return Verdict(policy, text, decided=False, better=None, events_needed=needed)
