"""What `oo-serving evaluate` shows: the JSON document, the terminal report and one
self-contained HTML page.

All three read the same `EvaluationResult` and show the same numbers. When the log is
too small to estimate anything (`enough` is False) they show what was read and the
verdict, which says how many events are needed, and nothing that looks like an estimate.

JSON has no NaN: every non-finite number (an interval that is still unbounded, the ESS of
no weights) is null. The page fetches nothing: its style is inline and its pictures are
PNGs inlined as base64, so it can be mailed or filed as it is. matplotlib draws them (the
`report` extra, Agg backend); it is imported only when a picture is drawn, so this module
and the rest of the command line work without it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from oo_serving.evaluation.result import (
    Difference,
    Estimate,
    EvaluationResult,
    Histogram,
    Verdict,
)
from oo_serving.sim.report import _STYLE, _finite, _html_table, require_matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["table", "to_json", "write_html"]

LOGGING = "logging"
"""The policy that chose what was shown; every difference is taken against it."""

_NA = "n/a"

_Item = TypeVar("_Item", Estimate, Difference)


# ── shared pieces ──────────────────────────────────────────────────────────────


def _level(alpha: float) -> str:
    """The coverage of the intervals as a percentage: alpha 0.05 is "95%"."""
    return f"{100.0 * (1.0 - alpha):g}%" if math.isfinite(alpha) else "?%"


def _iso(ts_ms: int | None) -> str | None:
    """A timestamp in milliseconds as ISO-8601 UTC (…Z), or None."""
    if ts_ms is None:
        return None
    moment = datetime.fromtimestamp(ts_ms / 1000.0, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(ts_ms: int) -> str:
    """A timestamp in milliseconds as a reader writes it, in UTC, to the second."""
    return datetime.fromtimestamp(ts_ms / 1000.0, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def header(result: EvaluationResult) -> str:
    """One line: how many events of how many users, over which time range (UTC)."""
    parts = [
        f"{result.events:,} event{'' if result.events == 1 else 's'}",
        f"{result.users:,} user{'' if result.users == 1 else 's'}",
    ]
    first, last = result.first_ts_ms, result.last_ts_ms
    if first is not None and last is not None:
        parts.append(f"{_when(first)} → {_when(last)} UTC")
    elif first is not None:
        parts.append(f"from {_when(first)} UTC")
    elif last is not None:
        parts.append(f"until {_when(last)} UTC")
    else:
        parts.append("no time range")
    return " · ".join(parts)


def _skipped_text(result: EvaluationResult) -> str | None:
    """`skipped: reason n, reason n`, or None when nothing was skipped."""
    if not result.skipped:
        return None
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(result.skipped.items()))
    return f"skipped (read but not evaluated): {reasons}"


def _num(value: float, *, sign: bool = False) -> str:
    """4 decimals, `n/a` when not finite."""
    if not math.isfinite(value):
        return _NA
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _interval(low: float, high: float, *, sign: bool = False) -> str:
    """[low, high] at 4 decimals; an unbounded side shows as −∞ or +∞."""

    def side(value: float, infinite: str) -> str:
        if math.isnan(value):
            return _NA
        if math.isinf(value):
            return infinite
        return _num(value, sign=sign)

    return f"[{side(low, '−∞')}, {side(high, '+∞')}]"


def _ess(value: float) -> str:
    return f"{value:,.1f}" if math.isfinite(value) else _NA


def _share(value: float) -> str:
    return f"{100.0 * value:.1f}%" if math.isfinite(value) else _NA


def estimate_rows(result: EvaluationResult) -> list[list[str]]:
    """The estimates as cells, the header row first."""
    level = _level(result.alpha)
    rows = [["policy", "estimator", "value", f"{level} CI", f"anytime {level} CS", "ESS"]]
    for e in result.estimates:
        rows.append(
            [
                e.policy,
                e.estimator,
                _num(e.value),
                _interval(e.ci_low, e.ci_high),
                _interval(e.cs_low, e.cs_high),
                _ess(e.ess),
            ]
        )
    return rows


def difference_rows(result: EvaluationResult) -> list[list[str]]:
    """The differences to the logging policy as cells, the header row first."""
    level = _level(result.alpha)
    rows = [["policy", "estimator", "difference", f"{level} CI", f"anytime {level} CS"]]
    for d in result.differences:
        rows.append(
            [
                d.policy,
                d.estimator,
                _num(d.value, sign=True),
                _interval(d.ci_low, d.ci_high, sign=True),
                _interval(d.cs_low, d.cs_high, sign=True),
            ]
        )
    return rows


def agreement_rows(result: EvaluationResult) -> list[list[str]]:
    """Per target policy, the share of events on which it chose what was shown."""
    rows = [["policy", "chose what was shown"]]
    rows += [[policy, _share(share)] for policy, share in result.agreement.items()]
    return rows


def _verdict_line(v: Verdict) -> str:
    return v.text if v.text.startswith(v.policy) else f"{v.policy}: {v.text}"


# ── JSON ───────────────────────────────────────────────────────────────────────


def _estimate_json(e: Estimate) -> dict[str, Any]:
    return {
        "policy": e.policy,
        "estimator": e.estimator,
        "value": _finite(float(e.value)),
        "ci_low": _finite(float(e.ci_low)),
        "ci_high": _finite(float(e.ci_high)),
        "ess": _finite(float(e.ess)),
        "cs_low": _finite(float(e.cs_low)),
        "cs_high": _finite(float(e.cs_high)),
    }


def _difference_json(d: Difference) -> dict[str, Any]:
    return {
        "policy": d.policy,
        "estimator": d.estimator,
        "value": _finite(float(d.value)),
        "ci_low": _finite(float(d.ci_low)),
        "ci_high": _finite(float(d.ci_high)),
        "cs_low": _finite(float(d.cs_low)),
        "cs_high": _finite(float(d.cs_high)),
    }


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {
        "policy": v.policy,
        "text": v.text,
        "decided": bool(v.decided),
        "better": None if v.better is None else bool(v.better),
        "events_needed": None if v.events_needed is None else int(v.events_needed),
    }


def to_json(result: EvaluationResult) -> dict[str, Any]:
    """The result as plain JSON values: `events`, `users`, `estimates`, `verdict` first,
    then `enough`, `alpha`, `first_ts`/`last_ts` (ISO-8601 UTC or null), `differences`,
    `verdicts`, `agreement` and `skipped`. Every non-finite number is null."""
    return {
        "events": int(result.events),
        "users": int(result.users),
        "estimates": [_estimate_json(e) for e in result.estimates],
        "verdict": result.verdict,
        "enough": bool(result.enough),
        "alpha": _finite(float(result.alpha)),
        "first_ts": _iso(result.first_ts_ms),
        "last_ts": _iso(result.last_ts_ms),
        "differences": [_difference_json(d) for d in result.differences],
        "verdicts": [_verdict_json(v) for v in result.verdicts],
        "agreement": {str(k): _finite(float(v)) for k, v in result.agreement.items()},
        "skipped": {str(k): int(v) for k, v in result.skipped.items()},
    }


# ── terminal ───────────────────────────────────────────────────────────────────


def _aligned(rows: list[list[str]], *, left: int) -> list[str]:
    """Rows as lines: the first `left` columns flush left, the others flush right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def table(result: EvaluationResult) -> str:
    """The report for a terminal: what was read; then, when there was enough of it, the
    estimates (value, interval at one look, anytime-valid sequence, ESS), the differences
    to the logging policy and each policy's agreement with the logged choices; then the
    verdict. Ends with a newline."""
    lines = [header(result)]
    skipped = _skipped_text(result)
    if skipped:
        lines.append(skipped)
    if result.enough:
        level = _level(result.alpha)
        lines += ["", "estimates (mean reward per decision):"]
        lines += _aligned(estimate_rows(result), left=2)
        if result.differences:
            lines += ["", f"difference to {LOGGING} (paired on the same events):"]
            lines += _aligned(difference_rows(result), left=2)
        if result.agreement:
            lines += ["", "agreement with the logged choices:"]
            lines += _aligned(agreement_rows(result), left=1)
        lines += [
            "",
            f"CI: {level} interval, valid at one look fixed in advance (clustered by user).",
            f"CS: anytime-valid {level} confidence sequence, valid however often one looks.",
            "ESS: effective sample size of the importance weights, (Σw)² / Σw².",
        ]
    if result.verdicts:
        lines += ["", "verdict:"]
        lines += [f"  {_verdict_line(v)}" for v in result.verdicts]
    else:
        lines += ["", f"verdict: {result.verdict}"]
    return "\n".join(lines) + "\n"


