"""Render the measurements of bench/run.py as docs/benchmarks.md, and judge the targets.

The targets compare contenders measured in the same run (ratios), never figures from
different runs: the machine is shared, and only what ran side by side is comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

Cells = dict[tuple[str, str, int, int], dict[str, Any]]

# Ours on SQLite with one setting changed from the defaults (name: label, OO_* settings);
# measured on /score with 2 workers, next to "sqlite" (linucb-v1), and judged against it.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "sqlite-v2": ("linucb-v2", {"OO_POLICY": "linucb-v2"}),
    "sqlite-epsilon": ("epsilon 0.1", {"OO_EXPLORATION": "epsilon:0.1"}),
    "sqlite-shadow": ("linucb-v2 as shadow", {"OO_SHADOW_POLICIES": "linucb-v2"}),
}
CONTENDERS = ("sqlite", "postgres", "prototype", "before")  # the HTTP tables' columns
LABEL = {
    "sqlite": "ours, SQLite",
    "postgres": "ours, PostgreSQL",
    "prototype": "prototype",
    "before": "ours before, SQLite",
    **{name: f"ours, SQLite, {label}" for name, (label, _) in VARIANTS.items()},
}
OURS = ("sqlite", "postgres", *VARIANTS)  # the contenders the zero-error target covers
WORKERS = 2  # the HTTP targets' worker count
SCALE_KEY = "SQLite, 1,000,000 users"  # the scale run the memory and latency targets read


@dataclass(frozen=True)
class Target:
    goal: str
    measured: str
    verdict: str

    @property
    def met(self) -> bool:
        return self.verdict == "met"


def _cell(cells: Cells, who: str, endpoint: str, workers: int, c: int) -> dict[str, Any] | None:
    return cells.get((who, endpoint, workers, c))


def _rps(cells: Cells, who: str, endpoint: str, c: int, workers: int = WORKERS) -> float | None:
    cell = _cell(cells, who, endpoint, workers, c)
    return cell["rps"] if cell else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "n/a"


def _errors(cell: dict[str, Any]) -> int:
    return int(cell["non2xx"] + cell["socket_errors"])


def _verdict(value: float | None, goal: float, op: str, unit: str = "") -> str:
    """`met`, or by how much the goal was missed: as a factor when far, else a percentage,
    or in `unit` when the goal is an absolute amount."""
    if value is None:
        return "not measured"
    if {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]:
        return "met"
    if unit:
        return f"missed by {abs(value - goal):.1f} {unit}"
    if op == ">=" and value <= 0:
        return "missed"
    gap = goal / value if op == ">=" else value / goal
    word = "short" if op == ">=" else "over"
    return f"missed: {gap:.1f}× {word}" if gap >= 1.5 else f"missed: {100 * (gap - 1):.0f}% {word}"


def _pairs(pairs: list[tuple[int, float | None, float | None]], goal: float) -> tuple[str, str]:
    """Ratios a ÷ b at several concurrencies: the measured text, and the worst one's verdict."""
    parts, ratios = [], []
    for c, a, b in pairs:
        if a and b:
            ratios.append(a / b)
            parts.append(f"c={c}: {a / b:.2f}× ({a:,.0f} vs {b:,.0f})")
        else:
            parts.append(f"c={c}: n/a")
    verdict = _verdict(min(ratios) if ratios else None, goal, ">=")
    if ratios and len(ratios) < len(pairs):
        verdict += " (partly measured)"
    return "; ".join(parts), verdict


def _vs_prototype(cells: Cells, who: str, c: int, goal: float) -> Target:
    ours, proto = _rps(cells, who, "score", c), _rps(cells, "prototype", "score", c)
    ratio = ours / proto if ours and proto else None
    store = "SQLite" if who == "sqlite" else "PostgreSQL, same machine"
    return Target(
        f"/score at c={c}: ≥ {goal:g}× the prototype's requests/s ({store})",
        f"{ratio:.2f}× ({ours:,.0f} vs {proto:,.0f})" if ratio and ours and proto else "n/a",
        _verdict(ratio, goal, ">="),
    )


