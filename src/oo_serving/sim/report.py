"""What a run is shown as: the terminal table, the summary JSON, the regret curves (PNG)
and one self-contained HTML page.

Every figure is a mean over seeds with its standard error, and every comparison is
paired against the baseline (summary.py), so that a reader can tell a difference from
seed-to-seed noise. The page carries its own picture (inlined as base64), the settings
and the command line that reproduces it, and fetches nothing: it can be mailed or filed
as it is, and still reads the same years later.

matplotlib is an optional dependency (the `report` extra): it is imported only when a
picture is drawn, with the Agg backend (no display needed), so the rest of this module,
the runner and the command line work without it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from oo_serving.sim.runner import RunResult
from oo_serving.sim.scenarios import PRESETS, Scenario
from oo_serving.sim.summary import Array, Comparison, Estimate, Summary

INSTALL_HINT = "pip install 'oo-serving[report]'"


class ReportUnavailable(RuntimeError):
    """matplotlib, which drawing needs, is not installed."""


def require_matplotlib() -> None:
    """ReportUnavailable, saying what to install, unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ReportUnavailable(
            f"drawing the report needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from exc


# ── figures ────────────────────────────────────────────────────────────────────


def curve(result: RunResult, policy: str) -> tuple[Array, Array]:
    """Cumulative regret per round (summed over users): mean over seeds and its SE, shape
    (rounds,) each; the SE is NaN with one seed."""
    per_seed = result.cumulative[policy]  # (seeds, rounds)
    mean: Array = per_seed.mean(axis=0)
    n = per_seed.shape[0]
    se: Array = (
        per_seed.std(axis=0, ddof=1) / math.sqrt(n) if n >= 2 else np.full(mean.shape, math.nan)
    )
    return mean, se


def scenario_changes(scenario: Scenario) -> dict[str, Any]:
    """The settings in which `scenario` differs from its preset, users and rounds aside."""
    base = PRESETS.get(scenario.name)
    if base is None:
        return {f.name: getattr(scenario, f.name) for f in fields(scenario) if f.name != "name"}
    return {
        f.name: getattr(scenario, f.name)
        for f in fields(scenario)
        if f.name not in ("name", "users", "rounds")
        and getattr(scenario, f.name) != getattr(base, f.name)
    }


def number(value: float) -> str:
    """A setting as written on a command line: 1000000, not 1e+06; 0.99, not 0.9900."""
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    return repr(value)


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(number(v) for v in value)
    if isinstance(value, float | int):
        return number(value)
    return str(value)


def settings_text(settings: Mapping[str, Any]) -> str:
    """`key=value, key=value`, or `none` for no settings."""
    return ", ".join(f"{k}={_value(v)}" for k, v in settings.items()) or "none"


def _absolute(e: Estimate) -> str:
    if math.isnan(e.mean):
        return "n/a"
    return f"{e.mean:.1f}" if math.isnan(e.se) else f"{e.mean:.1f} ± {e.se:.1f}"


def _relative(c: Comparison) -> str:
    r = c.relative
    if math.isnan(r.mean):
        return "n/a"
    if math.isnan(r.se):
        return f"{100 * r.mean:+.1f}%"
    return f"{100 * r.mean:+.1f}% ± {100 * r.se:.1f}%"


def header(result: RunResult) -> str:
    """One line: what was run."""
    s = result.scenario
    changes = scenario_changes(s)
    scenario = f"{s.name} ({settings_text(changes)})" if changes else s.name
    seeds = ",".join(str(seed) for seed in result.seeds)
    return (
        f"scenario {scenario} · {s.users} users × {s.rounds} rounds · seeds {seeds}"
        f" · arrival {result.arrival} · refresh every {result.refresh_every}"
        f" reward{'' if result.refresh_every == 1 else 's'}"
        f" · ignored tips: {result.ignored}"
    )


def table_rows(result: RunResult, summary: Summary) -> list[list[str]]:
    """The table as cells, the header row first."""
    base = summary.baseline
    cold = summary.cold_start.rounds
    rows = [
        [
            "policy",
            "total regret",
            f"vs {base}",
            f"first {cold} rounds",
            f"vs {base} (first {cold})",
        ]
    ]
    for name in result.policies:
        is_base = name == base
        rows.append(
            [
                name,
                _absolute(summary.overall.total[name]),
                "baseline" if is_base else _relative(summary.overall.versus[name]),
                _absolute(summary.cold_start.total[name]),
                "baseline" if is_base else _relative(summary.cold_start.versus[name]),
            ]
        )
    return rows


def table(result: RunResult, summary: Summary | None = None) -> list[str]:
    """The terminal table: what was run, then per policy its total regret (mean ± SE over
    seeds) and its relative change against the baseline (± paired SE), over the whole
    run and over each user's first rounds; then each policy's settings."""
    summary = result.summary if summary is None else summary
    rows = table_rows(result, summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [header(result), ""]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(
        "regret: pseudo-regret in utility units, summed over users, mean ± SE over seeds;"
        " vs: relative change of the mean total, ± paired SE."
    )
    lines.append("settings:")
    for name in result.policies:
        lines.append(f"  {name.ljust(widths[0])}  {settings_text(result.settings[name])}")
    return lines


# ── summary JSON ───────────────────────────────────────────────────────────────


def _finite(value: float) -> float | None:
    """JSON has no NaN: an SE of one seed, or a change against a zero baseline, is null."""
    return value if math.isfinite(value) else None


def _estimate(e: Estimate) -> dict[str, float | None]:
    return {"mean": _finite(e.mean), "se": _finite(e.se)}


def _comparison(c: Comparison) -> dict[str, dict[str, float | None]]:
    return {"difference": _estimate(c.difference), "relative": _estimate(c.relative)}


def summary_json(
    result: RunResult, *, command: str | None = None, summary: Summary | None = None
) -> dict[str, Any]:
    """Everything the table and the picture show, as plain JSON values (NaN as null)."""
    summary = result.summary if summary is None else summary
    scenario = {
        k: list(v) if isinstance(v, tuple) else v for k, v in asdict(result.scenario).items()
    }
    policies: dict[str, Any] = {}
    for name in result.policies:
        mean, se = curve(result, name)
        policies[name] = {
            "settings": dict(result.settings[name]),
            "total": _estimate(summary.overall.total[name]),
            "versus_baseline": _comparison(summary.overall.versus[name]),
            "cold_start": {
                "total": _estimate(summary.cold_start.total[name]),
                "versus_baseline": _comparison(summary.cold_start.versus[name]),
            },
            "cumulative_regret": {
                "mean": [_finite(float(v)) for v in mean],
                "se": [_finite(float(v)) for v in se],
            },
        }
    return {
        "scenario": result.scenario.name,
        "scenario_settings": scenario,
        "scenario_changes": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in scenario_changes(result.scenario).items()
        },
        "users": result.scenario.users,
        "rounds": result.scenario.rounds,
        "seeds": list(result.seeds),
        "arrival": result.arrival,
        "refresh_every": result.refresh_every,
        "ignored": result.ignored,
        "baseline": summary.baseline,
        "cold_start_rounds": summary.cold_start.rounds,
        "command": command,
        "policies": policies,
    }


# ── picture and page ───────────────────────────────────────────────────────────


def regret_png(result: RunResult, *, dpi: int = 110) -> bytes:
    """The regret curves as PNG bytes: cumulative regret per round, summed over users,
    mean over seeds with a ±1 SE band, one line per policy."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = result.scenario
    figure = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend: no display, no global pyplot state
    ax = figure.add_subplot()
    rounds = np.arange(1, s.rounds + 1)
    for name in result.policies:
        mean, se = curve(result, name)
        (line,) = ax.plot(rounds, mean, label=name, linewidth=1.6)
        if not np.isnan(se).all():
            ax.fill_between(rounds, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    cold = result.summary.cold_start.rounds
    if cold < s.rounds:
        ax.axvline(cold, color="0.6", linestyle=":", linewidth=1.0, label=f"first {cold} rounds")
    ax.set_xlabel("round (each user's)")
    ax.set_ylabel("cumulative regret, summed over users")
    ax.set_title(
        f"{s.name}: {s.users} users × {s.rounds} rounds, {len(result.seeds)} seeds,"
        f" arrival {result.arrival}\nmean over seeds, band ±1 SE",
        fontsize=10,
    )
    ax.set_xlim(1, s.rounds)
    ax.set_ylim(bottom=0.0)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(loc="upper left", fontsize=9)
    buffer = io.BytesIO()
    # No Software/date chunk: the same run draws the same bytes.
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.75rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f5f5f5; padding: 0.75rem; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9rem; }
"""


def _html_table(rows: list[list[str]]) -> str:
    head, *body = rows
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def report_html(result: RunResult, png: bytes, *, command: str | None = None) -> str:
    """One page, fetching nothing: the picture inlined, the table, the settings and the
    command line that reproduces the run."""
    s = result.scenario
    e = html.escape
    picture = base64.b64encode(png).decode("ascii")
    run_rows = [
        ["setting", "value"],
        ["scenario", s.name],
        ["users", str(s.users)],
        ["rounds", str(s.rounds)],
        ["seeds", ",".join(str(seed) for seed in result.seeds)],
        ["arrival", result.arrival],
        ["refresh every (learned rewards)", str(result.refresh_every)],
        ["ignored tips", result.ignored],
        ["baseline", result.summary.baseline],
        ["cold-start window (rounds)", str(result.summary.cold_start.rounds)],
    ]
    scenario_rows = [["scenario setting", "value"]] + [
        [f.name, _value(getattr(s, f.name))] for f in fields(s) if f.name != "name"
    ]
    policy_rows = [["policy", "settings"]] + [
        [name, settings_text(result.settings[name])] for name in result.policies
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>Simulation: {e(s.name)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>Simulated regret: {e(s.name)}</h1>",
        f"<p>{e(header(result))}</p>",
    ]
    if command:
        parts += ["<p>Reproduce with:</p>", f"<pre>{e(command)}</pre>"]
    parts += [
        f'<img alt="cumulative regret per round, one line per policy" src="data:image/png;base64,{picture}">',
        "<h2>Regret</h2>",
        _html_table(table_rows(result, result.summary)),
        '<p class="note">Pseudo-regret in utility units (best candidate\'s expected'
        " response minus the shown one's), summed over users; mean ± standard error over"
        " seeds. Changes are relative to the baseline's mean total, with the paired"
        " standard error (every policy runs on the same draws). The picture's bands are"
        " each policy's own standard error, which includes the seed-to-seed spread that"
        " pairing cancels: curves whose bands overlap can still differ clearly.</p>",
        "<h2>Policies</h2>",
        _html_table(policy_rows),
        "<h2>Run</h2>",
        _html_table(run_rows),
        "<h2>Scenario</h2>",
        _html_table(scenario_rows),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def write(result: RunResult, folder: Path, *, command: str | None = None) -> list[Path]:
    """Write folder/summary.json, folder/regret.png and folder/report.html (making the
    folder if needed); the paths written. ReportUnavailable before anything is written
    when matplotlib is missing."""
    require_matplotlib()
    png = regret_png(result)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "summary.json", folder / "regret.png", folder / "report.html"]
    summary = json.dumps(summary_json(result, command=command), indent=2, allow_nan=False)
    paths[0].write_text(summary + "\n", encoding="utf-8")
    paths[1].write_bytes(png)
    paths[2].write_text(report_html(result, png, command=command), encoding="utf-8")
    return paths
