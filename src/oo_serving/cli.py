"""The `oo-serving` command: serve, migrate, prune, check, simulate, sweep, evaluate, export,
backup, restore (docs/cli.md).

A flag that stands for a setting has an OO_* environment variable; a flag given wins over
the variable. Its help names the variable and the default, both read from `Settings`.
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
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
import uvicorn
from pydantic import SecretStr, ValidationError
from uvicorn.config import STARTUP_FAILURE

from oo_serving import __version__
from oo_serving import server as lifecycle
from oo_serving import sweep as sweep_mod
from oo_serving.api.auth import SHORT_KEY_LENGTH, KeyRing, is_loopback
from oo_serving.check import CheckReport
from oo_serving.errors import SchemaError, StoreBusy, StoreUnavailable
from oo_serving.logs import log_config
from oo_serving.metrics import METRICS_FILE, MULTIPROCESS_DIR_ENV
from oo_serving.redact import redact_secrets, redact_url
from oo_serving.settings import Settings, parse_duration_ms, shadow_names
from oo_serving.store import migrations, open_store
from oo_serving.store.factory import backend_of
from oo_serving.store.memory import MEMORY_URL, is_memory_url
from oo_serving.store.memory import schema_version as memory_schema_version
from oo_serving.store.sqlite import sqlite_path
from oo_serving.wiring import service_of

T = TypeVar("T")
log = logging.getLogger("oo_serving")


class ExitCode(IntEnum):
    """How every command ends (docs/cli.md lists them per command)."""

    OK = 0
    # `check`: the database breaks an invariant. Any command: an unexpected error, with
    # a traceback (a bug to report).
    FAILED = 1
    # Nothing was done: a usage error, a setting or input refused, or a database that
    # cannot be used (unreachable, missing, not a database, a schema of another release).
    REFUSED = 2
    # `serve`: the server did not start (the address is taken, a worker failed to start).
    NOT_STARTED = STARTUP_FAILURE
    # Interrupted by Ctrl-C (SIGINT) before it finished; `serve` stops gracefully, with 0.
    INTERRUPTED = 130


app = typer.Typer(
    name="oo-serving",
    help="oO ML Serving: pick the next tip to show, learn from what the user does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help and errors: one line per error, flags shown as flags, nothing in
    # square brackets taken for markup.
    rich_markup_mode=None,
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


def default_text(value: Any) -> str:
    """A setting's default as its OO_* variable would spell it; `none` when empty."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def setting_option(name: str, *param_decls: str, help: str | None = None) -> Any:
    """A typer.Option for the setting `name`, left None when not given (the settings then
    read OO_<NAME>, else their default). Its help is the setting's description, or `help`,
    then `[env var: OO_<NAME>; default: ...]` read from Settings: never out of date."""
    field = Settings.model_fields[name]
    text = help or field.description or ""
    default = default_text(field.get_default(call_default_factory=True))
    return typer.Option(
        *param_decls,
        help=f"{text}  [env var: OO_{name.upper()}; default: {default}]",
        show_default=False,
    )