def _zero_errors(cells: Cells) -> Target:
    ours = {k: v for k, v in cells.items() if k[0] in OURS}
    bad = sorted(((k, _errors(v)) for k, v in ours.items() if _errors(v)), key=lambda e: -e[1])
    total = sum(n for _, n in bad)
    if not ours:
        measured = "n/a"
    elif not bad:
        measured = f"0 in {len(ours)} cells"
    else:
        worst = ", ".join(
            f"{LABEL[w]}, /{e}, {n} worker{'s' if n > 1 else ''}, c={c}: {k}"
            for (w, e, n, c), k in bad[:3]
        )
        measured = f"{total:,} in {len(bad)} of {len(ours)} cells ({worst})"
    return Target(
        "0 errors (non-2xx + socket errors) for ours, in every cell of ours in this run",
        measured,
        ("met" if not bad else f"missed: {total:,} errors") if ours else "not measured",
    )


def targets(
    cells: Cells, micro: dict[str, float], scale: dict[str, dict[str, Any]]
) -> list[Target]:
    out = [
        _vs_prototype(cells, "sqlite", 64, 5.0),
        _vs_prototype(cells, "sqlite", 16, 3.0),
    ]
    cell = _cell(cells, "sqlite", "score", WORKERS, 16)
    p99 = cell["p99_ms"] if cell else None
    out.append(
        Target(
            "/score p99 at c=16 ≤ 20 ms (SQLite)",
            f"{p99:.1f} ms" if p99 is not None else "n/a",
            _verdict(p99, 20, "<="),
        )
    )
    out.append(_zero_errors(cells))
    out.append(_vs_prototype(cells, "postgres", 64, 2.0))
    measured, verdict = _pairs(
        [
            (c, _rps(cells, "sqlite", "reward", c), _rps(cells, "sqlite", "score", c))
            for c in (16, 64)
        ],
        1.0,
    )
    out.append(
        Target("/reward at least as fast as /score (SQLite; reward ÷ score)", measured, verdict)
    )
    for name, (label, settings) in VARIANTS.items():
        setting = ", ".join(f"{k}={v}" for k, v in settings.items())
        measured, verdict = _pairs(
            [
                (c, _rps(cells, name, "score", c), _rps(cells, "sqlite", "score", c))
                for c in (16, 64)
            ],
            0.8,
        )
        out.append(
            Target(
                f"/score with {label} (`{setting}`) within 20% of linucb-v1's requests/s"
                " (SQLite; ÷ linucb-v1)",
                measured,
                verdict,
            )
        )
    out += _scale_targets(scale.get(SCALE_KEY, {}))
    choose = micro.get("choose among 10: ours")
    update = micro.get("one update: ours (Sherman–Morrison)")
    out += [
        Target(
            "core: choose among 10 < 20 µs",
            f"{choose:.1f} µs" if choose is not None else "n/a",
            _verdict(choose, 20, "<"),
        ),
        Target(
            "core: one update < 10 µs",
            f"{update:.1f} µs" if update is not None else "n/a",
            _verdict(update, 10, "<"),
        ),
    ]
    return out


def _scale_targets(s: dict[str, Any]) -> list[Target]:
    goal_rss = "worker memory flat (< 10 MB growth) from 1,000 to 1,000,000 users (SQLite, RSS of both workers)"
    goal_p50 = "/score p50 at 1,000,000 users ≤ 1.2 × p50 at 1,000 users (SQLite, c=16)"
    if not s:
        return [Target(goal_rss, "n/a", "not measured"), Target(goal_p50, "n/a", "not measured")]
    out = []
    if "rss_all_mb" in s:
        growth = s["rss_all_mb"] - s["rss_1k_mb"]
        users, touched = s.get("users", 0), s.get("touched", 0)
        verdict = _verdict(growth, 10, "<", unit="MB")
        if verdict == "met" and touched < users:
            verdict = f"not judged: only {touched:,} of {users:,} users touched"
        out.append(
            Target(
                goal_rss,
                f"{growth:+.1f} MB ({s['rss_1k_mb']:.0f} → {s['rss_all_mb']:.0f} MB),"
                f" {touched:,} of {users:,} users touched",
                verdict,
            )
        )
    else:
        out.append(Target(goal_rss, "n/a", "not measured"))
    drift = s["p50_many"] / s["p50_1k"]
    out.append(
        Target(
            goal_p50,
            f"{drift:.2f}× ({s['p50_1k']:.1f} → {s['p50_many']:.1f} ms)",
            _verdict(drift, 1.2, "<="),
        )
    )
    return out


def _present(cells: Cells, names: tuple[str, ...]) -> tuple[list[int], list[str], list[int]]:
    """The worker counts, endpoints and concurrencies measured for these contenders."""
    keys = [k for k in cells if k[0] in names]
    endpoints = [e for e in ("score", "reward", "health") if any(k[1] == e for k in keys)]
    return sorted({k[2] for k in keys}), endpoints, sorted({k[3] for k in keys})


