"""What `oo-serving check` holds every stored row to, as pure functions, and its report.

The service keeps invariants that the schema cannot state: a model is a state its policy
decodes and finds sound (each policy states its own rules, `Policy.problems`: finite,
symmetric, positive definite, ...); counters never go below zero; every reward is in
[-1, 1], so |cumulative_reward| ≤ reward_count; a decision chose one of the candidates it
logged, with vectors of its policy's d; its logging probabilities (`candidate_p`) are a
distribution whose value at the chosen candidate is the propensity and whose largest
value is at the policy's own choice (`greedy`); each shadow policy's choice is one of
the candidates; its reward columns agree with each other (a reward has a count, a
source and a time; a learned one, the update it was learned at). After a crash, a bad
migration or a hand-edited database, these are what would silently poison learning or
offline evaluation, so an operator (and the fault tests, after every fault) can read the
whole database and be told which rows break them.

Rewards summed (OO_REWARD_AGGREGATION=sum, `summed=True`): a decision's kept reward is
the sum of the reward_n it received, each in [-1, 1], so |reward| ≤ max(1, reward_n);
a user's cumulative_reward adds up such sums and is only required to be finite.

Nothing here touches a database: each function takes the values of one stored row (as
the driver returns them, so of any type: a corrupted SQLite row can hold text where a
blob belongs) and returns the problems found, so the checks are tested with plain
values and shared by every backend. The reads are the store's (`Store.check`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from oo_serving.core.features import Matrix
from oo_serving.core.policy import Policy
from oo_serving.core.registry import DEFAULTS

MAX_EXAMPLES = 20
"""User ids (or messages) kept per kind of violation; the count covers all of them."""

RAW_WIDTH = 4
"""Raw features per candidate in a decision's candidate_features (store.base.RAW_FEATURES)."""

# Each kind of violation and what one occurrence counts: a model row, a decision row,
# or a problem SQLite reports. The order is the order of the report.
KINDS: dict[str, str] = {
    "model_empty": "model",
    "model_not_decodable": "model",
    "model_unknown_policy": "model",
    "model_not_finite": "model",
    "model_not_symmetric": "model",
    "model_not_positive_definite": "model",
    "model_negative_count": "model",
    "model_reward_out_of_bounds": "model",
    "decision_not_decodable": "decision",
    "decision_unknown_policy": "decision",
    "decision_not_finite": "decision",
    "decision_tip_not_among_candidates": "decision",
    "decision_x_not_chosen_candidate": "decision",
    "decision_bad_propensity": "decision",
    "decision_bad_probabilities": "decision",
    "decision_bad_reward": "decision",
    "decision_without_model": "decision",
    "decision_seq_out_of_range": "decision",
    "decision_duplicate_seq": "decision",
    "decision_duplicate_event_id": "decision",
    "sqlite_integrity": "problem",
    "sqlite_unreadable": "problem",
}

