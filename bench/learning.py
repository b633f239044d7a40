"""`make bench-learning`: how much the service learns over real HTTP, against the prototype.

What it measures, exactly. For each scenario of the task-app simulator (`oo_serving.sim`,
default `realistic`, `drift`, `linear`) and each seed (default 1, 2, 3), two fresh
servers on loopback, started for that (scenario, seed) alone:

- ours: `oo-serving serve --workers 1` on a new SQLite file, with `OO_POLICY` = `--policy`
  (default linucb-v2) and any `--env KEY=VALUE` settings;
- the prototype: `../shared/seed/seed_app.py` under uvicorn in its own venv (bench/run.py's),
  whose maths is linucb-v1's.

Both are driven on the same draws (common random numbers): `--users` users (default 100)
of `--rounds` rounds (100) each, arriving `--cohort` (8) at a time; the users of a cohort
play concurrently, each user's rounds strictly in order, and the next cohort starts when
the whole cohort is done. One round, for both servers at once: POST /score with the
round's candidates (ids t0, t1, …) and context; the tip each server answers is mapped
back to its candidate and its pseudo-regret recorded (the round's best true utility minus
the utility of the tip shown, in utility units, the simulator's `Round.regret`). Unless
the user ignores the tip (the same rounds for both servers, whatever they show), the
simulated response to each server's tip is sent as that server's /reward: to ours
`{user_id, event_id, reward}` only, to the prototype `{user_id, tip_id, reward, features}`
as its contract asks. An ignored tip gets no reward at all, as in the app.

Per scenario it reports the total regret (summed over users and rounds) as the mean over
seeds ± its SE; ours against the prototype as the relative change P̄/B̄ − 1, paired over
seeds, with the delta-method SE of `oo_serving.sim.summary.compare`; the same over each
user's first `--cold-start` rounds (10); and the wall time of driving both. The regret is
what the servers answered, everything between the request and the choice included: a
policy that learns from the population refreshes its prior every OO_POPULATION_REFRESH_S
seconds, so its figures depend a little on how fast the rounds go, unlike the in-process
runner's, which refreshes every 100 learned rewards.

For reference it also runs the in-process simulator (`oo_serving.sim.runner.run`, same
seeds, arrival `cohorts:<cohort>`, no reward for ignored tips) for linucb-v1 against
`--policy`. The prototype over HTTP and linucb-v1 in process do the same maths on the same
draws, so their totals should agree closely: that checks the harness itself.

Not measured here: throughput or latency under load (bench/run.py, `make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import run as throughput  # bench/run.py: the prototype's venv, Server; bench/ is on sys.path

from oo_serving.sim.scenarios import PRESETS, SETTINGS, Scenario, preset
from oo_serving.sim.simulator import Round, Simulator
from oo_serving.sim.summary import Comparison, Estimate, compare, estimate

ROOT = throughput.ROOT
POLICY_SETTING_PREFIX = "OO_LINUCB_V2_"  # the service's linucb-v2 settings, by env name
LOG_TAIL = 2000  # characters of a server's output shown when it fails to start


def log(msg: str) -> None:
    print(f"[learning {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ── servers ──────────────────────────────────────────────────────────────────
@dataclass
class LoggedServer(throughput.Server):
    """bench/run.py's Server with its output kept in a file: when a server does not start,
    its own last words say why, rather than a bare time-out."""

    logfile: Path | None = None

    def start(self) -> LoggedServer:
        assert self.logfile is not None
        cmd = [c.replace("{port}", str(self.port)) for c in self.cmd]
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            with suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1, trust_env=False).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start ({' '.join(cmd)}); {self.status()}")

    def status(self) -> str:
        """Whether the process still runs, and the end of what it printed."""
        code = self.proc.poll() if self.proc else None
        state = "is still running" if self.proc and code is None else f"exited with {code}"
        tail = self.logfile.read_text(errors="replace")[-LOG_TAIL:] if self.logfile else ""
        return f"the server {state}; its output ends:\n{tail}"


def ours_server(folder: Path, policy: str, extra_env: dict[str, str]) -> LoggedServer:
    cmd = [str(throughput.OURS), "serve", "--host", "127.0.0.1", "--port", "{port}",
           "--workers", "1", "--database", f"sqlite:///{folder / 'oo.db'}"]  # fmt: skip
    env = {"OO_POLICY": policy, "OO_ACCESS_LOG": "false", "OO_LOG_LEVEL": "warning", **extra_env}
    return LoggedServer("ours", cmd, env=env, logfile=folder / "ours.log")


def prototype_server(folder: Path, python: Path) -> LoggedServer:
    base = throughput.prototype(python, folder / "proto-state", workers=1)
    return LoggedServer(
        base.name, base.cmd, env=base.env, cwd=base.cwd, logfile=folder / "prototype.log"
    )


# ── driving both on the same draws ───────────────────────────────────────────
@dataclass
class Side:
    """One server as the driver sees it: its client, what it answered, how long it took."""

    server: LoggedServer
    client: httpx.AsyncClient
    regret: np.ndarray  # shape (users, rounds), written round by round
    sends_event_id: bool  # ours: reward by event_id; the prototype: by tip_id and features
    policy: str | None = None  # the policy every /score must name, when known
    seconds: dict[str, float] = field(default_factory=lambda: {"/score": 0.0, "/reward": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"/score": 0, "/reward": 0})

    @property
    def name(self) -> str:
        return self.server.name

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body`; anything but 200 stops the whole run, naming the server and request."""
        start = time.perf_counter()
        try:
            answer = await self.client.post(path, json=body)
        except httpx.TransportError as exc:
            raise RuntimeError(
                f"{self.name} {path}: {type(exc).__name__} {exc}; {self.server.status()}"
            ) from exc
        self.seconds[path] += time.perf_counter() - start
        self.calls[path] += 1
        if answer.status_code != 200:
            raise RuntimeError(
                f"{self.name} {path} answered {answer.status_code}: {answer.text[:500]}"
                f" (request: {str(body)[:300]})"
            )
        result: dict[str, Any] = answer.json()
        return result