def _http_tables(cells: Cells) -> list[str]:
    out: list[str] = []
    present = [w for w in CONTENDERS if any(k[0] == w for k in cells)]
    all_workers, endpoints, concurrency = _present(cells, CONTENDERS)
    for workers in all_workers:
        out += [f"### {workers} worker{'s' if workers > 1 else ''}", ""]
        head = "| endpoint | c |" + "".join(
            f" {LABEL[w]}: req/s | p50 | p99 | p99.9 | errors |" for w in present
        )
        head += " SQLite ÷ prototype | PostgreSQL ÷ prototype |"
        if "before" in present:
            head += " SQLite ÷ before |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for endpoint in endpoints:
            for c in concurrency:
                row = f"| /{endpoint} | {c} |"
                for w in present:
                    cell = _cell(cells, w, endpoint, workers, c)
                    if cell is None:
                        row += " | | | | |"
                        continue
                    row += (
                        f" {cell['rps']:,.0f} | {cell['p50_ms']:.1f} ms | {cell['p99_ms']:.1f} ms"
                        f" | {cell['p999_ms']:.1f} ms | {_errors(cell)} |"
                    )
                proto = _rps(cells, "prototype", endpoint, c, workers)
                for w in ("sqlite", "postgres"):
                    row += f" {_ratio(_rps(cells, w, endpoint, c, workers), proto)} |"
                if "before" in present:
                    now, before = (
                        _rps(cells, w, endpoint, c, workers) for w in ("sqlite", "before")
                    )
                    row += f" {_ratio(now, before)} |"
                out.append(row)
        out.append("")
        share = []
        for w in ("sqlite", "postgres"):
            for c in (16, 64):
                score = _cell(cells, w, "score", workers, c)
                health = _cell(cells, w, "health", workers, c)
                if score and health:
                    share.append(f"{LABEL[w]} c={c}: {100 * score['rps'] / health['rps']:.0f}%")
        if share:
            out += [
                f"For information, our /score ÷ our /health ({workers} worker"
                f"{'s' if workers > 1 else ''}): " + "; ".join(share) + ".",
                "",
            ]
    return out + _variant_table(cells)


def _variant_table(cells: Cells) -> list[str]:
    present = [v for v in VARIANTS if any(k[0] == v for k in cells)]
    if not present:
        return []
    all_workers, _, concurrency = _present(cells, tuple(present))
    out = [
        "### Policy variants (/score, SQLite)",
        "",
        "Ours on SQLite with one setting changed from the defaults, in the same cells as"
        " linucb-v1 (the default policy, the *ours, SQLite* column above): "
        + "; ".join(
            f"*{VARIANTS[v][0]}*: `{', '.join(f'{k}={x}' for k, x in VARIANTS[v][1].items())}`"
            for v in present
        )
        + ".",
        "",
    ]
    head = "| workers | c | linucb-v1: req/s | p99 |" + "".join(
        f" {VARIANTS[v][0]}: req/s | p99 | errors | ÷ linucb-v1 |" for v in present
    )
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for workers in all_workers:
        for c in concurrency:
            base = _cell(cells, "sqlite", "score", workers, c)
            row = f"| {workers} | {c} |"
            row += f" {base['rps']:,.0f} | {base['p99_ms']:.1f} ms |" if base else " | |"
            for v in present:
                cell = _cell(cells, v, "score", workers, c)
                if cell is None:
                    row += " | | | |"
                    continue
                row += (
                    f" {cell['rps']:,.0f} | {cell['p99_ms']:.1f} ms | {_errors(cell)} |"
                    f" {_ratio(cell['rps'], base['rps'] if base else None)} |"
                )
            out.append(row)
    return [*out, ""]