MODEL_CHECKS = (
    "policy known, state decodes, the policy's rules (finite, symmetric, positive"
    " definite), counts >= 0, |cumulative_reward| <= reward_count"
)
MODEL_CHECKS_SUMMED = (
    "policy known, state decodes, the policy's rules (finite, symmetric, positive"
    " definite), counts >= 0, cumulative_reward finite (rewards summed)"
)
DECISION_CHECKS = (
    "decode, policy and d, finite, tip among candidates with its x, raw candidate"
    " features and context, propensity in (0, 1], candidate_p a distribution with"
    " the propensity at the tip and its largest value at greedy, shadow choices among"
    " the candidates, reward in [-1, 1] with its reward_n, source and learned_at"
)
DECISION_CHECKS_SUMMED = DECISION_CHECKS.replace(
    "reward in [-1, 1]", "|reward| <= max(1, reward_n) (rewards summed)"
)
PROBABILITY_SUM_TOL = 1e-9
"""How far from 1 a decision's candidate_p may sum."""
PROPENSITY_TOL = 1e-12
"""How far a decision's propensity may be from candidate_p at its tip (both are the same
float64 as logged, so in practice they are equal)."""
REWARD_SOURCES = ("client", "default")
"""A decision's reward_source when it has a reward: the client's, or the sweep's default."""
CROSS_CHECKS = "decisions without a model, seq outside 1..pulls, duplicate seq or event_id"


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken invariant of one row: its kind (a key of KINDS) and what was seen."""

    kind: str
    detail: str


def check_model(
    policy: object,
    state: object,
    state_version: object,
    pulls: object,
    reward_count: object,
    cumulative_reward: object,
    *,
    summed: bool = False,
) -> list[Problem]:
    """The problems of one user_model row; [] when it is sound.

    state: the policy's encoding (Policy.encode) of format state_version, judged by the
    policy itself (decode, then problems). state NULL is a row created but never filled
    (PostgreSQL creates the row, then fills it in the same transaction, so a committed
    one means a write path went wrong). summed: rewards are summed per decision
    (OO_REWARD_AGGREGATION=sum), so |cumulative_reward| may exceed reward_count.
    """
    problems: list[Problem] = []
    if state is None:
        problems.append(Problem("model_empty", "state is NULL: a row never filled"))
    else:
        known = DEFAULTS.get(policy) if isinstance(policy, str) else None
        if known is None:
            problems.append(Problem("model_unknown_policy", f"policy {policy!r}"))
        else:
            problems += _check_state(known, state, state_version)
    problems += _check_counters(pulls, reward_count, cumulative_reward, summed=summed)
    return problems


def check_decision(
    policy: object,
    tip_id: object,
    features: object,
    x: object,
    score: object,
    propensity: object,
    candidate_ids: object,
    candidate_x: object,
    candidate_features: object,
    context: object,
    reward: object,
    rewarded_ms: object,
    candidate_p: object,
    greedy: object,
    shadow: object,
    reward_n: object,
    learned: object,
    learned_at: object,
    reward_source: object,
    *,
    summed: bool = False,
) -> list[Problem]:
    """The problems of one decision row, its JSON columns already parsed; [] when sound.

    features: a JSON object; candidate_ids: a list of str (n ids); x: d float64 bytes, d
    the policy's; candidate_x: n*d float64 bytes in candidate_ids order;
    candidate_features: n*4 finite float64 bytes, same order; context: a JSON object
    (both NULL in a row logged before the log kept them); propensity in (0, 1].

    candidate_p: n float64 bytes, each in [0, 1], summing to 1 (± PROBABILITY_SUM_TOL),
    whose value at tip_id's index is the propensity (± PROPENSITY_TOL); greedy: an index
    of the candidates, where candidate_p is largest (under epsilon exploration the
    policy's own choice is always the likeliest); shadow: a JSON object of policy name →
    candidate index. All three are NULL in a row logged before the log kept them, and
    then not checked.

    reward: NULL (not yet rewarded: rewarded_ms and reward_source NULL, reward_n 0,
    learned false) or in [-1, 1], |reward| ≤ max(1, reward_n) when `summed`
    (OO_REWARD_AGGREGATION=sum), with rewarded_ms, reward_n ≥ 1 and a reward_source in
    REWARD_SOURCES. learned (a bool, or SQLite's 0/1) true needs learned_at, except in a
    row logged before the log kept candidate_p (the migration marked those learned
    without knowing when).
    """
    problems: list[Problem] = []
    known = DEFAULTS.get(policy) if isinstance(policy, str) else None
    if known is None:
        problems.append(Problem("decision_unknown_policy", f"policy {policy!r}"))
    if not isinstance(features, dict):
        problems.append(Problem("decision_not_decodable", "features is not a JSON object"))
    if context is not None and not isinstance(context, dict):
        problems.append(Problem("decision_not_decodable", "context is not a JSON object"))
    ids = _string_list(candidate_ids)
    if ids is None:
        problems.append(
            Problem("decision_not_decodable", "candidate_ids is not a non-empty list of strings")
        )
    if ids is not None and candidate_features is not None:
        problems += _check_candidate_features(candidate_features, len(ids))
    problems += _check_propensity(propensity)
    problems += _check_probabilities(candidate_p, greedy, shadow, ids, tip_id, propensity)
    problems += _check_reward(
        reward, rewarded_ms, reward_n, learned, learned_at, reward_source,
        logged_p=candidate_p is not None, summed=summed,
    )  # fmt: skip
    if not _is_real(score) or not math.isfinite(float(score)):
        problems.append(Problem("decision_not_finite", f"score is {score!r}"))
    x_bytes = _bytes(x)
    chosen, detail = _floats(x_bytes, "x", type_name=type(x).__name__)
    if chosen is None or x_bytes is None:
        problems.append(Problem("decision_not_decodable", detail))
        return problems
    d = chosen.size
    if known is not None and d != len(known.feature_names):
        problems.append(
            Problem(
                "decision_not_decodable",
                f"x has d = {d}, policy {known.name} has {len(known.feature_names)}",
            )
        )
        return problems
    if not np.isfinite(chosen).all():
        problems.append(Problem("decision_not_finite", "x has a non-finite value"))
    if ids is None:
        return problems
    offered_bytes = _bytes(candidate_x)
    offered, detail = _floats(
        offered_bytes, "candidate_x", len(ids) * d, type_name=type(candidate_x).__name__
    )
    if offered is None or offered_bytes is None:
        problems.append(Problem("decision_not_decodable", detail))
        return problems
    if not np.isfinite(offered).all():
        problems.append(Problem("decision_not_finite", "candidate_x has a non-finite value"))
    if tip_id not in ids:
        problems.append(
            Problem("decision_tip_not_among_candidates", f"tip_id {tip_id!r} was not offered")
        )
    else:
        # Compared as stored, byte for byte: the service logs x as a copy of that row.
        width = 8 * d
        if not any(
            ident == tip_id and offered_bytes[i * width : (i + 1) * width] == x_bytes
            for i, ident in enumerate(ids)
        ):
            problems.append(
                Problem("decision_x_not_chosen_candidate", f"x differs from {tip_id!r}'s row")
            )
    return problems


@dataclass(slots=True)
class Tally:
    """One kind of violation: how many rows, the first few user ids, the first detail."""

    count: int = 0
    detail: str = ""
    examples: list[str] = field(default_factory=list)


@dataclass(slots=True)
class CheckReport:
    """What a check read and found. Filled page by page as the store reads, so mutable.

    `integrity` is SQLite's `PRAGMA integrity_check` verdict ("ok"), None when it was not
    run (a failure is a violation instead); `skipped` names each check not made, and why;
    `summed_rewards`: rewards were held to the bounds of OO_REWARD_AGGREGATION=sum.
    """

    backend: str
    database: str
    models: int = 0
    decisions: int = 0
    integrity: str | None = None
    summed_rewards: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    violations: dict[str, Tally] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def violation_count(self) -> int:
        return sum(t.count for t in self.violations.values())

    def record(self, user_id: object, problems: Iterable[Problem], where: str = "") -> None:
        """Count each of one row's problems against its user; `where` names the row."""
        for p in problems:
            self.add(p.kind, 1, [str(user_id)], f"{where}: {p.detail}" if where else p.detail)

    def add(self, kind: str, count: int, examples: Sequence[str], detail: str = "") -> None:
        """Count `count` more violations of `kind`; keep new examples up to MAX_EXAMPLES."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind of violation {kind!r}")
        tally = self.violations.setdefault(kind, Tally())
        tally.count += count
        tally.detail = tally.detail or detail
        for example in examples:
            if len(tally.examples) >= MAX_EXAMPLES:
                break
            if example not in tally.examples:
                tally.examples.append(example)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values: what `oo-serving check --json` prints."""
        return {
            "ok": self.ok,
            "backend": self.backend,
            "database": self.database,
            "models": self.models,
            "decisions": self.decisions,
            "integrity_check": self.integrity,
            "skipped": dict(self.skipped),
            "violations": {
                kind: {
                    "count": t.count,
                    "unit": KINDS[kind],
                    "detail": t.detail,
                    "examples": list(t.examples),
                }
                for kind, t in self._ordered()
            },
        }

    def lines(self) -> list[str]:
        """The report for a terminal: what was checked, one line per kind, a summary."""
        model_checks = MODEL_CHECKS_SUMMED if self.summed_rewards else MODEL_CHECKS
        decision_checks = DECISION_CHECKS_SUMMED if self.summed_rewards else DECISION_CHECKS
        out = [
            f"oo-serving check: {self.backend} database {self.database}",
            f"checked {_plural(self.models, 'model')}: {model_checks}",
            f"checked {_plural(self.decisions, 'decision')}: {decision_checks}",
            f"checked across tables: {CROSS_CHECKS}",
        ]
        if self.integrity is not None:
            out.append(f"checked integrity_check: {self.integrity}")
        out += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        for kind, t in self._ordered():
            detail = f" ({t.detail})" if t.detail else ""
            more = ", ..." if t.count > len(t.examples) and len(t.examples) >= MAX_EXAMPLES else ""
            label = "users" if KINDS[kind] != "problem" else "first"
            examples = f"; {label}: {', '.join(t.examples)}{more}" if t.examples else ""
            out.append(f"violation {kind}: {_plural(t.count, KINDS[kind])}{detail}{examples}")
        scope = f"in {_plural(self.models, 'model')} and {_plural(self.decisions, 'decision')}"
        if self.ok:
            out.append(f"oo-serving check: OK, no violations {scope}")
        else:
            total = _plural(self.violation_count, "violation")
            out.append(
                f"oo-serving check: FAILED, {total} of {_plural(len(self.violations), 'kind')}"
                f" {scope}"
            )
        return out

    def _ordered(self) -> list[tuple[str, Tally]]:
        order = list(KINDS)
        return sorted(self.violations.items(), key=lambda item: order.index(item[0]))


# ── the pieces ───────────────────────────────────────────────────────────────


def _check_state(policy: Policy, state: object, state_version: object) -> list[Problem]:
    """A stored state as its policy reads and judges it."""
    raw = _bytes(state)
    if raw is None:
        return [Problem("model_not_decodable", f"state is {type(state).__name__}, not bytes")]
    if not _is_int(state_version):
        return [Problem("model_not_decodable", f"state_version is {state_version!r}")]
    try:
        decoded = policy.decode(raw, state_version)
    except ValueError as exc:
        return [Problem("model_not_decodable", str(exc))]
    return [Problem(rule, detail) for rule, detail in policy.problems(decoded)]


def _check_candidate_features(raw: object, n: int) -> list[Problem]:
    values, detail = _floats(
        _bytes(raw), "candidate_features", n * RAW_WIDTH, type_name=type(raw).__name__
    )
    if values is None:
        return [Problem("decision_not_decodable", detail)]
    if not np.isfinite(values).all():
        return [Problem("decision_not_decodable", "candidate_features has a non-finite value")]
    return []


def _check_counters(
    pulls: object, reward_count: object, cumulative_reward: object, *, summed: bool
) -> list[Problem]:
    problems: list[Problem] = []
    for name, value in (("pulls", pulls), ("reward_count", reward_count)):
        if not _is_int(value):
            problems.append(Problem("model_not_decodable", f"{name} is {value!r}"))
        elif value < 0:
            problems.append(Problem("model_negative_count", f"{name} is {value}"))
    if not _is_real(cumulative_reward):
        problems.append(
            Problem("model_not_decodable", f"cumulative_reward is {cumulative_reward!r}")
        )
        return problems
    total = float(cumulative_reward)
    if not math.isfinite(total):
        problems.append(Problem("model_not_finite", f"cumulative_reward is {total}"))
    elif not summed and _is_int(reward_count) and abs(total) > reward_count:
        # Exact, no tolerance: with each reward in [-1, 1], rounding (monotone) can never
        # carry a float sum of n of them past n.
        problems.append(
            Problem(
                "model_reward_out_of_bounds",
                f"cumulative_reward {total} from {reward_count} rewards",
            )
        )
    return problems


def _check_propensity(propensity: object) -> list[Problem]:
    if _is_real(propensity) and 0.0 < float(propensity) <= 1.0:
        return []
    return [Problem("decision_bad_propensity", f"propensity is {propensity!r}")]


def _check_probabilities(
    candidate_p: object,
    greedy: object,
    shadow: object,
    ids: list[str] | None,
    tip_id: object,
    propensity: object,
) -> list[Problem]:
    """decision_bad_probabilities, at most once per row: what is wrong, "; "-joined.

    Without the candidates (ids None, reported as not decodable) n is unknown: the
    lengths and the ranges of the indices are not checked.
    """
    found: list[str] = []
    n = None if ids is None else len(ids)
    p: Matrix | None = None
    if candidate_p is not None:
        values, detail = _floats(
            _bytes(candidate_p), "candidate_p", n, type_name=type(candidate_p).__name__
        )
        if values is None:
            found.append(detail)
        elif not (np.isfinite(values).all() and (values >= 0.0).all() and (values <= 1.0).all()):
            found.append("candidate_p has a value outside [0, 1]")
        elif abs(float(values.sum()) - 1.0) > PROBABILITY_SUM_TOL:
            found.append(f"candidate_p sums to {float(values.sum())!r}")
        else:
            p = values
        if p is not None and ids is not None and tip_id in ids and _is_real(propensity):
            i = ids.index(str(tip_id))
            if not abs(float(p[i]) - float(propensity)) <= PROPENSITY_TOL:
                found.append(f"propensity {propensity!r} but candidate_p[{i}] is {float(p[i])!r}")
    if greedy is not None:
        if not _is_int(greedy) or greedy < 0 or (n is not None and greedy >= n):
            found.append(f"greedy is {greedy!r}, not an index of the {n or 'logged'} candidates")
        elif p is not None and greedy < p.size and p[greedy] < p.max():
            found.append(
                f"candidate_p[greedy = {greedy}] is {float(p[greedy])!r}, below the largest,"
                f" {float(p.max())!r}"
            )
    if shadow is not None:
        if not isinstance(shadow, dict):
            found.append("shadow is not a JSON object")
        else:
            for name, index in shadow.items():
                if (
                    not isinstance(name, str)
                    or not _is_int(index)
                    or index < 0
                    or (n is not None and index >= n)
                ):
                    found.append(f"shadow {name!r} is {index!r}, not an index of the candidates")
                    break
    return [Problem("decision_bad_probabilities", "; ".join(found))] if found else []


def _check_reward(
    reward: object,
    rewarded_ms: object,
    reward_n: object,
    learned: object,
    learned_at: object,
    reward_source: object,
    *,
    logged_p: bool,
    summed: bool,
) -> list[Problem]:
    """decision_bad_reward, at most once per row: what is wrong, "; "-joined.

    logged_p: the row has candidate_p, so it was logged after the log kept learned_at.
    """
    found: list[str] = []
    count = reward_n if _is_int(reward_n) else None
    if count is None:
        found.append(f"reward_n is {reward_n!r}")
    elif count < 0:
        found.append(f"reward_n is {count}")
    is_learned: bool | None = None
    if isinstance(learned, bool):
        is_learned = learned
    elif _is_int(learned) and learned in (0, 1):  # SQLite's boolean
        is_learned = bool(learned)
    else:
        found.append(f"learned is {learned!r}")
    if learned_at is not None and not _is_int(learned_at):
        found.append(f"learned_at is {learned_at!r}")
    if reward_source is not None and reward_source not in REWARD_SOURCES:
        found.append(f"reward_source is {reward_source!r}")
    if reward is None:
        if rewarded_ms is not None:
            found.append("rewarded_ms is set without a reward")
        if count is not None and count > 0:
            found.append(f"reward_n is {count} without a reward")
        if is_learned:
            found.append("learned without a reward")
        if reward_source is not None:
            found.append(f"reward_source is {reward_source!r} without a reward")
    else:
        # Each reward received is in [-1, 1]: a sum of reward_n of them is at most
        # reward_n in absolute value, exactly (float rounding is monotone).
        bound = max(1, count) if summed and count is not None else 1
        if not _is_real(reward) or not -bound <= float(reward) <= bound:
            found.append(f"reward is {reward!r}")
        if rewarded_ms is None:
            found.append("a reward without rewarded_ms")
        if count == 0:
            found.append("a reward with reward_n 0")
        if reward_source is None:
            found.append("a reward without reward_source")
    if is_learned and learned_at is None and logged_p:
        found.append("learned without learned_at")
    return [Problem("decision_bad_reward", "; ".join(found))] if found else []


def _bytes(raw: object) -> bytes | None:
    """A blob as bytes (psycopg may hand out a memoryview); None when it is not a blob."""
    if isinstance(raw, memoryview):
        return raw.tobytes()
    return raw if isinstance(raw, bytes) else None


def _floats(
    raw: bytes | None, name: str, count: int | None = None, *, type_name: str
) -> tuple[Matrix | None, str]:
    """The float64 values in `raw`, or None and why not: not a blob, or a wrong length.

    count None: any positive number of values. The encoding is store.base.encode_array's.
    """
    if raw is None:
        return None, f"{name} is {type_name}, not bytes"
    expected = "a positive multiple of 8" if count is None else str(8 * count)
    if len(raw) % 8 or not raw or (count is not None and len(raw) != 8 * count):
        return None, f"{name} is {len(raw)} bytes, not {expected}"
    return np.frombuffer(raw, dtype="<f8"), ""


def _string_list(value: object) -> list[str] | None:
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
