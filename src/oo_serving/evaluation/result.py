"""What `oo-serving evaluate` finds: plain values, rendered by render.py.

Every interval is two-sided at level 1 - alpha. `ci_*` is the normal interval whose
standard error is clustered by user (valid at one look, fixed in advance); `cs_*` is the
anytime-valid confidence sequence at this point (valid however often one looks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ESTIMATORS = ("ips", "snips", "dr")
"""Inverse propensity scoring, its self-normalised form, and doubly robust."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The estimated value (mean reward per decision) of `policy` by `estimator`.

    ess: the effective sample size of the importance weights, (Σw)² / Σw².
    """

    policy: str
    estimator: str
    value: float
    ci_low: float
    ci_high: float
    cs_low: float
    cs_high: float
    ess: float


@dataclass(frozen=True, slots=True)
class Difference:
    """value(policy) − value(logging), paired on the same events."""

    policy: str
    estimator: str
    value: float
    ci_low: float
    ci_high: float
    cs_low: float
    cs_high: float


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The estimates over the events up to and including ts_ms (the first `events`)."""

    ts_ms: int
    events: int
    estimates: tuple[Estimate, ...]
    differences: tuple[Difference, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the log says about one policy against the logging policy.

    decided: the confidence sequence of the DR difference excludes 0; better: its sign
    (None when undecided); events_needed: when undecided, about how many more events the
    sequence needs to exclude 0 if the difference stays what it is now (None: decided,
    or the difference is too small to be resolved at any reasonable size).
    """

    policy: str
    text: str
    decided: bool
    better: bool | None
    events_needed: int | None


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of values in [edges[i], edges[i+1]); len(edges) == len(counts) + 1."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EvaluationResult:
    """enough: False when the log is too small to estimate anything; then `estimates`,
    `differences` and `checkpoints` are empty and `verdict` says how many events are
    needed. agreement: per target policy, the share of events on which it chose what
    was shown."""

    events: int
    users: int
    alpha: float
    enough: bool
    verdict: str
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    estimates: tuple[Estimate, ...] = ()
    differences: tuple[Difference, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    verdicts: tuple[Verdict, ...] = ()
    propensities: Histogram | None = None
    agreement: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Decisions read but not evaluated, by reason (e.g. "no_reward", "no_candidates")."""
