"""`make bench-evaluation`: is `oo-serving evaluate` right on logs written by the service?

For each scenario of the task-app simulator and each seed, the service (Service over a
fresh SQLite file, `linucb-v1` with ε-greedy exploration and `linucb-v2` as a shadow,
as `OO_EXPLORATION=epsilon:0.1 OO_SHADOW_POLICIES=linucb-v2` configures it) serves
every round; the simulator's responses are posted as rewards (ignored tips get none).
Then evaluate's own code reads the log. The simulator knows every candidate's expected
reward, so the true value of each evaluated policy *on the evaluated decisions* is known
(`oo_serving.sim.offpolicy`); this reports, per policy and estimator, over seeds:

- bias: the mean of estimate − truth, ± its SE over seeds;
- RMSE;
- coverage: the share of seeds whose 95% interval (CI) or anytime-valid sequence (CS)
  holds the truth;
- the same for the differences to the logging policy, against the true differences;
- the verdicts for `linucb-v2`: how often it was decided, and whether correctly.

The seeds are not the ones the estimators' tests use. Writes a markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from oo_serving.settings import Settings
from oo_serving.sim.offpolicy import OffPolicyRun, serve_and_evaluate
from oo_serving.sim.scenarios import preset
from oo_serving.store import open_store


async def one(scenario: str, seed: int, users: int, rounds: int, epsilon: float) -> OffPolicyRun:
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(database_url=f"sqlite:///{folder}/log.db", sqlite_synchronous="normal")
        store = open_store(settings)
        await store.open()
        try:
            return await serve_and_evaluate(
                store, preset(scenario, users=users, rounds=rounds), seed, epsilon=epsilon
            )
        finally:
            await store.close()


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return m, se


def report(runs: dict[str, list[OffPolicyRun]], args: argparse.Namespace, took: float) -> str:
    lines = [
        "# `oo-serving evaluate` on logs written by the service",
        "",
        "Written by `make bench-evaluation` (bench/evaluation.py): the service serves the",
        f"task-app simulator ({args.users} users × {args.rounds} rounds, arriving 8 at a time)",
        f"with `linucb-v1`, ε = {args.epsilon} exploration and `linucb-v2` as a shadow; the",
        "log is then evaluated by evaluate's own code and compared with the true value of",
        "each policy on the evaluated decisions, known to the simulator. Seeds"
        f" {args.seeds[0]}..{args.seeds[-1]} ({len(args.seeds)} per scenario), none of them",
        f"used to tune or test the estimators. Intervals are 95%. Took {took / 60:.1f} minutes.",
        "",
    ]
    for scenario, scenario_runs in runs.items():
        events = statistics.fmean(r.result.events for r in scenario_runs)
        lines += [
            f"## {scenario}",
            "",
            f"{events:,.0f} rewarded decisions evaluated per seed on average.",
            "",
            "| policy | estimator | truth | bias ± SE | RMSE | CI covers | CS covers | ESS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows: dict[tuple[str, str], list[tuple[float, float, bool, bool, float]]] = defaultdict(
            list
        )
        diffs: dict[tuple[str, str], list[tuple[float, bool, bool]]] = defaultdict(list)
        for run in scenario_runs:
            for e in run.result.estimates:
                truth = run.truth[e.policy]
                rows[e.policy, e.estimator].append(
                    (
                        e.value - truth,
                        truth,
                        e.ci_low <= truth <= e.ci_high,
                        e.cs_low <= truth <= e.cs_high,
                        e.ess / max(run.result.events, 1),
                    )
                )
            for d in run.result.differences:
                truth = run.truth[d.policy] - run.truth["logging"]
                diffs[d.policy, d.estimator].append(
                    (
                        d.value - truth,
                        d.ci_low <= truth <= d.ci_high,
                        d.cs_low <= truth <= d.cs_high,
                    )
                )
        n = len(scenario_runs)
        for (policy, estimator), found in rows.items():
            bias, se = mean_se([f[0] for f in found])
            rmse = math.sqrt(statistics.fmean(f[0] ** 2 for f in found))
            truth = statistics.fmean(f[1] for f in found)
            ci = sum(f[2] for f in found)
            cs = sum(f[3] for f in found)
            ess = statistics.fmean(f[4] for f in found)
            lines.append(
                f"| {policy} | {estimator} | {truth:+.4f} | {bias:+.4f} ± {se:.4f} | {rmse:.4f}"
                f" | {ci}/{n} | {cs}/{n} | {ess:.0%} |"
            )
        lines += [
            "",
            "Differences to the logging policy, paired on the same decisions:",
            "",
            "| policy | estimator | bias ± SE | CI covers | CS covers |",
            "|---|---|---|---|---|",
        ]
        for (policy, estimator), found in diffs.items():
            bias, se = mean_se([f[0] for f in found])
            lines.append(
                f"| {policy} | {estimator} | {bias:+.4f} ± {se:.4f}"
                f" | {sum(f[1] for f in found)}/{n} | {sum(f[2] for f in found)}/{n} |"
            )
        verdicts = [v for r in scenario_runs for v in r.result.verdicts if v.policy == "linucb-v2"]
        truths = [r.truth["linucb-v2"] - r.truth["logging"] for r in scenario_runs]
        decided = [v for v in verdicts if v.decided]
        right = sum(
            1
            for v, t in zip(verdicts, truths, strict=True)
            if v.decided and (v.better is True) == (t > 0)
        )
        lines += [
            "",
            f"True difference `linucb-v2` − logging: {statistics.fmean(truths):+.4f} on average."
            f" The verdict decided in {len(decided)} of {n} seeds, rightly in {right}.",
            "",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--seeds", default="201-220")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    first, _, last = args.seeds.partition("-")
    args.seeds = list(range(int(first), int(last or first) + 1))
    scenarios = args.scenario or ["realistic", "drift"]
    started = time.monotonic()
    runs: dict[str, list[OffPolicyRun]] = {}
    for scenario in scenarios:
        runs[scenario] = []
        for seed in args.seeds:
            run = asyncio.run(one(scenario, seed, args.users, args.rounds, args.epsilon))
            runs[scenario].append(run)
            print(f"{scenario} seed {seed}: {run.result.events} events", file=sys.stderr)
    text = report(runs, args, time.monotonic() - started)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