DatabaseOption = Annotated[
    str | None,
    setting_option(
        "database_url",
        "--database",
        help="The database, created if missing: sqlite:///relative.db, sqlite:////absolute.db"
        " (the folder too) or postgresql://user:password@host:port/dbname.",
    ),
]
# For the commands that read a database: they never create one.
ExistingDatabaseOption = Annotated[
    str | None,
    setting_option(
        "database_url",
        "--database",
        help="The database, which must exist: sqlite:///relative.db, sqlite:////absolute.db"
        " or postgresql://user:password@host:port/dbname.",
    ),
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


async def _migrate(settings: Settings) -> int:
    """Apply pending migrations; the schema version the database then has."""
    store = open_store(settings)
    await store.open()  # applies pending migrations, refuses a newer schema
    await store.close()
    # Opened, the schema is this release's latest: older ones were migrated, newer refused.
    backend = backend_of(settings.database_url)
    if backend == "memory":
        return memory_schema_version()
    return migrations.load(backend)[-1].version


def _refuse(message: str) -> NoReturn:
    """End the command with `message` on one line of stderr, password masked, and exit 2."""
    line = " ".join(part.strip() for part in redact_secrets(message).splitlines() if part.strip())
    typer.echo(f"oo-serving: {line}", err=True)
    raise typer.Exit(ExitCode.REFUSED)


def _database_error(exc: Exception, database_url: str) -> str:
    """The error's message, naming the database (password masked) if it does not yet:
    by its URL, or a SQLite database by its path."""
    message = str(exc)
    names = [redact_url(database_url), database_url]
    if database_url.startswith("sqlite:///"):
        names.append(str(Path(database_url.removeprefix("sqlite:///"))))  # as sqlite_path
    if any(name in message for name in names):
        return message
    return f"{message} (database {redact_url(database_url)})"


_MEMORY_OUT_OF_REACH = (
    f"{MEMORY_URL} keeps its data inside the serving process, where no other command can"
    " reach it: use a sqlite:/// or postgresql:// database"
)


def _require_database(settings: Settings) -> None:
    """A command that reads a database refuses a SQLite file that is not there: opening
    it would create an empty one, and report on it as if it were the real one. memory://
    is refused too: its data lives in the server's process, out of any command's reach."""
    if is_memory_url(settings.database_url):
        raise StoreUnavailable(_MEMORY_OUT_OF_REACH)
    if settings.database_url.startswith("sqlite:"):
        path = sqlite_path(settings.database_url)
        if not path.is_file():
            raise StoreUnavailable(f"no database at {path}")


def _run_or_exit(work: Coroutine[Any, Any, T], database_url: str) -> T:
    """Run `work`; a database that cannot be used ends the command with one line naming
    the cause and the database, and exit code 2.

    The line is redacted: a driver's error can quote the database URL, password and all.
    """
    try:
        return asyncio.run(work)
    except (SchemaError, StoreUnavailable, StoreBusy) as exc:  # StoreBusy: held by another
        _refuse(_database_error(exc, database_url))
    except ValueError as exc:  # a database URL that is not understood
        _refuse(str(exc))


@app.command()
def serve(
    host: Annotated[str | None, setting_option("host")] = None,
    port: Annotated[int | None, setting_option("port")] = None,
    workers: Annotated[int | None, setting_option("workers")] = None,
    database: DatabaseOption = None,
    insecure: Annotated[bool, setting_option("insecure", "--insecure")] = False,
) -> None:
    """Serve the HTTP API.

    Applies pending migrations first. Exit code 0: stopped by SIGTERM or SIGINT; 2: a
    setting refused or the database cannot be used; 3: the server did not start (the
    address is taken, a worker failed to start).
    """
    settings = _settings(
        host=host, port=port, workers=workers, database_url=database, insecure=insecure or None
    )
    logging.config.dictConfig(log_config(settings))
    _check_access(settings)
    schema_version = _run_or_exit(_migrate(settings), settings.database_url)
    if not settings.log_hash_key.get_secret_value():
        # One key for all workers of this run, so that a user hashes the same in each.
        settings = settings.model_copy(update={"log_hash_key": SecretStr(secrets.token_hex(32))})
    with _metrics_folder(settings) as folder:
        _export(settings)
        if folder is not None:
            os.environ[MULTIPROCESS_DIR_ENV] = str(folder)
        _log_start(settings, schema_version)
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


def start_fields(settings: Settings, schema_version: int) -> dict[str, Any]:
    """What a server serves, as the start-up log line's fields; the password masked."""
    return {
        "version": __version__,
        "database": redact_url(settings.database_url),
        "schema_version": schema_version,
        "policy": settings.policy,
        "policy_split": settings.policy_split or "none",
        "exploration": settings.exploration,
        "shadow_policies": settings.shadow_policies or "none",
        "workers": settings.workers,
        "listen": f"{settings.host}:{settings.port}",
    }


def _log_start(settings: Settings, schema_version: int) -> None:
    fields = start_fields(settings, schema_version)
    workers = f"{settings.workers} worker{'s' if settings.workers > 1 else ''}"
    policy = (
        f"policy split {settings.policy_split}"
        if settings.policy_split
        else f"policy {settings.policy}"
    )
    log.info(
        "oo-serving %s starting on %s with %s: database %s (schema version %d), %s,"
        " exploration %s, shadow policies %s",
        __version__,
        fields["listen"],
        workers,
        fields["database"],
        schema_version,
        policy,
        settings.exploration,
        fields["shadow_policies"],
        extra={"fields": fields},
    )


def _check_access(settings: Settings) -> None:
    """Refuse to serve without keys beyond loopback, unless told to; say how it runs."""
    try:
        ring = KeyRing.load(settings.api_keys.get_secret_value(), settings.api_keys_file)
    except ValueError as exc:
        _refuse(str(exc))
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
        _refuse(
            f"refusing to serve {where} without API keys: anyone who can reach it could"
            " read and erase every user's data. Set OO_API_KEYS or OO_API_KEYS_FILE, listen"
            " on 127.0.0.1, or pass --insecure."
        )
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
        try:
            settings.metrics_dir.mkdir(parents=True, exist_ok=True)
            for stale in settings.metrics_dir.glob("*.db"):
                if METRICS_FILE.fullmatch(stale.name) and stale.is_file():
                    stale.unlink()
        except OSError as exc:
            _refuse(f"OO_METRICS_DIR {settings.metrics_dir}: {exc.strerror or exc}")
        yield settings.metrics_dir
        return
    folder = Path(tempfile.mkdtemp(prefix="oo-serving-metrics-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@app.command()
def migrate(database: DatabaseOption = None) -> None:
    """Create or upgrade the database schema; a no-op when it is current.

    Exit code 0: the schema is current; 2: the database cannot be used or its schema is
    newer than this release.
    """
    settings = _settings(database_url=database)
    logging.config.dictConfig(log_config(settings))  # the driver's warnings, redacted
    version = _run_or_exit(_migrate(settings), settings.database_url)
    typer.echo(
        f"oo-serving: schema of {redact_url(settings.database_url)} is current (version {version})"
    )


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
    _require_database(settings)
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
    database: ExistingDatabaseOption = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Decisions deleted per transaction.")
    ] = 10_000,
) -> None:
    """Delete old decisions from the log, in short transactions; safe while serving.

    Rewards for pruned decisions answer 404 when sent with their event_id, and /features
    of a user idle for longer than the window comes back shorter. Applies pending
    migrations first. Exit code 0: done; 2: bad input, or the database cannot be used (a
    SQLite path with no file is refused, never created).
    """
    settings = _settings(database_url=database)
    logging.config.dictConfig(log_config(settings))  # the driver's warnings, redacted
    cutoff_ms = time.time_ns() // 1_000_000 - int(older_than_days * 86_400_000)
    deleted = _run_or_exit(_prune(settings, cutoff_ms, batch_size), settings.database_url)
    typer.echo(f"oo-serving: deleted {deleted} decisions older than {older_than_days} days")


# ── check ────────────────────────────────────────────────────────────────────

# A check's cross-table statements read whole tables: on PostgreSQL they get up to the
# longest statement timeout the settings allow, not a request's few seconds.
CHECK_STATEMENT_TIMEOUT_MS = 600_000


async def _check(settings: Settings) -> CheckReport:
    _require_database(settings)  # opening would create an empty one, and call it clean
    store = open_store(settings)
    try:
        await store.open(migrate=False)  # a check changes nothing, the schema included
        # Summed rewards (OO_REWARD_AGGREGATION=sum) may exceed [-1, 1]: held to their count.
        return await store.check(summed_rewards=settings.reward_aggregation == "sum")
    finally:
        await store.close()


@app.command()
def check(
    database: ExistingDatabaseOption = None,
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
    report = _run_or_exit(_check(settings), settings.database_url)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.FAILED)


# ── simulate ─────────────────────────────────────────────────────────────────

SIMULATE_SCENARIOS = ("linear", "realistic", "drift", "slow-drift")  # sim/scenarios.py
SIMULATE_POLICIES = ("linucb-v1", "linucb-v2")
SIMULATE_IGNORED = ("no-reward", "zero")  # sim/runner.py
# Scenario settings that have an option of their own.
SIMULATE_OWN_OPTIONS = {"users": "--users", "rounds": "--rounds"}


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
            f"  [default: {' and '.join(SIMULATE_POLICIES)}]",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="The policy every other is compared with.  [default: the first --policy]",
            show_default=False,
        ),
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Change a setting of the scenario, e.g. --set ignore_prob=0.5; repeatable."
            "  [default: none]",
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
            " (needs the report extra).  [default: none]",
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
    typer.Option(
        help="First decision time: ISO-8601 (UTC), or a duration ago like 7d."
        "  [default: the first decision]"
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(help="End of the range (excluded), as --since.  [default: now]"),
]
UserOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="ID", help="Only this user's decisions (repeatable).  [default: every user]"
    ),
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
    database: ExistingDatabaseOption = None,
    default_reward: Annotated[
        float | None,
        setting_option(
            "default_reward",
            help="Reward for each decision never rewarded in its window; none: leave them"
            " unrewarded.",
        ),
    ] = None,
    log_retention_days: Annotated[
        float | None,
        setting_option(
            "log_retention_days",
            help="Delete decisions older than this many days (never shorter than the"
            " reward window, OO_REWARD_WAIT).",
        ),
    ] = None,
) -> None:
    """Give the default reward to decisions whose reward window closed without one, then
    delete decisions past the retention; safe while serving, from many machines at
    once, and to re-run.

    Learns the default rewards as the server would: run it with the server's OO_*
    settings (policy, shadow policies, reward window). Exit code 0: done; 2: a setting
    refused, or the database cannot be used (a SQLite path with no file is refused).
    """
    settings = _settings(
        database_url=database,
        default_reward=default_reward,
        log_retention_days=log_retention_days,
    )
    logging.config.dictConfig(log_config(settings))
    report = _run_or_exit(_sweep(settings, time.time_ns() // 1_000_000), settings.database_url)
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
    save_as: str | None,
) -> Any:
    """The evaluation of [since_ms, until_ms); kept in the database for /dashboard when
    save_as (the command line) is given."""
    from oo_serving.evaluation import log as evaluation
    from oo_serving.evaluation import render, saved

    _require_database(settings)
    store = open_store(settings)
    await store.open(migrate=False)
    try:
        async with store.decision_log(since_ms, until_ms, users) as pages:
            result = await evaluation.evaluate(
                pages,
                now_ms=now_ms,
                rewards=evaluation.Rewards(
                    settings.reward_wait_ms, settings.default_reward, unrewarded_as
                ),
                shadows=shadow_names(settings.shadow_policies),
                trained=trained,
                train_until_ms=train_until_ms,
            )
        if save_as is not None:
            await saved.save_report(
                store,
                render.to_json(result),
                command=save_as,
                since_ms=since_ms or None,
                until_ms=min(until_ms, now_ms),
                created_ms=now_ms,
            )
        return result
    finally:
        await store.close()


@app.command()
def evaluate(
    database: ExistingDatabaseOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    user: UserOption = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME[:KEY=VALUE,...]",
            help="A registered policy to train on the decisions before --train-until and"
            " evaluate, frozen, on the rest (repeatable).  [default: none]",
        ),
    ] = None,
    train_until: Annotated[
        str | None,
        typer.Option(
            help="Where training ends and evaluation starts, as --since; needed by --policy."
            "  [default: none]"
        ),
    ] = None,
    shadow_policies: Annotated[
        str | None,
        setting_option(
            "shadow_policies",
            help="Shadow policies whose logged choices to evaluate, comma-separated.",
        ),
    ] = None,
    unrewarded_as: Annotated[
        float | None,
        typer.Option(
            help="Value of a decision never rewarded in its window when OO_DEFAULT_REWARD"
            " is not set.  [default: none, such decisions are skipped]"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="Also write a self-contained HTML report with plots.  [default: none]"),
    ] = None,
    save: Annotated[
        bool,
        typer.Option(
            "--save/--no-save",
            help="Keep the result in the database, where /dashboard shows the latest"
            " (the only write this command makes).",
        ),
    ] = False,
) -> None:
    """Estimate, from the decision log, the value of the logging policy, uniform, its
    greedy part, each shadow policy and each --policy, with IPS, SNIPS and DR, intervals
    clustered by user and anytime-valid confidence sequences; and say whether each beats
    what is running.

    One pass over the log in time order, memory bounded. Reads only, but for --save;
    safe while serving.
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
            settings,
            since_ms,
            until_ms,
            user,
            trained,
            train_until_ms,
            unrewarded_as,
            now_ms,
            command if save else None,
        ),
        settings.database_url,
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
    database: ExistingDatabaseOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    user: UserOption = None,
) -> None:
    """Write the decision log, one row per decision joined with its reward, with every
    candidate's raw features, vector and probability (docs/export.md); safe while
    serving. Parquet needs the `export` extra (pyarrow). Exit code 0: written; 2: bad
    input, or the database cannot be used (a SQLite path with no file is refused).
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
        rows = _run_or_exit(
            _export_log(settings, fmt, target, since_ms, until_ms, user), settings.database_url
        )
    except typer.Exit:  # a RuntimeError too, already said why
        raise
    except RuntimeError as exc:
        _refuse(str(exc))
    if target is not None:
        typer.echo(f"oo-serving: wrote {rows} decisions to {target}", err=True)