def score_body(user_id: str, rnd: Round) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "candidates": [
            {"id": f"t{i}", "content": f"task {i}", "source": "sim", "features": c.as_dict()}
            for i, c in enumerate(rnd.candidates)
        ],
        "context": {"hour_of_day": rnd.context.hour_of_day, "day_of_week": rnd.context.day_of_week},
    }


async def play(side: Side, user_id: str, rnd: Round, body: dict[str, Any]) -> None:
    """One round on one server: score, record the regret, reward unless ignored."""
    answer = await side.post("/score", body)
    if side.policy is not None and answer.get("policy") != side.policy:
        raise RuntimeError(f"{side.name} decided with {answer.get('policy')!r}, not {side.policy}")
    tip = answer["tip_id"]
    if not (tip.startswith("t") and tip[1:].isdecimal() and int(tip[1:]) < len(rnd.candidates)):
        raise RuntimeError(f"{side.name} answered tip {tip!r}, not one of the round's candidates")
    chosen = int(tip[1:])
    side.regret[rnd.user, rnd.index] = rnd.regret(chosen)
    if rnd.ignored:
        return  # the app sends nothing for a tip the user ignored
    reward = rnd.reward(chosen)
    if side.sends_event_id:
        await side.post(
            "/reward", {"user_id": user_id, "event_id": answer["event_id"], "reward": reward}
        )
    else:
        shown = rnd.candidates[chosen]._replace(hour_of_day=rnd.context.hour_of_day)
        await side.post(
            "/reward",
            {"user_id": user_id, "tip_id": tip, "reward": reward, "features": shown.as_dict()},
        )


