"""The `oo-serving` command: serve, migrate, prune, check, simulate, sweep, evaluate, export,
backup.

Every flag has an OO_* environment variable; a flag given wins over the variable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import math
import os
import secrets
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
import uvicorn
from pydantic import SecretStr, ValidationError

from oo_serving import __version__
from oo_serving import sweep as sweep_mod
from oo_serving.api import lifecycle
from oo_serving.api.auth import SHORT_KEY_LENGTH, KeyRing, is_loopback
from oo_serving.check import CheckReport
from oo_serving.errors import SchemaError, StoreUnavailable
from oo_serving.logs import log_config
from oo_serving.metrics import METRICS_FILE, MULTIPROCESS_DIR_ENV
from oo_serving.redact import redact_secrets, redact_url
from oo_serving.settings import Settings, parse_duration_ms, shadow_names
from oo_serving.store import open_store
from oo_serving.store.sqlite import sqlite_path
from oo_serving.wiring import service_of

T = TypeVar("T")
log = logging.getLogger("oo_serving")

app = typer.Typer(
    name="oo-serving",
    help="oO ML Serving: pick the next tip to show, learn from what the user does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"oo-serving {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """oO ML Serving: pick the next tip to show, learn from what the user does."""


DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", help="sqlite:///path.db [env: OO_DATABASE_URL]", show_default=False),
]


def _settings(**overrides: Any) -> Settings:
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise typer.BadParameter(redact_secrets(str(exc))) from exc


def _export(settings: Settings) -> None:
    """Put the resolved settings where worker processes will read them."""
    for name, value in settings.model_dump().items():
        key = f"OO_{name.upper()}"
        if value is None:
            os.environ.pop(key, None)
        elif isinstance(value, SecretStr):
            os.environ[key] = value.get_secret_value()
        else:
            os.environ[key] = str(value).lower() if isinstance(value, bool) else str(value)


async def _migrate(settings: Settings) -> None:
    store = open_store(settings)
    await store.open()  # applies pending migrations, refuses a newer schema
    await store.close()


def _run_or_exit(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; a database that cannot be used ends the command with a message, exit 2.

    The message is redacted: a driver's error can quote the database URL, password and all.
    """
    try:
        return asyncio.run(work)
    except (SchemaError, StoreUnavailable, ValueError) as exc:
        typer.echo(f"oo-serving: {redact_secrets(str(exc))}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="[env: OO_HOST] default 127.0.0.1", show_default=False)
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="[env: OO_PORT] default 8000", show_default=False)
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="[env: OO_WORKERS] default 1", show_default=False)
    ] = None,
    database: DatabaseOption = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Serve without API keys on an address other than loopback. [env: OO_INSECURE]",
        ),
    ] = False,
) -> None:
    """Serve the HTTP API."""
    settings = _settings(
        host=host, port=port, workers=workers, database_url=database, insecure=insecure or None
    )
    logging.config.dictConfig(log_config(settings))
    _check_access(settings)
    _run_or_exit(_migrate(settings))
    if not settings.log_hash_key.get_secret_value():
        # One key for all workers of this run, so that a user hashes the same in each.
        settings = settings.model_copy(update={"log_hash_key": SecretStr(secrets.token_hex(32))})
    with _metrics_folder(settings) as folder:
        _export(settings)
        if folder is not None:
            os.environ[MULTIPROCESS_DIR_ENV] = str(folder)
        lifecycle.run(
            uvicorn.Config(
                "oo_serving.api.app:create_app_from_env",
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=settings.workers,
                log_config=log_config(settings),
                log_level=settings.log_level,
                access_log=False,  # the service writes its own request log (OO_ACCESS_LOG)
                timeout_graceful_shutdown=settings.graceful_shutdown_s,
                loop="uvloop",
                # Answers what it received after SIGTERM instead of resetting idle connections.
                http=lifecycle.DrainingHttpToolsProtocol,
            )
        )