# ── pictures ───────────────────────────────────────────────────────────────────


def _figure() -> tuple[Figure, Axes]:
    """A figure on the Agg canvas (no display, no global pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.grid(True, linewidth=0.4, alpha=0.5)
    return figure, ax


def _png(figure: Figure, *, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    # No Software/date chunk: the same result draws the same bytes.
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def _nan(value: float) -> float:
    """Non-finite as NaN, which matplotlib leaves out of lines and bands."""
    return value if math.isfinite(value) else math.nan


def _series(
    result: EvaluationResult,
) -> list[tuple[int, tuple[Estimate, ...], tuple[Difference, ...]]]:
    """(events, estimates, differences) at each checkpoint; the final figures alone when
    there are no checkpoints."""
    if result.checkpoints:
        return [(c.events, c.estimates, c.differences) for c in result.checkpoints]
    return [(result.events, result.estimates, result.differences)]


def _policies(result: EvaluationResult) -> list[str]:
    """Every policy estimated, in order of first appearance, the logging policy first."""
    names = [e.policy for e in result.estimates]
    names += [e.policy for c in result.checkpoints for e in c.estimates]
    names += [d.policy for d in result.differences]
    names += [d.policy for c in result.checkpoints for d in c.differences]
    seen = dict.fromkeys(names)
    ordered = [LOGGING] if LOGGING in seen else []
    return ordered + [name for name in seen if name != LOGGING]


def _limits(ax: Axes, values: Sequence[float], *, zero: bool = False) -> None:
    """Fit the y axis to `values` (the lines and the final bands), so that the wide bands
    of the first checkpoints run off the picture instead of flattening it."""
    finite = [v for v in values if math.isfinite(v)] + ([0.0] if zero else [])
    if not finite:
        return
    low, high = min(finite), max(finite)
    pad = 0.1 * (high - low) if high > low else max(0.05 * abs(high), 0.01)
    ax.set_ylim(low - pad, high + pad)


def _plot(
    ax: Axes,
    x: list[int],
    y: list[float],
    band: tuple[list[float], list[float]] | None,
    **style: Any,
) -> None:
    """A line (a marker, when it is one point) with its band shaded in its colour."""
    marker = "o" if len(x) == 1 else None
    (line,) = ax.plot(x, y, marker=marker, linewidth=1.6, **style)
    if band is not None:
        ax.fill_between(x, band[0], band[1], color=line.get_color(), alpha=0.18, linewidth=0)


def _lookup(items: tuple[_Item, ...], policy: str, estimator: str) -> _Item | None:
    """The item of `policy` by `estimator`, if there is one."""
    for item in items:
        if item.policy == policy and item.estimator == estimator:
            return item
    return None


def estimates_png(result: EvaluationResult) -> bytes:
    """Each policy's DR estimate at each checkpoint with its anytime-valid confidence
    sequence as a band, and its IPS estimate dashed; x is the number of events."""
    figure, ax = _figure()
    series = _series(result)
    level = _level(result.alpha)
    fitted: list[float] = []
    for i, policy in enumerate(_policies(result)):
        colour = f"C{i % 10}"
        for estimator, dashed in (("dr", False), ("ips", True)):
            points = [
                (events, e)
                for events, estimates, _ in series
                if (e := _lookup(estimates, policy, estimator)) is not None
            ]
            if not points:
                continue
            x = [events for events, _ in points]
            y = [_nan(e.value) for _, e in points]
            if dashed:
                _plot(ax, x, y, None, color=colour, linestyle="--", alpha=0.7, label=None)
                continue
            band = ([_nan(e.cs_low) for _, e in points], [_nan(e.cs_high) for _, e in points])
            _plot(ax, x, y, band, color=colour, label=policy)
            fitted += [*y, band[0][-1], band[1][-1]]
    _limits(ax, fitted)
    if fitted:
        ax.legend(loc="best", fontsize=9)
    ax.set_xlabel("events")
    ax.set_ylabel("estimated mean reward per decision")
    ax.set_title(
        f"DR estimate (solid) with its anytime-valid {level} confidence sequence (band);"
        " IPS dashed",
        fontsize=10,
    )
    return _png(figure)


def differences_png(result: EvaluationResult) -> bytes:
    """Each policy's DR difference to the logging policy at each checkpoint, with its
    anytime-valid confidence sequence as a band, and the zero line."""
    figure, ax = _figure()
    series = _series(result)
    level = _level(result.alpha)
    ax.axhline(0.0, color="0.3", linewidth=1.0)
    fitted: list[float] = []
    for i, policy in enumerate(_policies(result)):
        if policy == LOGGING:
            continue
        points = [
            (events, d)
            for events, _, differences in series
            if (d := _lookup(differences, policy, "dr")) is not None
        ]
        if not points:
            continue
        x = [events for events, _ in points]
        y = [_nan(d.value) for _, d in points]
        band = ([_nan(d.cs_low) for _, d in points], [_nan(d.cs_high) for _, d in points])
        _plot(ax, x, y, band, color=f"C{i % 10}", label=policy)
        fitted += [*y, band[0][-1], band[1][-1]]
    _limits(ax, fitted, zero=True)
    ax.set_xlabel("events")
    ax.set_ylabel(f"DR value − {LOGGING}")
    ax.set_title(
        f"difference to {LOGGING} with its anytime-valid {level} confidence sequence:"
        " decided once the band leaves 0",
        fontsize=10,
    )
    if fitted:
        ax.legend(loc="best", fontsize=9)
    return _png(figure)


def propensities_png(histogram: Histogram) -> bytes:
    """The histogram of the logged choices' propensities."""
    figure, ax = _figure()
    ax.stairs(histogram.counts, histogram.edges, fill=True, color="C0", alpha=0.8)
    ax.set_xlabel("propensity of the shown candidate (logging policy)")
    ax.set_ylabel("events")
    ax.set_title(
        "propensities of the logged choices: small ones make large importance weights",
        fontsize=10,
    )
    return _png(figure)