async def play_user(sim: Simulator, sides: Sequence[Side], user: int) -> None:
    """All of a user's rounds in order; each round goes to every server at once."""
    user_id = f"s{sim.seed}-u{user}"
    for t in range(sim.scenario.rounds):
        rnd = sim.round(user, t)
        body = score_body(user_id, rnd)
        async with asyncio.TaskGroup() as group:
            for side in sides:
                group.create_task(play(side, user_id, rnd, body))


async def drive(sim: Simulator, sides: Sequence[Side], cohort: int) -> None:
    users = sim.scenario.users
    for first in range(0, users, cohort):
        async with asyncio.TaskGroup() as group:
            for user in range(first, min(first + cohort, users)):
                group.create_task(play_user(sim, sides, user))


def first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


@dataclass
class SeedRun:
    """One (scenario, seed) over HTTP: regrets per server and the time it took."""

    regret: dict[str, np.ndarray]  # per server, shape (users, rounds)
    seconds: float
    request_ms: dict[str, dict[str, float]]  # per server, per path: mean ms


def client(server: LoggedServer, cohort: int) -> httpx.AsyncClient:
    """One connection per user of a cohort. Idle connections are dropped after 2 s, before
    the servers' own 5 s keep-alive time-out: with both at 5 s, a request sent on a
    connection the server is closing at that moment fails with a ReadError."""
    limits = httpx.Limits(
        max_connections=cohort, max_keepalive_connections=cohort, keepalive_expiry=2.0
    )
    return httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits, trust_env=False)


async def _drive_servers(
    sim: Simulator, servers: dict[str, LoggedServer], policy: str, cohort: int
) -> tuple[list[Side], float]:
    shape = (sim.scenario.users, sim.scenario.rounds)
    ours, proto = servers["ours"], servers["prototype"]
    async with client(ours, cohort) as a, client(proto, cohort) as b:
        sides = [
            Side(ours, a, np.full(shape, np.nan), sends_event_id=True, policy=policy),
            Side(proto, b, np.full(shape, np.nan), sends_event_id=False),
        ]
        start = time.perf_counter()
        await drive(sim, sides, cohort)
        return sides, time.perf_counter() - start


def run_seed(
    scenario: Scenario, seed: int, args: argparse.Namespace, proto_python: Path
) -> SeedRun:
    """Fresh servers for this (scenario, seed) alone, driven together, stopped whatever happens."""
    sim = Simulator.create(scenario, seed)
    with tempfile.TemporaryDirectory(prefix="oo-learning-") as tmp:
        folder = Path(tmp)
        servers = [
            ours_server(folder, args.policy, args.env),
            prototype_server(folder, proto_python),
        ]
        try:
            for server in servers:
                server.start()
            by_name = {s.name: s for s in servers}
            try:
                sides, seconds = asyncio.run(_drive_servers(sim, by_name, args.policy, args.cohort))
            except ExceptionGroup as group:  # one failure per user of the cohort: show the first
                raise first_error(group) from None
        finally:
            for server in servers:
                server.stop()
    for side in sides:
        if np.isnan(side.regret).any():
            raise RuntimeError(f"{side.name}: some rounds were not played")
    return SeedRun(
        regret={s.name: s.regret for s in sides},
        seconds=seconds,
        request_ms={
            s.name: {p: 1000 * s.seconds[p] / max(s.calls[p], 1) for p in s.seconds} for s in sides
        },
    )


# ── figures ──────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Figures:
    """One scenario's comparison of `policy` with `baseline`, overall and at cold start."""

    baseline: str
    policy: str
    total: dict[str, Estimate]
    versus: Comparison
    cold_total: dict[str, Estimate]
    cold_versus: Comparison
    seconds: float
    per_seed: dict[str, list[float]]  # per side, the total of each seed, in seed order