# ── backup ───────────────────────────────────────────────────────────────────


@app.command()
def backup(
    to: Annotated[Path, typer.Option("--to", help="The file to write (replaced if it exists).")],
    database: Annotated[
        str | None,
        setting_option(
            "database_url",
            "--database",
            help="The SQLite database to copy: sqlite:///relative.db or"
            " sqlite:////absolute.db (a file that must exist).",
        ),
    ] = None,
) -> None:
    """Copy a SQLite database to a file as one consistent snapshot; safe while serving.

    Uses SQLite's online backup, in small steps, checks the copy, and renames it into
    place only when whole; `oo-serving restore --from FILE` puts it back. For
    PostgreSQL use pg_dump (docs/operations.md). Exit code 0: written; 2: no database,
    not SQLite, or the copy failed.
    """
    from oo_serving.backup import backup_sqlite

    path = _sqlite_file(
        database,
        "backup copies SQLite databases; for PostgreSQL use pg_dump, e.g."
        " `pg_dump --format=custom --file=oo.dump DBNAME` (docs/operations.md)",
    )
    try:
        report = backup_sqlite(path, to)
    except (OSError, ValueError, sqlite3.Error) as exc:
        _refuse(str(exc))
    typer.echo(
        f"oo-serving: backed up {report.models} models and {report.decisions} decisions"
        f" (schema version {report.schema_version}, {report.size_bytes:,} bytes) to {report.path}"
    )