# ── page ───────────────────────────────────────────────────────────────────────

_PAGE_STYLE = (
    _STYLE
    + """
.verdict { font-size: 1.15rem; font-weight: 600; background: #f5f5f5;
  border-left: 4px solid #444; padding: 0.75rem 1rem; margin: 1rem 0; }
ul.verdicts { margin-top: 0; }
"""
)

_HOW_TO_READ = (
    "<b>IPS</b> (inverse propensity scoring) reweights each logged reward by how much"
    " more (or less) likely the policy was to choose what was shown than the logging"
    " policy was: unbiased, but noisy when propensities are small."
    " <b>SNIPS</b> divides by the sum of those weights instead of the number of events:"
    " a little bias for much less noise."
    " <b>DR</b> (doubly robust) starts from a model of the reward and uses the weights"
    " only to correct its error on the shown candidate: unbiased if either the"
    " propensities or the model are right, and usually the least noisy."
    " The <b>CI</b> is a normal interval with the standard error clustered by user; it is"
    " valid when read once, at a size fixed in advance. The <b>anytime-valid CS</b>"
    " (confidence sequence) is wider but stays valid however often you look, so it is the"
    " one to watch while the log grows and the one the verdict uses."
    " <b>ESS</b> (effective sample size, (Σw)² / Σw²) is how many events of the logging"
    " policy the weighted log is worth: far below the number of events means a few large"
    " weights carry the estimate."
)


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def page(result: EvaluationResult, pictures: Sequence[str], *, command: str | None) -> str:
    """The page's HTML: `pictures` are ready <img> elements (empty when none are drawn)."""
    e = html.escape
    level = _level(result.alpha)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>Off-policy evaluation</title>",
        f"<style>{_PAGE_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>Off-policy evaluation of the decision log</h1>",
        f"<p>{e(header(result))}</p>",
    ]
    skipped = _skipped_text(result)
    if skipped:
        parts.append(f'<p class="note">{e(skipped)}</p>')
    if result.verdicts:
        lines = "<br>".join(e(_verdict_line(v)) for v in result.verdicts)
        parts.append(f'<p class="verdict">{lines}</p>')
    else:
        parts.append(f'<p class="verdict">{e(result.verdict)}</p>')
    if command:
        parts += ["<p>Produced by:</p>", f"<pre>{e(command)}</pre>"]
    if not result.enough:
        parts.append(
            "<p>The log is too small to estimate anything yet: this page shows no"
            " estimates and no pictures. The verdict above says how many events are"
            " needed.</p>"
        )
    else:
        if pictures:
            parts += ["<h2>Estimates over time</h2>", pictures[0]]
        parts += [
            f"<h2>Estimates (mean reward per decision, {e(level)} intervals)</h2>",
            _html_table(estimate_rows(result)),
        ]
        if len(pictures) > 1:
            parts += [f"<h2>Difference to {LOGGING} over time</h2>", pictures[1]]
        if result.differences:
            parts += [
                f"<h2>Difference to {LOGGING} (paired on the same events)</h2>",
                _html_table(difference_rows(result)),
            ]
        if result.agreement:
            parts += [
                "<h2>Agreement with the logged choices</h2>",
                _html_table(agreement_rows(result)),
            ]
        if len(pictures) > 2:
            parts += ["<h2>Propensities</h2>", pictures[2]]
        elif result.propensities is None:
            parts.append('<p class="note">No propensity histogram in this result.</p>')
    parts += [
        "<h2>How to read this</h2>",
        f'<p class="note">{_HOW_TO_READ}</p>',
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(result: EvaluationResult, path: Path, *, command: str | None = None) -> None:
    """Write the report to `path` as one self-contained page: the header, the verdict,
    the command line (if given), the tables, the pictures (estimates and differences over
    the checkpoints, propensity histogram) and how to read them.

    When `enough` is False the page says so and has no tables or pictures, and needs no
    matplotlib. Otherwise a RuntimeError (ReportUnavailable) naming the `report` extra is
    raised, before anything is written, when matplotlib is not installed.
    """
    pictures: list[str] = []
    if result.enough:
        require_matplotlib()
        pictures.append(
            _image(estimates_png(result), "estimates over the events, one line per policy")
        )
        pictures.append(_image(differences_png(result), f"difference to {LOGGING} over the events"))
        if result.propensities is not None:
            pictures.append(
                _image(propensities_png(result.propensities), "histogram of the propensities")
            )
    path.write_text(page(result, pictures, command=command), encoding="utf-8")