def _headline(cells: Cells, judged: list[Target]) -> list[str]:
    score = _cell(cells, "sqlite", "score", WORKERS, 64)
    proto = _cell(cells, "prototype", "score", WORKERS, 64)
    if not (score and proto):
        return []
    at16 = _ratio(_rps(cells, "sqlite", "score", 16), _rps(cells, "prototype", "score", 16))
    pg = _ratio(_rps(cells, "postgres", "score", 64), _rps(cells, "prototype", "score", 64))
    p99 = _cell(cells, "sqlite", "score", WORKERS, 16)
    ours_errors = sum(_errors(v) for k, v in cells.items() if k[0] in OURS)
    proto_errors = sum(_errors(v) for k, v in cells.items() if k[0] == "prototype")
    measured = [t for t in judged if t.verdict != "not measured"]
    return [
        f"**Headline:** with its default settings (request log on), 2 workers, 10 candidates"
        f" and 1,000 users, ours on SQLite served **{score['rps'] / proto['rps']:.2f}×** the"
        f" prototype's `/score` requests per second at 64 connections in the same run"
        f" ({score['rps']:,.0f} vs {proto['rps']:,.0f}; target ≥ 5×) and **{at16}** at 16"
        f" (target ≥ 3×), with a p99 of {p99['p99_ms'] if p99 else float('nan'):.1f} ms at 16"
        f" (target ≤ 20 ms); on PostgreSQL **{pg}** at 64 (target ≥ 2×). Errors: ours"
        f" {ours_errors:,}, the prototype {proto_errors:,}. **{sum(t.met for t in measured)} of"
        f" {len(measured)}** measured targets met.",
        "",
    ]


def render(
    *,
    machine: str,
    versions: dict[str, str],
    seconds: float,
    warmup: float,
    cells: Cells,
    micro: dict[str, float],
    scale: dict[str, dict[str, Any]],
    per_user: dict[str, float],
    elapsed: float,
    baseline: str = "",
    quick: bool = False,
) -> str:
    judged = targets(cells, micro, scale)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`); do not edit by hand. What the profile shows",
        "and what would close the gaps: [performance.md](performance.md).",
        "",
        f"Run on {time.strftime('%Y-%m-%d', time.gmtime())}, in {elapsed / 60:.0f} minutes, on {machine},",
        "with the load generator on the same machine. The machine is shared and noisy: compare",
        "figures within this run (ratios), not with other runs.",
        "",
    ]
    if quick:
        lines += [
            "*Quick run* (`BENCH_QUICK=1`): 2 workers, /score and /reward only, at the"
            " concurrencies shown; no core micro-benchmarks, no scale.",
            "",
        ]
    lines += _headline(cells, judged)
    lines += [
        "## Targets",
        "",
        "HTTP targets: 2 workers, `/score` with 10 candidates over 1,000 users, ours with its"
        " default settings (the request log on), every contender measured side by side in"
        " this run.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {t.goal} | {t.measured} | {t.verdict} |" for t in judged],
        "",
    ]
    lines += [
        "## Versions",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in versions.items()],
        "",
        "## How it was measured",
        "",
        f"- Each cell: `wrk -t{{min(c,2)}} -c{{c}} -d{warmup:g}s` as a warm-up, then the same for {seconds:g} s;"
        " the reporting script `bench/lua/report.lua` prints requests, p50, p99, p99.9 and errors.",
        "- `/score`: `bench/lua/score.lua`, 10 candidates, users `user-0` … `user-999` in turn;"
        " `/reward`: `bench/lua/reward.lua`, the prototype's body (no `event_id`);"
        " `/health`: a plain GET.",
        "- Contenders in one cell run one after the other, the first rotating from cell to cell;"
        " all servers of a worker count are up at once, idle while another is measured.",
        "- Ours: `.venv/bin/python -m oo_serving serve --host 127.0.0.1 --workers N --database"
        " URL`, started and stopped by `oo_serving.harness`, with its default"
        " settings and no other `OO_*` variable: the request log on (one JSON line per request"
        " on stderr, which the bench discards), SQLite with `synchronous=FULL`. The policy"
        " variants change one setting each (their table says which).",
        "- The prototype: `../shared/seed/seed_app.py` under"
        " `uvicorn --workers N --no-access-log --log-level warning`, in `bench/.prototype` with"
        " the same FastAPI, uvicorn, uvloop, httptools and numpy versions as ours. A plain"
        " `uvicorn` run would log each request; without it the prototype does less work per"
        " request than ours, so the ratios to it err in the prototype's favour.",
        "- Errors: non-2xx answers plus socket errors (connect, read, write, time-out).",
        *(
            [
                f"- *Before*: this project at revision `{baseline}` (`BENCH_BASELINE`), on SQLite,"
                " with its default settings, measured in the same cells for /score and /reward:"
                " the before/after of the performance work."
            ]
            if baseline
            else []
        ),
        "",
        "## HTTP load",
        "",
        *_http_tables(cells),
        "## Core micro-benchmarks",
        "",
    ]
    if micro:
        lines += [
            "In-process (`timeit`), d = 5, before the HTTP load: the best of 60 rounds of 500 calls, the cases interleaved round by round, since on a shared machine the best round is the least disturbed.",
            "",
            "| operation | µs |",
            "|---|---|",
            *[f"| {k} | {v:.1f} |" for k, v in micro.items()],
            "",
        ]
    else:
        lines += ["Not measured in this run.", ""]
    if scale:
        lines += _scale_section(scale, per_user)
    return "\n".join(lines)


