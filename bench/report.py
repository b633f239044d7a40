"""Render the measurements of bench/run.py as docs/benchmarks.md."""

from __future__ import annotations

import time
from typing import Any

Cells = dict[tuple[str, str, int, int], dict[str, Any]]

CONTENDERS = ("sqlite", "sqlite-v2", "postgres", "prototype", "before")
LABEL = {
    "sqlite": "ours, SQLite",
    "sqlite-v2": "ours, SQLite, linucb-v2",
    "postgres": "ours, PostgreSQL",
    "prototype": "prototype",
    "before": "ours before, SQLite",
}


def _cell(cells: Cells, who: str, endpoint: str, workers: int, c: int) -> dict[str, Any] | None:
    return cells.get((who, endpoint, workers, c))


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "n/a"


def _targets(cells: Cells, micro: dict[str, float], scale: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| target | measured | verdict |", "|---|---|---|"]

    def rps(who: str, endpoint: str, workers: int = 2, c: int = 64) -> float | None:
        cell = _cell(cells, who, endpoint, workers, c)
        return cell["rps"] if cell else None

    def verdict(value: float | None, goal: float, higher: bool) -> str:
        if value is None:
            return "not measured"
        met = value >= goal if higher else value < goal
        if met:
            return "met"
        by = (goal / value if higher else value / goal) if value else float("inf")
        return f"missed ({by:.1f}× short)" if higher else f"missed ({by:.1f}× over)"

    for who, goal in (("sqlite", 5.0), ("postgres", 3.0)):
        ours, proto = rps(who, "score"), rps("prototype", "score")
        r = ours / proto if ours and proto else None
        rows.append(
            f"| /score at c=64, 2 workers, {LABEL[who]}: ≥ {goal:.0f}× the prototype's requests/s"
            f" | {_ratio(ours, proto)} ({ours or 0:,.0f} vs {proto or 0:,.0f}) | {verdict(r, goal, True)} |"
        )
    score, health = rps("sqlite", "score"), rps("sqlite", "health")
    share = score / health if score and health else None
    rows.append(
        f"| /score ≥ 40% of our /health requests/s (SQLite, c=64, 2 workers) |"
        f" {100 * share if share else 0:.0f}% ({score or 0:,.0f} vs {health or 0:,.0f}) |"
        f" {verdict(share, 0.4, True)} |"
    )
    cell = _cell(cells, "sqlite", "score", 2, 16)
    p99 = cell["p99_ms"] if cell else None
    rows.append(
        f"| /score p99 at c=16 < 20 ms (SQLite, 2 workers) | {p99 or 0:.1f} ms | {verdict(p99, 20, False)} |"
    )
    choose = micro.get("choose among 10: ours")
    update = micro.get("one update: ours (Sherman–Morrison)")
    rows.append(
        f"| core: choose among 10 < 20 µs | {choose or 0:.1f} µs | {verdict(choose, 20, False)} |"
    )
    rows.append(
        f"| core: one update < 10 µs | {update or 0:.1f} µs | {verdict(update, 10, False)} |"
    )
    s = scale.get("SQLite, 100,000 users", {})
    if "rss_all_mb" in s:
        growth = s["rss_all_mb"] - s["rss_1k_mb"]
        rows.append(
            f"| worker RSS grows < 10 MB from 1,000 to 100,000 users (SQLite, both workers) |"
            f" {growth:+.1f} MB ({s['rss_1k_mb']:.0f} → {s['rss_all_mb']:.0f} MB) |"
            f" {verdict(growth, 10, False)} |"
        )
    if "p50_many" in s:
        drift = s["p50_many"] / s["p50_1k"] - 1
        rows.append(
            f"| /score p50 at 100,000 users at most 20% above p50 at 1,000 users (SQLite) |"
            f" {100 * drift:+.0f}% ({s['p50_1k']:.1f} → {s['p50_many']:.1f} ms) |"
            f" {verdict(drift, 0.2, False)} |"
        )
    return rows


def _http_tables(cells: Cells) -> list[str]:
    out: list[str] = []
    present = [w for w in CONTENDERS if any(k[0] == w for k in cells)]
    for workers in (1, 2):
        out += [f"### {workers} worker{'s' if workers > 1 else ''}", ""]
        head = "| endpoint | c |" + "".join(
            f" {LABEL[w]}: req/s | p50 | p99 | p99.9 | non-2xx |" for w in present
        )
        head += " SQLite ÷ prototype | PostgreSQL ÷ prototype |"
        if "before" in present:
            head += " SQLite ÷ before |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for endpoint in ("score", "reward", "health"):
            for c in (1, 16, 64):
                row = f"| /{endpoint} | {c} |"
                for w in present:
                    cell = _cell(cells, w, endpoint, workers, c)
                    if cell is None:
                        row += " | | | | |"
                        continue
                    errors = cell["non2xx"] + cell["socket_errors"]
                    row += (
                        f" {cell['rps']:,.0f} | {cell['p50_ms']:.1f} ms | {cell['p99_ms']:.1f} ms"
                        f" | {cell['p999_ms']:.1f} ms | {errors} |"
                    )
                proto = _cell(cells, "prototype", endpoint, workers, c)
                for w in ("sqlite", "postgres"):
                    ours = _cell(cells, w, endpoint, workers, c)
                    row += f" {_ratio(ours and ours['rps'], proto and proto['rps'])} |"
                if "before" in present:
                    now, before = (
                        _cell(cells, w, endpoint, workers, c) for w in ("sqlite", "before")
                    )
                    row += f" {_ratio(now and now['rps'], before and before['rps'])} |"
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
                f"Our /score ÷ our /health ({workers} worker{'s' if workers > 1 else ''}): "
                + "; ".join(share)
                + ".",
                "",
            ]
    return out


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
) -> str:
    score = _cell(cells, "sqlite", "score", 2, 64)
    proto = _cell(cells, "prototype", "score", 2, 64)
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
    if score and proto:
        lines += [
            f"**Headline:** `/score` (10 candidates, 1,000 users, 64 connections, 2 workers, SQLite)"
            f" served **{score['rps'] / proto['rps']:.1f}×** the prototype's requests per second in the"
            f" same run ({score['rps']:,.0f} vs {proto['rps']:,.0f}), with"
            f" {score['non2xx'] + score['socket_errors']} errors against the prototype's"
            f" {proto['non2xx'] + proto['socket_errors']}.",
            "",
        ]
    lines += ["## Targets", "", *_targets(cells, micro, scale), ""]
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
        "- Ours: `.venv/bin/oo-serving serve --workers N --database URL` with the access log off;"
        " SQLite with `synchronous=FULL` (the default). The prototype: `../shared/seed/seed_app.py`"
        " under `uvicorn --workers N --no-access-log`, in `bench/.prototype` with the same FastAPI,"
        " uvicorn, uvloop, httptools and numpy versions as ours.",
        "- Errors: non-2xx answers plus socket errors (connect, read, write, time-out).",
        *(
            [
                f"- *Before*: this project at revision `{baseline}` (`BENCH_BASELINE`), on SQLite,"
                " measured in the same cells for /score and /reward: the before/after of the"
                " performance work."
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
        "In-process (`timeit`), d = 5, before the HTTP load: the best of 60 rounds of 500 calls, the cases interleaved round by round, since on a shared machine the best round is the least disturbed.",
        "",
        "| operation | µs |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in micro.items()],
        "",
    ]
    if scale:
        lines += [
            "## Scale",
            "",
            "Stores pre-filled with users' models, then `/score` at c=16 with 2 workers, alternating"
            " runs over 1,000 users and over all of them (median of 2 each). RSS: both workers,"
            " after the 1,000-user runs and again after a run long enough to touch every user.",
            "",
            "| store | p50, 1,000 users | p50, all users | req/s, 1,000 | req/s, all | RSS after 1,000 | RSS after all | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, s in scale.items():
            rss = (
                f"{s['rss_1k_mb']:.0f} MB | {s['rss_all_mb']:.0f} MB"
                if "rss_all_mb" in s
                else "n/a | not touched (too long)"
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
    return "\n".join(lines)