def figures(
    regret: dict[str, np.ndarray], baseline: str, policy: str, cold: int, seconds: float
) -> Figures:
    """`regret[name]` has shape (seeds, users, rounds)."""
    totals = {k: r.sum(axis=(1, 2)) for k, r in regret.items()}
    colds = {k: r[:, :, :cold].sum(axis=(1, 2)) for k, r in regret.items()}
    return Figures(
        baseline=baseline,
        policy=policy,
        total={k: estimate(v) for k, v in totals.items()},
        versus=compare(policy, baseline, totals[policy], totals[baseline]),
        cold_total={k: estimate(v) for k, v in colds.items()},
        cold_versus=compare(policy, baseline, colds[policy], colds[baseline]),
        seconds=seconds,
        per_seed={k: [float(x) for x in v] for k, v in totals.items()},
    )


def fmt(e: Estimate, digits: int = 1) -> str:
    return f"{e.mean:,.{digits}f}" + ("" if np.isnan(e.se) else f" ± {e.se:,.{digits}f}")


def fmt_rel(e: Estimate) -> str:
    if np.isnan(e.mean):
        return "n/a"
    return f"{100 * e.mean:+.1f}%" + ("" if np.isnan(e.se) else f" ± {100 * e.se:.1f}%")


def table(rows: dict[str, Figures], labels: dict[str, str], cold: int) -> list[str]:
    """Markdown rows; `labels` names the baseline and the policy columns."""
    base, pol = labels["baseline"], labels["policy"]
    head = (
        f"| scenario | total regret: {base} | total regret: {pol} | {pol} vs {base} |"
        f" first {cold} rounds: {base} | first {cold} rounds: {pol} | {pol} vs {base},"
        f" first {cold} | wall time |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, f in rows.items():
        out.append(
            f"| {name} | {fmt(f.total[f.baseline])} | {fmt(f.total[f.policy])} |"
            f" **{fmt_rel(f.versus.relative)}** | {fmt(f.cold_total[f.baseline])} |"
            f" {fmt(f.cold_total[f.policy])} | {fmt_rel(f.cold_versus.relative)} |"
            f" {f.seconds:.0f} s |"
        )
    return out


# ── the in-process reference ─────────────────────────────────────────────────
def policy_spec(policy: str, extra_env: dict[str, str]) -> str:
    """The runner's spec for the policy ours serves, with the same OO_LINUCB_V2_* settings."""
    if policy != "linucb-v2":
        return policy
    given = [
        f"{k[len(POLICY_SETTING_PREFIX) :].lower()}={v}"
        for k, v in extra_env.items()
        if k.startswith(POLICY_SETTING_PREFIX)
    ]
    return f"{policy}:{','.join(given)}" if given else policy


def in_process(
    scenarios: dict[str, Scenario], args: argparse.Namespace
) -> tuple[dict[str, Figures], str]:
    """linucb-v1 against `--policy` in the in-process runner, per scenario; or why not.

    The runner's API is still growing: if it no longer takes these arguments, or its result
    no longer reads this way, this part is skipped with the reason rather than failing
    the HTTP measurements already made.
    """
    spec = policy_spec(args.policy, args.env)
    if spec == "linucb-v1":
        return {}, "skipped: the policy served is linucb-v1 itself"
    try:
        from oo_serving.sim.policies import parse_policy
        from oo_serving.sim.runner import run

        out: dict[str, Figures] = {}
        for name, scenario in scenarios.items():
            start = time.perf_counter()
            result = run(
                scenario,
                [parse_policy("linucb-v1"), parse_policy(spec)],
                args.seeds,
                arrival=f"cohorts:{args.cohort}",
                ignored="no-reward",
            )
            seconds = time.perf_counter() - start
            regret = {"linucb-v1": np.asarray(result.instant["linucb-v1"])}
            regret[spec] = np.asarray(result.instant[result.policies[1]])
            out[name] = figures(regret, "linucb-v1", spec, args.cold_start, seconds)
        return out, f"`{spec}` against `linucb-v1`, `oo_serving.sim.runner.run`"
    except (TypeError, AttributeError, KeyError, ValueError, ImportError) as exc:
        return {}, f"skipped: the in-process runner did not fit ({type(exc).__name__}: {exc})"


# ── the report ───────────────────────────────────────────────────────────────
def command() -> str:
    python = Path(sys.executable)
    with suppress(ValueError):
        python = python.relative_to(ROOT)
    script = Path(sys.argv[0]).resolve()
    with suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([str(python), str(script), *sys.argv[1:]])


def proto_versions(python: Path) -> str:
    code = "import platform, numpy; print(platform.python_version(), numpy.__version__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    parts = out.stdout.split()
    return f"Python {parts[0]}, numpy {parts[1]}" if len(parts) == 2 else "unknown versions"


def scenario_settings(scenario: Scenario) -> str:
    """The settings in which a scenario differs from `linear`, the plainest preset."""
    plain = PRESETS["linear"]
    changed = [
        f"{k}={getattr(scenario, k)}" for k in SETTINGS if getattr(scenario, k) != getattr(plain, k)
    ]
    return ", ".join(changed) if changed else "the defaults"


def markdown(
    args: argparse.Namespace,
    scenarios: dict[str, Scenario],
    http: dict[str, Figures],
    reference: dict[str, Figures],
    reference_note: str,
    timings: dict[str, dict[str, dict[str, float]]],
    proto_python: Path,
    elapsed: float,
) -> str:
    pol = f"ours ({args.policy})"
    env = ", ".join(f"`{k}={v}`" for k, v in args.env.items()) or "none"
    lines = [
        f"# Learning over HTTP: {pol} against the prototype",
        "",
        "Generated by `make bench-learning` (`bench/learning.py`, whose docstring says exactly"
        " what is measured); do not edit by hand.",
        "",
        f"- Command: `{command()}`",
        f"- Run on {time.strftime('%Y-%m-%d', time.gmtime())} in {elapsed / 60:.1f} minutes,"
        f" on {throughput.machine()}.",
        f"- Ours: Python {platform.python_version()}, numpy {np.__version__}; SQLite, 1 worker,"
        f" `OO_POLICY={args.policy}`, extra settings: {env}.",
        f"- The prototype: `../shared/seed/seed_app.py` (linucb-v1's maths), {proto_versions(proto_python)},"
        " uvicorn, 1 worker.",
        f"- Seeds {', '.join(map(str, args.seeds))}; {args.users} users × {args.rounds} rounds per"
        f" seed, arriving {args.cohort} at a time, each user's rounds in order; cold start ="
        f" each user's first {args.cold_start} rounds. Fresh servers for every (scenario, seed).",
        *(f"- Scenario `{k}`: {scenario_settings(s)}." for k, s in scenarios.items()),
        "",
        "Regret: pseudo-regret in utility units (best utility − utility of the tip shown),"
        " summed over users and rounds; mean over seeds ± SE. Relative change: P̄/B̄ − 1 paired"
        " over seeds, delta-method SE (`oo_serving.sim.summary.compare`); negative is better.",
        "Wall time: driving both servers together, summed over seeds (server start-up excluded).",
        "A policy that learns from the population refreshes its prior every"
        " `OO_POPULATION_REFRESH_S` seconds (default 1), so how many rounds pass between"
        " refreshes depends on the machine's speed: such figures vary a little from run to run"
        " on the same seeds; the prototype's do not.",
        "",
        "## Over HTTP",
        "",
        *table(http, {"baseline": "prototype", "policy": pol}, args.cold_start),
        "",
        "Mean time per request, ms (both servers driven at once, so indicative only):",
        "",
        "| scenario | ours /score | ours /reward | prototype /score | prototype /reward |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {t['ours']['/score']:.1f} | {t['ours']['/reward']:.1f} |"
            f" {t['prototype']['/score']:.1f} | {t['prototype']['/reward']:.1f} |"
            for k, t in timings.items()
        ),
        "",
        "## For reference: the in-process simulator",
        "",
    ]
    if reference:
        labels = {"baseline": "linucb-v1", "policy": next(iter(reference.values())).policy}
        lines += [
            f"{reference_note}; same scenarios and seeds, arrival `cohorts:{args.cohort}`,"
            " no reward for ignored tips, the population refreshed every 100 learned rewards.",
            "",
            *table(reference, labels, args.cold_start),
            "",
            "Harness check: total regret per seed of the prototype over HTTP against linucb-v1"
            " in process (the same maths on the same draws):",
            "",
            "| scenario | prototype over HTTP | linucb-v1 in process |",
            "|---|---|---|",
            *(
                f"| {k} | {', '.join(f'{x:,.2f}' for x in http[k].per_seed['prototype'])} |"
                f" {', '.join(f'{x:,.2f}' for x in f.per_seed['linucb-v1'])} |"
                for k, f in reference.items()
                if k in http
            ),
        ]
    else:
        lines += [reference_note[0].upper() + reference_note[1:] + "."]
    return "\n".join(lines) + "\n"