def _check_access(settings: Settings) -> None:
    """Refuse to serve without keys beyond loopback, unless told to; say how it runs."""
    try:
        ring = KeyRing.load(settings.api_keys.get_secret_value(), settings.api_keys_file)
    except ValueError as exc:
        typer.echo(f"oo-serving: {exc}", err=True)
        raise typer.Exit(2) from exc
    where = f"{settings.host}:{settings.port}"
    if ring:
        short = sum(key.short for key in ring.keys)
        log.info("API keys required: %d configured", len(ring.keys))
        if short:
            log.warning("%d API key(s) shorter than %d characters", short, SHORT_KEY_LENGTH)
        return
    if is_loopback(settings.host):
        log.warning("no API keys configured: every endpoint is open to anyone on %s", where)
        return
    if not settings.insecure:
        typer.echo(
            f"oo-serving: refusing to serve {where} without API keys: anyone who can reach"
            " it could read and erase every user's data. Set OO_API_KEYS or"
            " OO_API_KEYS_FILE, listen on 127.0.0.1, or pass --insecure.",
            err=True,
        )
        raise typer.Exit(2)
    log.warning("INSECURE: no API keys, and %s is not loopback: every endpoint is open", where)


# The files prometheus-client's multiprocess mode writes: <type>_<pid>.db, a gauge's type
# with its mode (gauge_livesum, ...).
@contextmanager
def _metrics_folder(settings: Settings) -> Iterator[Path | None]:
    """Where the workers write their metrics; None with one worker (kept in memory).

    OO_METRICS_DIR is emptied first of prometheus-client's files (those of an earlier run
    would add to the counts), and only of them: the folder may hold other files, even the
    database. Otherwise a temporary folder is made, and removed at exit.
    """
    if settings.workers == 1:
        yield None
        return
    if settings.metrics_dir is not None:
        settings.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in settings.metrics_dir.glob("*.db"):
            if METRICS_FILE.fullmatch(stale.name) and stale.is_file():
                stale.unlink()
        yield settings.metrics_dir
        return
    folder = Path(tempfile.mkdtemp(prefix="oo-serving-metrics-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@app.command()
def migrate(database: DatabaseOption = None) -> None:
    """Create or upgrade the database schema; a no-op when it is current."""
    settings = _settings(database_url=database)
    logging.config.dictConfig(log_config(settings))  # the driver's warnings, redacted
    _run_or_exit(_migrate(settings))
    typer.echo(f"oo-serving: schema of {redact_url(settings.database_url)} is current")


# Far beyond any retention (about 2,700 years), and small enough that the cut-off stays a
# millisecond timestamp the databases can compare.
MAX_PRUNE_DAYS = 1_000_000


def _prune_days(days: float) -> float:
    """A usage error for anything but a finite number of days in range: infinity and huge
    values once ended in a traceback when turned into a cut-off timestamp. `isfinite`
    also catches NaN, which compares false with every bound."""
    if not math.isfinite(days) or not 0 <= days <= MAX_PRUNE_DAYS:
        raise typer.BadParameter(f"{days} is not a number of days from 0 to {MAX_PRUNE_DAYS}")
    return days


async def _prune(settings: Settings, older_than_ms: int, batch_size: int) -> int:
    store = open_store(settings)
    await store.open()
    try:
        total = 0
        while deleted := await store.prune_decisions(older_than_ms, batch_size):
            total += deleted
        return total
    finally:
        await store.close()


@app.command()
def prune(
    older_than_days: Annotated[
        float,
        typer.Option(
            callback=_prune_days,
            help=f"Delete decisions logged more than this many days ago (0 to {MAX_PRUNE_DAYS}).",
        ),
    ],
    database: DatabaseOption = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Decisions deleted per transaction.")
    ] = 10_000,
) -> None:
    """Delete old decisions from the log, in short transactions; safe while serving.

    Rewards for pruned decisions answer 404 when sent with their event_id, and /features
    of a user idle for longer than the window comes back shorter.
    """
    settings = _settings(database_url=database)
    logging.config.dictConfig(log_config(settings))  # the driver's warnings, redacted
    cutoff_ms = time.time_ns() // 1_000_000 - int(older_than_days * 86_400_000)
    deleted = _run_or_exit(_prune(settings, cutoff_ms, batch_size))
    typer.echo(f"oo-serving: deleted {deleted} decisions older than {older_than_days} days")


# ── check ────────────────────────────────────────────────────────────────────

# A check's cross-table statements read whole tables: on PostgreSQL they get up to the
# longest statement timeout the settings allow, not a request's few seconds.
CHECK_STATEMENT_TIMEOUT_MS = 600_000


async def _check(settings: Settings) -> CheckReport:
    if settings.database_url.startswith("sqlite:"):
        path = sqlite_path(settings.database_url)
        if not path.is_file():  # opening would create an empty one, and call it clean
            raise StoreUnavailable(f"no database at {path}")
    store = open_store(settings)
    try:
        await store.open(migrate=False)  # a check changes nothing, the schema included
        # Summed rewards (OO_REWARD_AGGREGATION=sum) may exceed [-1, 1]: held to their count.
        return await store.check(summed_rewards=settings.reward_aggregation == "sum")
    finally:
        await store.close()


@app.command()
def check(
    database: DatabaseOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
) -> None:
    """Check every model and decision against the service's invariants; safe while serving.

    Reads in pages, without a write lock, and changes nothing: a schema that is not
    current is refused (run `oo-serving migrate` first). Under OO_REWARD_AGGREGATION=sum
    a decision's reward is held to |reward| <= its reward count, not to [-1, 1].
    Exit code 0: no violation; 1: violations, one line per kind with up to 20 user ids;
    2: the database cannot be opened.
    """
    settings = _settings(database_url=database)
    logging.config.dictConfig(log_config(settings))  # the driver's warnings, redacted
    timeout_ms = max(settings.pg_statement_timeout_ms, CHECK_STATEMENT_TIMEOUT_MS)
    settings = settings.model_copy(update={"pg_statement_timeout_ms": timeout_ms})
    report = _run_or_exit(_check(settings))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


# ── simulate ─────────────────────────────────────────────────────────────────

SIMULATE_SCENARIOS = ("linear", "realistic", "drift", "slow-drift")  # sim/scenarios.py
SIMULATE_POLICIES = ("linucb-v1", "linucb-v2")
SIMULATE_IGNORED = ("no-reward", "zero")  # sim/runner.py
# Scenario settings that have an option of their own.
SIMULATE_OWN_OPTIONS = {"users": "--users", "rounds": "--rounds"}


def _refuse(message: str) -> NoReturn:
    typer.echo(f"oo-serving: {message}", err=True)
    raise typer.Exit(2)


def _seeds(text: str) -> list[int]:
    seeds = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdecimal() or not item.isascii() or int(item) >= 2**32:
            _refuse(f"--seeds {text!r}: {item!r} is not a seed (an int from 0 to 2**32 - 1)")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        _refuse(f"--seeds {text!r}: a seed is given twice (the SEs treat seeds as independent)")
    return seeds


def _simulate_command(
    scenario: str,
    users: int,
    rounds: int,
    seeds: list[int],
    arrival: str,
    policies: list[str],
    baseline: str,
    assignments: list[str],
    refresh_every: int,
    ignored: str,
    cold_start_rounds: int,
) -> str:
    """The command line that reproduces a run, every setting spelled out."""
    args = ["oo-serving", "simulate", "--scenario", scenario, "--users", str(users)]
    args += ["--rounds", str(rounds), "--seeds", ",".join(map(str, seeds))]
    args += ["--arrival", arrival]
    for spec in policies:
        args += ["--policy", spec]
    args += ["--baseline", baseline]
    for assignment in assignments:
        args += ["--set", assignment]
    args += ["--refresh-every", str(refresh_every), "--ignored", ignored]
    args += ["--cold-start-rounds", str(cold_start_rounds)]
    return shlex.join(args)


@app.command()
def simulate(
    scenario: Annotated[
        str, typer.Option(help=f"The simulated world: {', '.join(SIMULATE_SCENARIOS)}.")
    ] = "realistic",
    users: Annotated[int, typer.Option(min=1, help="Simulated users.")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="Tips shown to each user.")] = 100,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; the SEs are over seeds.")
    ] = "1,2,3,4,5",
    arrival: Annotated[
        str,
        typer.Option(
            help="Order users play in: round-robin, user-by-user, shuffled, or cohorts:K"
            " (K users at a time, each cohort round by round)."
        ),
    ] = "cohorts:8",
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            metavar="NAME[:KEY=VALUE,...]",
            help="A policy to run, with settings, e.g. linucb-v2:alpha=0.2; repeat to"
            " compare. Also: uniform, oracle."
            f" (default: {' and '.join(SIMULATE_POLICIES)})",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="The policy every other is compared with. (default: the first --policy)",
            show_default=False,
        ),
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Change a setting of the scenario, e.g. --set ignore_prob=0.5; repeatable.",
            show_default=False,
        ),
    ] = None,
    refresh_every: Annotated[
        int,
        typer.Option(min=1, help="Learned rewards between refreshes of the population prior."),
    ] = 100,
    ignored: Annotated[
        str,
        typer.Option(
            help="What a policy learns from an ignored tip: no-reward (nothing, as the app"
            " sends none) or zero."
        ),
    ] = "no-reward",
    cold_start_rounds: Annotated[
        int, typer.Option(min=1, help="Each user's first rounds, reported on their own.")
    ] = 10,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Also write DIR/summary.json, DIR/regret.png and DIR/report.html"
            " (needs the report extra).",
            metavar="DIR",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON instead of the table.")
    ] = False,
) -> None:
    """Run tip policies side by side in the task-app simulator; compare their regret.

    Every policy sees the same users, tasks and responses (common random numbers), so
    differences are paired: each figure is a mean over seeds ± its standard error.
    Exit code 2: a setting is not understood. See docs/simulation.md.
    """
    # Imported here: numpy-heavy, and matplotlib only when drawing; other commands never pay.
    from oo_serving.sim import policies as sim_policies
    from oo_serving.sim import report, runner, scenarios

    if scenario not in SIMULATE_SCENARIOS:
        _refuse(f"--scenario {scenario!r}: scenarios: {', '.join(SIMULATE_SCENARIOS)}")
    if ignored not in SIMULATE_IGNORED:
        _refuse(f"--ignored {ignored!r}: one of {', '.join(SIMULATE_IGNORED)}")
    seed_list = _seeds(seeds)
    try:
        arrival = runner.check_arrival(arrival)
    except ValueError as exc:
        _refuse(f"--arrival: {exc}")

    changes: dict[str, Any] = {}
    given: list[str] = []
    for assignment in assignments or []:
        try:
            key, value = scenarios.parse_setting(assignment)
        except ValueError as exc:
            _refuse(f"--set {assignment}: {exc}")
        if key in SIMULATE_OWN_OPTIONS:
            _refuse(f"--set {assignment}: use {SIMULATE_OWN_OPTIONS[key]} for {key}")
        if key in changes:
            _refuse(f"--set {assignment}: {key} is set twice")
        changes[key] = value
        given.append(assignment.strip())
    try:
        world = scenarios.preset(scenario, users=users, rounds=rounds, **changes)
    except ValueError as exc:
        _refuse(f"--set: {exc}" if changes else str(exc))

    specs = policy or list(SIMULATE_POLICIES)
    chosen: list[sim_policies.AnyPolicy] = []
    for spec in specs:
        try:
            chosen.append(sim_policies.parse_policy(spec))
        except ValueError as exc:
            _refuse(f"--policy: {exc}")
    names = [p.name for p in chosen]
    if len(set(names)) != len(names):
        _refuse(f"--policy: every policy must be given once, got {', '.join(names)}")
    baseline = names[0] if baseline is None else baseline.strip()
    if baseline not in names:
        _refuse(f"--baseline {baseline!r} is not one of the policies run: {', '.join(names)}")
    if out is not None:
        try:
            report.require_matplotlib()
        except report.ReportUnavailable as exc:
            _refuse(f"--out: {exc}")

    command = _simulate_command(
        scenario,
        users,
        rounds,
        seed_list,
        arrival,
        names,
        baseline,
        given,
        refresh_every,
        ignored,
        cold_start_rounds,
    )
    result = runner.run(
        world,
        chosen,
        seed_list,
        arrival=arrival,
        baseline=baseline,
        cold_start_rounds=cold_start_rounds,
        refresh_every=refresh_every,
        ignored="zero" if ignored == "zero" else "no-reward",
    )
    if as_json:
        summary = report.summary_json(result, command=command)
        typer.echo(json.dumps(summary, indent=2, allow_nan=False))
    else:
        for line in report.table(result):
            typer.echo(line)
    if out is not None:
        written = report.write(result, out, command=command)
        typer.echo(f"oo-serving: wrote {', '.join(map(str, written))}", err=True)


