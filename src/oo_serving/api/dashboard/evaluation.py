"""The latest saved `oo-serving evaluate` result (evaluation/saved.py), read back into
plain values for the page.

The body is JSON from the database: it is read field by field and anything of the wrong
type counts as absent, so a result saved by another release shows what it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oo_serving.store.base import SavedReport

LOGGING = "logging"
"""The policy that ran (exploration included); differences are taken against it."""


@dataclass(frozen=True, slots=True)
class IntervalRow:
    """An estimate (or a difference to logging) with its two intervals; a None bound is
    unbounded (or unknown)."""

    policy: str
    estimator: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    cs_low: float | None
    cs_high: float | None
    ess: float | None = None


@dataclass(frozen=True, slots=True)
class VerdictRow:
    policy: str
    text: str
    decided: bool
    better: bool | None


@dataclass(frozen=True, slots=True)
class EvaluationView:
    created_ms: int
    command: str | None
    since: str | None
    until: str | None
    events: int
    users: int
    enough: bool
    alpha: float | None
    first_ts: str | None
    last_ts: str | None
    verdict: str
    verdicts: tuple[VerdictRow, ...]
    estimates: tuple[IntervalRow, ...]
    differences: tuple[IntervalRow, ...]
    skipped: tuple[tuple[str, int], ...]

    @property
    def level(self) -> str:
        """The intervals' coverage, e.g. "95%"."""
        return "95%" if self.alpha is None else f"{100.0 * (1.0 - self.alpha):g}%"

    def estimate(self, policy: str, estimator: str) -> IntervalRow | None:
        return _find(self.estimates, policy, estimator)

    def difference(self, policy: str, estimator: str) -> IntervalRow | None:
        return _find(self.differences, policy, estimator)

    @property
    def policies(self) -> tuple[str, ...]:
        """Every policy estimated, logging first, in the result's order."""
        names = list(dict.fromkeys(e.policy for e in self.estimates))
        ordered = [LOGGING] if LOGGING in names else []
        return tuple(ordered + [n for n in names if n != LOGGING])


def evaluation_view(report: SavedReport | None) -> tuple[EvaluationView | None, str | None]:
    """The view of a saved evaluation, or (None, why) if it cannot be read; (None, None)
    when there is none."""
    if report is None:
        return None, None
    body = report.body if isinstance(report.body, dict) else {}
    result = body.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("verdict"), str):
        return None, f"the saved evaluation #{report.id} has no result this release can read"
    view = EvaluationView(
        created_ms=report.created_ms,
        command=_text(body.get("command")),
        since=_text(body.get("since")),
        until=_text(body.get("until")),
        events=_int(result.get("events")),
        users=_int(result.get("users")),
        enough=result.get("enough") is True,
        alpha=_number(result.get("alpha")),
        first_ts=_text(result.get("first_ts")),
        last_ts=_text(result.get("last_ts")),
        verdict=str(result["verdict"]),
        verdicts=tuple(_verdicts(result.get("verdicts"))),
        estimates=tuple(_intervals(result.get("estimates"))),
        differences=tuple(_intervals(result.get("differences"))),
        skipped=tuple(
            (str(k), _int(v)) for k, v in sorted(_mapping(result.get("skipped")).items())
        ),
    )
    return view, None


def _find(rows: tuple[IntervalRow, ...], policy: str, estimator: str) -> IntervalRow | None:
    for row in rows:
        if row.policy == policy and row.estimator == estimator:
            return row
    return None


def _intervals(items: Any) -> list[IntervalRow]:
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        rows.append(
            IntervalRow(
                policy=str(item.get("policy", "?")),
                estimator=str(item.get("estimator", "?")),
                value=_number(item.get("value")),
                ci_low=_number(item.get("ci_low")),
                ci_high=_number(item.get("ci_high")),
                cs_low=_number(item.get("cs_low")),
                cs_high=_number(item.get("cs_high")),
                ess=_number(item.get("ess")),
            )
        )
    return rows


def _verdicts(items: Any) -> list[VerdictRow]:
    rows = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            better = item.get("better")
            rows.append(
                VerdictRow(
                    policy=str(item.get("policy", "?")),
                    text=item["text"],
                    decided=item.get("decided") is True,
                    better=better if isinstance(better, bool) else None,
                )
            )
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