# ── main ─────────────────────────────────────────────────────────────────────
def env_pair(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not (key and equals):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Regret of ours against the prototype over real HTTP, on the task-app simulator.",
        epilog="What is measured, exactly: the module docstring of bench/learning.py.",
    )
    p.add_argument("--scenarios", default="realistic,drift,linear", help="comma-separated presets")
    p.add_argument("--seeds", type=int_list, default=[1, 2, 3], help="comma-separated, e.g. 1,2,3")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rounds", type=int, default=100, help="rounds per user")
    p.add_argument("--cohort", type=int, default=8, help="users arriving together")
    p.add_argument("--cold-start", type=int, default=10, help="each user's first N rounds")
    p.add_argument("--policy", default="linucb-v2", help="OO_POLICY of our server")
    p.add_argument(
        "--env", type=env_pair, action="append", default=[], metavar="KEY=VALUE",
        help="another setting of our server (repeatable), e.g. OO_LINUCB_V2_ALPHA=0.2",
    )  # fmt: skip
    p.add_argument("--no-reference", action="store_true", help="skip the in-process runner")
    p.add_argument("--out", type=Path, help="write the markdown report to this file")
    args = p.parse_args(argv)
    args.env = dict(args.env)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in args.scenarios:
        if name not in PRESETS:
            p.error(f"no scenario {name!r}; presets: {', '.join(PRESETS)}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must name distinct seeds")
    if min(args.users, args.rounds, args.cohort, args.cold_start) < 1:
        p.error("--users, --rounds, --cohort and --cold-start must be at least 1")
    return args


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: unwind through every `finally`, so both servers are stopped."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    proto_python = throughput.ensure_prototype()
    if proto_python is None:
        sys.exit(f"no prototype at {throughput.SEED}: nothing to compare with")
    scenarios = {n: preset(n, users=args.users, rounds=args.rounds) for n in args.scenarios}

    http: dict[str, Figures] = {}
    timings: dict[str, dict[str, dict[str, float]]] = {}
    for name, scenario in scenarios.items():
        runs: list[SeedRun] = []
        for seed in args.seeds:
            log(f"{name}, seed {seed}: {args.users} users × {args.rounds} rounds, both servers")
            r = run_seed(scenario, seed, args, proto_python)
            runs.append(r)
            log(
                f"{name}, seed {seed}: total regret ours {r.regret['ours'].sum():,.2f},"
                f" prototype {r.regret['prototype'].sum():,.2f}, in {r.seconds:.1f} s"
            )
        regret = {k: np.stack([r.regret[k] for r in runs]) for k in ("ours", "prototype")}
        http[name] = figures(
            regret, "prototype", "ours", args.cold_start, sum(r.seconds for r in runs)
        )
        timings[name] = {
            side: {
                p: float(np.mean([r.request_ms[side][p] for r in runs]))
                for p in ("/score", "/reward")
            }
            for side in ("ours", "prototype")
        }

    if args.no_reference:
        reference, note = {}, "skipped (--no-reference)"
    else:
        log("the in-process reference")
        reference, note = in_process(scenarios, args)

    report = markdown(
        args, scenarios, http, reference, note, timings, proto_python, time.time() - started
    )
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