def _scale_section(scale: dict[str, dict[str, Any]], per_user: dict[str, float]) -> list[str]:
    lines = [
        "## Scale",
        "",
        "Stores pre-filled with users' models, then `/score` at c=16 with 2 workers, alternating"
        " runs over 1,000 users and over all of them (median of 2 each). RSS: both workers,"
        " after the first 1,000-user run, and again after a run at c=64 long enough to reach"
        " every user (its length from the rate just measured, with a quarter to spare; users"
        " touched: models that served at least one `/score`).",
        "",
        "| store | p50, 1,000 users | p50, all users | req/s, 1,000 | req/s, all | RSS after 1,000 | RSS after all | users touched | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in scale.items():
        rss = (
            f"{s['rss_1k_mb']:.0f} MB | {s['rss_all_mb']:.0f} MB | {s.get('touched', 0):,}"
            if "rss_all_mb" in s
            else "n/a | n/a | not touched"
        )
        lines.append(
            f"| {name} | {s['p50_1k']:.1f} ms | {s['p50_many']:.1f} ms | {s['rps_1k']:,.0f} |"
            f" {s['rps_many']:,.0f} | {rss} | {s['errors']} |"
        )
    lines += [""]
    if per_user:
        model = per_user.get("model", 0)
        decision = per_user.get("decision", 0)
        lines += [
            "Bytes on disk (SQLite, after `VACUUM`):",
            "",
            "| what | bytes |",
            "|---|---|",
            f"| a user's model row, with its index | {model:,.0f} |",
            f"| one decision with 10 candidates, with its indexes | {decision:,.0f} |",
            f"| a user's history (100 decisions) | {100 * decision:,.0f} |",
            f"| a user's full decision log (1,000 decisions, the default cap) | {1000 * decision:,.0f} |",
            "",
        ]
    return lines


def summary(cells: Cells, micro: dict[str, float], scale: dict[str, dict[str, Any]]) -> str:
    """A compact plain-text view for the terminal: requests/s and ratios, then the targets."""
    present = [w for w in ("sqlite", "postgres", "prototype") if any(k[0] == w for k in cells)]
    all_workers, endpoints, concurrency = _present(cells, CONTENDERS)
    head = f"{'endpoint':9}{'w':>2}{'c':>4}" + "".join(f"{w:>11}" for w in present)
    head += f"{'sqlite÷proto':>14}{'pg÷proto':>10}{'sqlite p99':>12}{'errors':>8}"
    lines = [head]
    for workers in all_workers:
        for endpoint in endpoints:
            for c in concurrency:
                row = f"/{endpoint:8}{workers:>2}{c:>4}"
                for w in present:
                    r = _rps(cells, w, endpoint, c, workers)
                    row += f"{r:>11,.0f}" if r else f"{'-':>11}"
                proto = _rps(cells, "prototype", endpoint, c, workers)
                row += f"{_ratio(_rps(cells, 'sqlite', endpoint, c, workers), proto):>14}"
                row += f"{_ratio(_rps(cells, 'postgres', endpoint, c, workers), proto):>10}"
                ours = _cell(cells, "sqlite", endpoint, workers, c)
                row += f"{ours['p99_ms']:>9.1f} ms" if ours else f"{'-':>12}"
                errors = sum(
                    _errors(v)
                    for k, v in cells.items()
                    if k[0] in OURS and k[1:] == (endpoint, workers, c)
                )
                lines.append(row + f"{errors:>8}")
    for name, (label, _) in VARIANTS.items():
        if any(k[0] == name for k in cells):
            ratios = [
                f"c={c} {_ratio(_rps(cells, name, 'score', c), _rps(cells, 'sqlite', 'score', c))}"
                for c in concurrency
            ]
            lines.append(f"/score with {label} ÷ linucb-v1 (2 workers): " + ", ".join(ratios))
    lines += ["", "targets:"]
    for t in targets(cells, micro, scale):
        lines.append(f"  [{t.verdict}] {t.goal}: {t.measured}")
    return "\n".join(lines)