@app.command()
def restore(
    source: Annotated[
        Path,
        typer.Option(
            "--from",
            help="The backup to restore: a file `oo-serving backup` wrote.",
            show_default=False,
        ),
    ],
    database: Annotated[
        str | None,
        setting_option(
            "database_url",
            "--database",
            help="The SQLite database to replace: sqlite:///relative.db or"
            " sqlite:////absolute.db (created, with its folder, if missing).",
        ),
    ] = None,
) -> None:
    """Replace a SQLite database with a backup; every process using it stopped first.

    Checks the backup (a SQLite database, intact, of a schema this release knows),
    keeps the previous database beside it as <database>.before-restore-<UTC time>, and
    copies the backup in as one transaction: a crash leaves the previous database or
    the restored one. An older schema is restored as it is, and migrated by the next
    serve or migrate. For PostgreSQL use pg_restore (docs/operations.md). Exit code 0:
    restored; 2: nothing changed: the database is open in another process (a server),
    or it is PostgreSQL, or the backup is missing, not SQLite, corrupt or of a newer
    schema.
    """
    from oo_serving.restore import RestoreRefused, restore_sqlite

    path = _sqlite_file(
        database,
        "restore replaces SQLite databases; for PostgreSQL restore a pg_dump into a new"
        " database with pg_restore, e.g. `pg_restore --no-owner --dbname=NEWDB oo.dump`,"
        " and point OO_DATABASE_URL at it (docs/operations.md)",
    )
    try:
        report = restore_sqlite(source, path)
    except (RestoreRefused, OSError, ValueError) as exc:
        _refuse(str(exc))
    schema = f"schema version {report.schema_version}"
    if report.schema_version < report.latest_version:
        schema += f", migrated to {report.latest_version} by the next serve or migrate"
    kept = (
        f"the previous database is kept as {report.kept}"
        if report.kept is not None
        else "there was no database before"
    )
    typer.echo(
        f"oo-serving: restored {report.models} models and {report.decisions} decisions"
        f" ({schema}) from {report.source} to {report.database}; {kept}"
    )


def _sqlite_file(database: str | None, not_sqlite: str) -> Path:
    """The path of the SQLite database that --database or OO_DATABASE_URL names; refused
    with `not_sqlite` (what to do instead) when it names another backend."""
    settings = _settings(database_url=database)
    try:
        backend = backend_of(settings.database_url)
    except ValueError as exc:
        _refuse(str(exc))
    if backend == "memory":
        _refuse(_MEMORY_OUT_OF_REACH)
    if backend != "sqlite":
        _refuse(not_sqlite)
    return sqlite_path(settings.database_url)


def main() -> None:
    app()