# ── sweep, evaluate, export: the decision log ────────────────────────────────


SinceOption = Annotated[
    str | None,
    typer.Option(help="First decision time: ISO-8601 (UTC), or a duration ago like 7d."),
]
UntilOption = Annotated[
    str | None, typer.Option(help="End of the range (excluded), as --since; default: now.")
]
UserOption = Annotated[
    list[str] | None, typer.Option(help="Only this user's decisions (repeatable).")
]


def _when_ms(text: str, flag: str, now_ms: int) -> int:
    """An ISO-8601 date or time (UTC unless it says otherwise), or a duration meaning
    that long ago (e.g. 7d), as Unix ms; a usage error otherwise."""
    value = text.strip()
    try:
        return now_ms - parse_duration_ms(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{flag} {text!r} is neither an ISO-8601 date or time (2026-12-01,"
            " 2026-12-01T09:30) nor a duration ago (7d, 24h)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _require_database(settings: Settings) -> None:
    """A command that reads a SQLite database refuses a file that is not there (opening it
    would create an empty one)."""
    if settings.database_url.startswith("sqlite:"):
        path = sqlite_path(settings.database_url)
        if not path.is_file():
            raise StoreUnavailable(f"no database at {path}")


async def _sweep(settings: Settings, now_ms: int) -> sweep_mod.SweepReport:
    _require_database(settings)
    store = open_store(settings)
    await store.open(migrate=False)
    try:
        service = service_of(settings, store)
        try:
            return await sweep_mod.sweep(
                service,
                default_reward=settings.default_reward,
                retention_ms=settings.log_retention_ms,
                now_ms=now_ms,
            )
        finally:
            await service.population.flush()  # what the default rewards taught linucb-v2
    finally:
        await store.close()


@app.command()
def sweep(
    database: DatabaseOption = None,
    default_reward: Annotated[
        float | None,
        typer.Option(
            help="Reward for decisions never rewarded in the window [env: OO_DEFAULT_REWARD]"
        ),
    ] = None,
    log_retention_days: Annotated[
        float | None,
        typer.Option(help="Delete decisions older than this [env: OO_LOG_RETENTION_DAYS]"),
    ] = None,
) -> None:
    """Give the default reward to decisions whose reward window closed without one, then
    delete decisions past the retention; safe while serving, from many machines at
    once, and to re-run.

    Learns the default rewards as the server would: run it with the server's OO_*
    settings (policy, shadow policies, reward window).
    """
    settings = _settings(
        database_url=database,
        default_reward=default_reward,
        log_retention_days=log_retention_days,
    )
    logging.config.dictConfig(log_config(settings))
    report = _run_or_exit(_sweep(settings, time.time_ns() // 1_000_000))
    typer.echo(
        f"oo-serving: gave {report.defaults_given} default rewards; deleted {report.pruned}"
        f" decisions older than {settings.log_retention_days:g} days"
    )


async def _evaluate(
    settings: Settings,
    since_ms: int,
    until_ms: int,
    users: list[str] | None,
    trained: dict[str, Any],
    train_until_ms: int | None,
    unrewarded_as: float | None,
    now_ms: int,
) -> Any:
    from oo_serving.evaluation import log as evaluation

    _require_database(settings)
    store = open_store(settings)
    await store.open(migrate=False)
    try:
        async with store.decision_log(since_ms, until_ms, users) as pages:
            return await evaluation.evaluate(
                pages,
                now_ms=now_ms,
                rewards=evaluation.Rewards(
                    settings.reward_wait_ms, settings.default_reward, unrewarded_as
                ),
                shadows=shadow_names(settings.shadow_policies),
                trained=trained,
                train_until_ms=train_until_ms,
            )
    finally:
        await store.close()


@app.command()
def evaluate(
    database: DatabaseOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    user: UserOption = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help="A registered policy to train on the decisions before --train-until and"
            " evaluate, frozen, on the rest: NAME or NAME:KEY=VALUE,... (repeatable)."
        ),
    ] = None,
    train_until: Annotated[
        str | None,
        typer.Option(help="Where training ends and evaluation starts, as --since."),
    ] = None,
    shadow_policies: Annotated[
        str | None,
        typer.Option(
            help="Shadow policies whose logged choices to evaluate [env: OO_SHADOW_POLICIES]"
        ),
    ] = None,
    unrewarded_as: Annotated[
        float | None,
        typer.Option(
            help="Value of a decision never rewarded in its window when OO_DEFAULT_REWARD"
            " is not set; default: skip it."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    html: Annotated[
        Path | None, typer.Option(help="Also write a self-contained HTML report with plots.")
    ] = None,
) -> None:
    """Estimate, from the decision log, the value of the logging policy, uniform, its
    greedy part, each shadow policy and each --policy, with IPS, SNIPS and DR, intervals
    clustered by user and anytime-valid confidence sequences; and say whether each beats
    what is running.

    One pass over the log in time order, memory bounded. Reads only; safe while serving.
    Exit code 0: evaluated (or too few events, said so); 2: bad input or no database.
    """
    from oo_serving.evaluation import render
    from oo_serving.sim.policies import PolicySim, parse_policy

    settings = _settings(database_url=database, shadow_policies=shadow_policies)
    logging.config.dictConfig(log_config(settings))
    now_ms = time.time_ns() // 1_000_000
    since_ms = _when_ms(since, "--since", now_ms) if since else 0
    until_ms = _when_ms(until, "--until", now_ms) if until else now_ms + 1
    train_until_ms = _when_ms(train_until, "--train-until", now_ms) if train_until else None
    trained: dict[str, Any] = {}
    for spec in policy or []:
        try:
            made = parse_policy(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--policy") from None
        if not isinstance(made, PolicySim):
            raise typer.BadParameter(
                f"{spec!r} is a baseline: uniform is always evaluated", param_hint="--policy"
            )
        trained[made.name] = made.policy
    if trained and train_until_ms is None:
        raise typer.BadParameter("--policy needs --train-until", param_hint="--train-until")
    command = shlex.join(["oo-serving", "evaluate", *sys.argv[2:]])
    result = _run_or_exit(
        _evaluate(
            settings, since_ms, until_ms, user, trained, train_until_ms, unrewarded_as, now_ms
        )
    )
    if html is not None:
        try:
            render.write_html(result, html, command=command)
        except RuntimeError as exc:
            _refuse(str(exc))
    if as_json:
        typer.echo(orjson.dumps(render.to_json(result)).decode())
    else:
        typer.echo(render.table(result), nl=False)
        if html is not None:
            typer.echo(f"report: {html}")


async def _export_log(
    settings: Settings,
    fmt: str,
    out: Path | None,
    since_ms: int,
    until_ms: int,
    users: list[str] | None,
) -> int:
    from oo_serving.logexport import export_log

    _require_database(settings)
    store = open_store(settings)
    await store.open(migrate=False)
    try:
        async with store.decision_log(since_ms, until_ms, users) as pages:
            if out is None:
                return await export_log(pages, sys.stdout.buffer, fmt)
            # Written beside the target and renamed once complete: a failed export
            # leaves no file that looks whole.
            partial = out.with_name(f".{out.name}.partial")
            try:
                with partial.open("wb") as stream:
                    rows = await export_log(pages, stream, fmt)
                partial.replace(out)
            finally:
                partial.unlink(missing_ok=True)
            return rows
    finally:
        await store.close()


@app.command("export")
def export_command(
    out: Annotated[str, typer.Option(help="File to write, or - for standard output.")],
    fmt: Annotated[
        str, typer.Option("--format", help="parquet or jsonl (one JSON object a line).")
    ] = "parquet",
    database: DatabaseOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    user: UserOption = None,
) -> None:
    """Write the decision log, one row per decision joined with its reward, with every
    candidate's raw features, vector and probability (docs/export.md); safe while
    serving. Parquet needs the `export` extra (pyarrow).
    """
    from oo_serving.logexport import FORMATS

    if fmt not in FORMATS:
        raise typer.BadParameter(
            f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="--format"
        )
    settings = _settings(database_url=database)
    logging.config.dictConfig(log_config(settings))
    now_ms = time.time_ns() // 1_000_000
    since_ms = _when_ms(since, "--since", now_ms) if since else 0
    until_ms = _when_ms(until, "--until", now_ms) if until else now_ms + 1
    target = None if out == "-" else Path(out)
    try:
        rows = _run_or_exit(_export_log(settings, fmt, target, since_ms, until_ms, user))
    except RuntimeError as exc:
        _refuse(str(exc))
    if target is not None:
        typer.echo(f"oo-serving: wrote {rows} decisions to {target}", err=True)


# ── backup ───────────────────────────────────────────────────────────────────


@app.command()
def backup(
    to: Annotated[Path, typer.Option("--to", help="The file to write (replaced if it exists).")],
    database: DatabaseOption = None,
) -> None:
    """Copy a SQLite database to a file as one consistent snapshot; safe while serving.

    Uses SQLite's online backup, in small steps, checks the copy, and renames it into
    place only when whole. To restore: stop the server, put the copy at the database's
    path (and delete any -wal and -shm files beside it), start the server. For
    PostgreSQL use pg_dump (docs/operations.md). Exit code 0: written; 2: no database,
    not SQLite, or the copy failed.
    """
    from oo_serving.backup import backup_sqlite

    settings = _settings(database_url=database)
    if not settings.database_url.startswith("sqlite:"):
        _refuse(
            "backup copies SQLite databases; for PostgreSQL use pg_dump, e.g."
            " `pg_dump --format=custom --file=oo.dump DBNAME` (docs/operations.md)"
        )
    try:
        report = backup_sqlite(sqlite_path(settings.database_url), to)
    except (OSError, ValueError, sqlite3.Error) as exc:
        _refuse(str(exc))
    typer.echo(
        f"oo-serving: backed up {report.models} models and {report.decisions} decisions"
        f" (schema version {report.schema_version}, {report.size_bytes:,} bytes) to {report.path}"
    )


def main() -> None:
    app()
