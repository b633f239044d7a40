"""Totals and paired comparisons over seeds.

Every policy runs on the same seeds, so comparisons are paired: for seed s, Pₛ and Bₛ
are the total regret of the policy and of the baseline on the same draws, and the
seed-to-seed spread that both share (an easy world, a hard one) cancels.

- difference: mean of dₛ = Pₛ − Bₛ, SE = sd(d) / √n.
- relative change: R − 1 with R = P̄ / B̄ (ratio of mean totals, what "−26% regret"
  means), SE by the delta method: sd(Pₛ − R·Bₛ) / (√n · |B̄|). NaN when B̄ = 0.

sd uses n − 1; every SE is NaN with a single seed. A policy against itself gives a
difference of exactly 0 with SE exactly 0, and a relative change of exactly 0 with SE 0.
The same figures are given for the whole run and for each user's first rounds only
("cold start").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Estimate:
    """A mean over seeds and its standard error (NaN with one seed)."""

    mean: float
    se: float


@dataclass(frozen=True, slots=True)
class Comparison:
    """`policy` against `baseline` on the same seeds."""

    policy: str
    baseline: str
    difference: Estimate  # total regret, policy − baseline
    relative: Estimate  # P̄ / B̄ − 1


@dataclass(frozen=True, slots=True)
class Window:
    """Totals and comparisons over each user's first `rounds` rounds."""

    rounds: int
    total: Mapping[str, Estimate]  # per policy: total regret (all users) per seed
    versus: Mapping[str, Comparison]  # per policy, against the summary's baseline


@dataclass(frozen=True, slots=True)
class Summary:
    baseline: str
    overall: Window
    cold_start: Window


def estimate(values: Array) -> Estimate:
    """Mean of `values` (shape (n,)) and its SE, sd(values) / √n."""
    n = values.shape[0]
    if n == 0:
        raise ValueError("no values")
    mean = float(values.mean())
    se = float(values.std(ddof=1)) / math.sqrt(n) if n >= 2 else math.nan
    return Estimate(mean=mean, se=se)


def compare(policy: str, baseline: str, p: Array, b: Array) -> Comparison:
    """Paired comparison of per-seed totals `p` and `b` (shape (n,), same seeds, same order)."""
    if p.shape != b.shape or p.ndim != 1:
        raise ValueError(f"need two totals of the same shape (n,), got {p.shape}, {b.shape}")
    difference = estimate(p - b)
    b_mean = float(b.mean())
    if b_mean == 0.0:
        relative = Estimate(mean=math.nan, se=math.nan)
    else:
        ratio = float(p.mean()) / b_mean
        residual = estimate(p - ratio * b)
        relative = Estimate(mean=ratio - 1.0, se=residual.se / abs(b_mean))
    return Comparison(policy=policy, baseline=baseline, difference=difference, relative=relative)


def window(instant: Mapping[str, Array], baseline: str, rounds: int) -> Window:
    """The window of each user's first `rounds` rounds; `instant[name]` has shape (seeds, users, rounds)."""
    totals = {name: r[:, :, :rounds].sum(axis=(1, 2)) for name, r in instant.items()}
    return Window(
        rounds=rounds,
        total={name: estimate(t) for name, t in totals.items()},
        versus={name: compare(name, baseline, t, totals[baseline]) for name, t in totals.items()},
    )


def summarize(instant: Mapping[str, Array], baseline: str, cold_start_rounds: int) -> Summary:
    """Totals and comparisons against `baseline`, overall and over the cold-start window."""
    if baseline not in instant:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(instant)}")
    if cold_start_rounds < 1:
        raise ValueError(f"cold_start_rounds must be >= 1, got {cold_start_rounds}")
    rounds = next(iter(instant.values())).shape[2]
    return Summary(
        baseline=baseline,
        overall=window(instant, baseline, rounds),
        cold_start=window(instant, baseline, min(cold_start_rounds, rounds)),
    )
