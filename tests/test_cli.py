"""The command line: its help (every setting's variable and default, flags shown as
flags), its errors (one line naming the cause and the database, never a password), its
start-up log and its exit codes (docs/cli.md); what `serve` and `prune` do with odd
settings and inputs, and how database URLs are shown (tests/e2e/test_migrations.py runs
`migrate` with passwords).

Real processes, real SQLite files and a real PostgreSQL; every refusal is a message and an
exit code, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import typer.main
from pydantic import SecretStr

from oo_serving.cli import ExitCode
from oo_serving.cli import app as cli_app
from oo_serving.redact import redact_secrets, redact_url
from oo_serving.settings import Settings
from oo_serving.store import migrations
from tests.conftest import TURNS, Server
from tests.support import SideBySide, metric, oo_serving

DOCS = Path(__file__).parent.parent / "docs" / "cli.md"


def _score(server: Server, user: str) -> None:
    body = {"user_id": user, "candidates": [{"id": "t1", "content": "c", "source": "s"}]}
    with server.client() as c:
        r = c.post("/score", json=body)
        assert r.status_code == 200, r.text


def test_a_metrics_folder_shared_with_the_database_keeps_the_database(
    server_factory: Any, tmp_path: Path
) -> None:
    """Start-up once emptied OO_METRICS_DIR of every *.db: the database's folder lost it."""
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "oo.db"
    notes = folder / "notes.db"
    sqlite3.connect(notes).execute("CREATE TABLE note (text TEXT)").connection.close()
    env = {"OO_METRICS_DIR": str(folder)}

    first: Server = server_factory(workers=2, db_path=db, env=env)
    _score(first, "kept-user")
    first.stop()
    stale = folder / "counter_999999.db"  # a metrics file of a run long gone
    stale.write_bytes(b"\0" * 8)

    second: Server = server_factory(workers=2, db_path=db, env=env)
    with second.client() as c:
        assert c.get("/stats/kept-user").json()["pulls"] == 1
        # /metrics reads only its own files, not the databases beside them.
        _score(second, "another-user")
        r = c.get("/metrics")
        assert r.status_code == 200, r.text
        assert metric(r.text, "oo_decisions_total") == 1
    second.stop()
    assert db.is_file()
    assert notes.is_file()
    with sqlite3.connect(notes) as conn:
        assert conn.execute("SELECT count(*) FROM note").fetchone() == (0,)
    assert not stale.exists()  # prometheus-client's own files are still cleared


@pytest.mark.parametrize("days", ["inf", "-inf", "nan", "1e300", "1000001", "-1"])
def test_prune_refuses_days_that_are_not_a_sane_finite_number(tmp_path: Path, days: str) -> None:
    """`inf` and `1e300` once ended in a traceback; NaN compares false with any bound."""
    db = tmp_path / "oo.db"
    result = oo_serving("prune", f"--older-than-days={days}", "--database", f"sqlite:///{db}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Invalid value for '--older-than-days'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists()  # refused before the database is opened


@pytest.mark.parametrize("days", ["0", "90", "0.5", "1000000"])
def test_prune_takes_any_number_of_days_up_to_the_bound(tmp_path: Path, days: str) -> None:
    url = f"sqlite:///{tmp_path}/oo.db"
    assert oo_serving("migrate", "--database", url).returncode == 0
    result = oo_serving("prune", "--older-than-days", days, "--database", url)
    assert result.returncode == 0, result.stderr
    assert "deleted 0 decisions" in result.stdout


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://oo:s3cretpw@db.internal:5432/oo",
            "postgresql://oo:***@db.internal:5432/oo",
        ),
        ("postgres://oo:s3cretpw@db/oo", "postgres://oo:***@db/oo"),
        ("postgresql://oo@db:5432/oo", "postgresql://oo@db:5432/oo"),  # no password
        ("postgresql://db/oo", "postgresql://db/oo"),
        ("postgresql://:s3cretpw@db/oo", "postgresql://:***@db/oo"),
        ("postgresql://oo:@db/oo", "postgresql://oo:***@db/oo"),
        # `@` percent-encoded, and raw `@` or `/` (which libpq would misread, but quotes)
        ("postgresql://oo:s3cret%40pw@db/oo", "postgresql://oo:***@db/oo"),
        ("postgresql://oo:s3cret@pw@db/oo", "postgresql://oo:***@db/oo"),
        ("postgresql://oo:s3/cret@db/oo", "postgresql://oo:***@db/oo"),
        (
            "postgresql://oo@db/oo?sslmode=require&password=s3cretpw&application_name=x",
            "postgresql://oo@db/oo?sslmode=require&password=***&application_name=x",
        ),
        ("postgresql://oo@db/oo?PassWord=s3cretpw", "postgresql://oo@db/oo?PassWord=***"),
        (
            "postgresql://oo:s3cretpw@db/oo?password=other#x",
            "postgresql://oo:***@db/oo?password=***#x",
        ),
        (
            "postgresql://oo:s3cretpw@[::1:5432/oo",  # malformed: masked all the same
            "postgresql://oo:***@[::1:5432/oo",
        ),
        ("mysql://u:s3cretpw@h/db", "mysql://u:***@h/db"),
        ("sqlite:///./var/oo-serving.db", "sqlite:///./var/oo-serving.db"),
        ("sqlite:////srv/a:b@c/oo.db", "sqlite:////srv/a:b@c/oo.db"),  # a path, not a user
        ("host=db user=oo password=s3cretpw", "host=db user=oo password=***"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_rest(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    assert redact_url(redacted) == redacted


def test_redact_secrets_masks_every_url_in_a_message() -> None:
    message = (
        'error connecting: invalid URI: "postgresql://oo:s3cretpw@[::1/oo"; tried'
        " postgres://a:s3cretpw@b/c and host=h password='s3 cret pw' dbname=x"
    )
    assert redact_secrets(message) == (
        'error connecting: invalid URI: "postgresql://oo:***@[::1/oo"; tried'
        " postgres://a:***@b/c and host=h password=*** dbname=x"
    )


def test_version_prints_the_package_version() -> None:
    from oo_serving import __version__

    done = oo_serving("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"oo-serving {__version__}"


# ── help ─────────────────────────────────────────────────────────────────────

COMMANDS = ("serve", "migrate", "prune", "check", "simulate", "sweep", "evaluate", "export")
COMMANDS += ("backup", "restore")
# Options named as a setting is, that are something else: the policies to train or to
# simulate, not OO_POLICY.
NOT_SETTINGS = {("evaluate", "policy"), ("simulate", "policy")}
# Options named otherwise than their setting.
SETTING_OF = {"database": "database_url"}
# The options that stand for a setting, at the least.
SETTING_OPTIONS = {
    ("serve", "host"),
    ("serve", "port"),
    ("serve", "workers"),
    ("serve", "insecure"),
    ("sweep", "default_reward"),
    ("sweep", "log_retention_days"),
    ("evaluate", "shadow_policies"),
    *{(command, "database_url") for command in set(COMMANDS) - {"simulate"}},
}


def commands() -> dict[str, Any]:
    group = typer.main.get_command(cli_app)
    return dict(group.commands)  # type: ignore[attr-defined]


def option_help(command: Any, name: str, param: Any) -> str:
    """The help of one option as `--help` shows it, on one line."""
    record = param.get_help_record(command.context_class(command, info_name=name))
    assert record is not None, (name, param.name)
    return " ".join(record[1].split())


def spelled(value: Any) -> str:
    """A default as an OO_* variable spells it."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_every_command_is_known_to_these_tests() -> None:
    assert set(commands()) == set(COMMANDS)


def test_an_option_of_a_setting_names_its_variable_and_its_real_default() -> None:
    found = set()
    for name, command in commands().items():
        for param in command.params:
            setting = SETTING_OF.get(param.name, param.name)
            if setting not in Settings.model_fields or (name, param.name) in NOT_SETTINGS:
                continue
            found.add((name, setting))
            default = Settings.model_fields[setting].get_default(call_default_factory=True)
            text = option_help(command, name, param)
            assert f"[env var: OO_{setting.upper()}; default: {spelled(default)}]" in text, (
                name,
                text,
            )
            # Not given, the option is left to the settings: OO_<NAME>, else the default.
            assert param.default in (None, False), (name, param.name, param.default)
    assert found >= SETTING_OPTIONS


def test_every_option_that_takes_a_value_states_its_default() -> None:
    for name, command in commands().items():
        for param in command.params:
            if param.is_flag or param.required:
                continue
            assert "default: " in option_help(command, name, param), (name, param.name)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_as_flags_and_names_every_variable(command: str) -> None:
    done = oo_serving(command, "--help")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "<bool>" not in out
    assert "BOOLEAN" not in out
    assert "╭" not in out  # plain text, one option a row
    params = commands()[command].params
    for param in params:
        if param.is_flag:
            names = " / ".join([*param.opts, *param.secondary_opts])
            first_word = param.help.split()[0]
            # The flag, then straight its help: no value after it.
            assert re.search(rf"^ +{re.escape(names)} +{re.escape(first_word)}", out, re.M), out
        setting = SETTING_OF.get(param.name, param.name)
        if setting in Settings.model_fields and (command, param.name) not in NOT_SETTINGS:
            assert f"OO_{setting.upper()}" in out


def test_serve_help_shows_insecure_as_a_flag() -> None:
    out = oo_serving("serve", "--help").stdout
    [line] = [line for line in out.splitlines() if "--insecure" in line]
    assert line.split()[:2] == ["--insecure", "Serve"]


def run_with(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`oo-serving *args` with only these OO_* variables, in `cwd`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
    return subprocess.run(
        [sys.executable, "-m", "oo_serving", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **env},
        timeout=120,
        check=False,
    )


def test_the_default_database_in_the_help_is_the_one_used(tmp_path: Path) -> None:
    """Run without --database or OO_DATABASE_URL, a command reads the default it shows."""
    done = run_with("check", env={}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "oo-serving: no database at var/oo-serving.db"
    help_text = " ".join(oo_serving("check", "--help").stdout.split())
    assert "default: sqlite:///./var/oo-serving.db]" in help_text


# ── errors: one line with the cause and the database, never a password ───────

SECRET = "secret"
UNREACHABLE = f"postgresql://u:{SECRET}@127.0.0.1:1/x"
UNREACHABLE_SHOWN = "postgresql://u:***@127.0.0.1:1/x"


def with_password(url: str) -> str:
    """`url` with a password (the local cluster trusts, and ignores it)."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{SECRET}@{host}"))


# Every command that opens a database, with what else it needs to get that far.
OPENING = {
    "serve": ("serve", "--port", "0"),
    "migrate": ("migrate",),
    "check": ("check",),
    "prune": ("prune", "--older-than-days", "30"),
    "sweep": ("sweep",),
    "evaluate": ("evaluate",),
    "export": ("export", "--format", "jsonl", "--out", "-"),
}


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The command was refused, exit code 2, without a traceback or the password; the
    last line of stderr, which says why."""
    assert done.returncode == ExitCode.REFUSED == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert done.stdout == ""
    return done.stderr.strip().splitlines()[-1]


MISSING = "missing-"  # the key of a command run on a database that does not exist
MISSING_COMMANDS = ["serve", "migrate", "check"]


@pytest.fixture(scope="module")
def unusable(request: pytest.FixtureRequest) -> tuple[SideBySide, str]:
    """Every command of the two tests below, started at once (the pool retries a
    connection for seconds before it gives up: run one by one, the waits add up), and the
    database that does not exist as it is shown (without PostgreSQL, only the commands on
    an unreachable one: the others' test skips)."""
    commands = {key: (*command, "--database", UNREACHABLE) for key, command in OPENING.items()}
    shown = ""
    try:
        admin_dsn = str(request.getfixturevalue("postgres_admin_dsn"))
    except pytest.skip.Exception:
        pass
    else:
        parts = urlsplit(admin_dsn)
        name = f"oo_missing_{uuid.uuid4().hex[:8]}"
        where = f"{parts.username or 'postgres'}:{{}}@{parts.hostname}:{parts.port or 5432}"
        for key in MISSING_COMMANDS:
            url = f"postgresql://{where.format(SECRET)}/{name}"
            commands[MISSING + key] = (*OPENING[key], "--database", url)
        shown = f"postgresql://{where.format('***')}/{name}"
    with TURNS.turn():  # the commands talk to PostgreSQL: not while it restarts
        side = SideBySide(commands)
        try:
            side.wait()
        finally:
            side.close()
    return side, shown


# Both tests are one batch: under pytest-xdist they run on one worker, which starts it once.
@pytest.mark.xdist_group("cli-unusable-database")
@pytest.mark.parametrize("command", list(OPENING))
def test_an_unreachable_database_is_named_with_the_cause(
    unusable: tuple[SideBySide, str], command: str
) -> None:
    done = unusable[0].result(command)
    line = refusal(done)
    assert line.startswith(f"oo-serving: cannot connect to PostgreSQL at {UNREACHABLE_SHOWN}: ")
    assert "Connection refused" in line
    assert "pool initialization incomplete" not in done.stderr


@pytest.mark.xdist_group("cli-unusable-database")
@pytest.mark.parametrize("command", MISSING_COMMANDS)
def test_a_database_that_does_not_exist_is_named_with_the_cause(
    postgres_admin_dsn: str, unusable: tuple[SideBySide, str], command: str
) -> None:
    side, shown = unusable
    line = refusal(side.result(MISSING + command))
    name = shown.rpartition("/")[2]
    assert line.startswith(f"oo-serving: cannot connect to PostgreSQL at {shown}: ")
    assert line.endswith(f'database "{name}" does not exist')


def with_extra(command: str, tmp_path: Path) -> tuple[str, ...]:
    """`command` with what it needs besides a database."""
    return OPENING.get(command, ("backup", "--to", str(tmp_path / "copy.db")))


@pytest.mark.parametrize("command", [*OPENING, "backup"])
def test_an_unsupported_database_url_is_refused_without_its_password(
    tmp_path: Path, command: str
) -> None:
    done = oo_serving(*with_extra(command, tmp_path), "--database", f"mysql://u:{SECRET}@h/x")
    line = refusal(done)
    assert line == (
        "oo-serving: unsupported database URL 'mysql://u:***@h/x':"
        " use sqlite:///path/to/file.db or postgresql://user@host:port/dbname"
    )


def test_a_schema_error_names_the_database_without_its_password(
    fresh_postgres_url: str,
) -> None:
    """The schema's message says "the database"; the line adds which one."""
    url = with_password(fresh_postgres_url)
    line = refusal(oo_serving("check", "--database", url))
    latest = len(migrations.load("postgres"))
    assert line == (
        f"oo-serving: the database has schema version 0; this release needs {latest}:"
        f" run `oo-serving migrate` first (database {redact_url(url)})"
    )


READING = ["check", "prune", "sweep", "evaluate", "export", "backup"]


@pytest.mark.parametrize("command", READING)
@pytest.mark.parametrize("folder", ["missing", "there"])
def test_a_command_that_reads_refuses_a_sqlite_file_that_is_not_there(
    tmp_path: Path, command: str, folder: str
) -> None:
    """Opening it would create an empty database, and report on it as if it were the one."""
    where = tmp_path / ("no-folder" if folder == "missing" else "") / "oo.db"
    line = refusal(oo_serving(*with_extra(command, tmp_path), "--database", f"sqlite:///{where}"))
    assert line == f"oo-serving: no database at {where}"
    assert not where.exists()
    assert where.parent.exists() == (folder == "there")
    assert not (tmp_path / "copy.db").exists()


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_folder_for_the_database_that_cannot_be_made_is_named(
    tmp_path: Path, command: str
) -> None:
    """serve and migrate create the database and its folder; a file in the way says so."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    where = blocker / "data" / "oo.db"
    line = refusal(oo_serving(*OPENING[command], "--database", f"sqlite:///{where}"))
    assert line == f"oo-serving: cannot create the folder of {where}: Not a directory"


def test_a_metrics_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    db = tmp_path / "oo.db"
    done = run_with(
        "serve", "--workers", "2", "--port", "0", "--database", f"sqlite:///{db}",
        env={"OO_METRICS_DIR": str(blocker)},
    )  # fmt: skip
    line = refusal(done)
    assert line == f"oo-serving: OO_METRICS_DIR {blocker}: File exists"


def test_migrate_still_creates_the_database_and_its_folder(tmp_path: Path) -> None:
    where = tmp_path / "new-folder" / "oo.db"
    done = oo_serving("migrate", "--database", f"sqlite:///{where}")
    assert done.returncode == ExitCode.OK, done.stderr
    latest = len(migrations.load("sqlite"))
    assert done.stdout.strip() == (
        f"oo-serving: schema of sqlite:///{where} is current (version {latest})"
    )
    assert where.is_file()


def test_prune_of_a_database_that_is_there_deletes_and_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/oo.db"
    assert oo_serving("migrate", "--database", url).returncode == 0
    done = oo_serving("prune", "--older-than-days", "30", "--database", url)
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stdout.strip() == "oo-serving: deleted 0 decisions older than 30.0 days"


# ── start-up log ─────────────────────────────────────────────────────────────


def start_record(log: str) -> dict[str, Any]:
    """The server's start-up record, from its JSON log."""
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    found = [r for r in records if r["logger"] == "oo_serving" and "schema_version" in r]
    assert len(found) == 1, log
    return found[0]


def test_serve_says_at_start_what_it_serves(server_factory: Any, tmp_path: Path) -> None:
    env = {"OO_EXPLORATION": "epsilon:0.1", "OO_SHADOW_POLICIES": "linucb-v2"}
    server: Server = server_factory(workers=2, env=env)
    record = start_record(server.log())
    database = f"sqlite:///{tmp_path / 'oo.db'}"
    latest = len(migrations.load("sqlite"))
    assert record["level"] == "info"
    assert record["database"] == database
    assert record["schema_version"] == latest
    assert record["policy"] == "linucb-v1"
    assert record["policy_split"] == "none"
    assert record["exploration"] == "epsilon:0.1"
    assert record["shadow_policies"] == "linucb-v2"
    assert record["workers"] == 2
    assert record["listen"] == f"127.0.0.1:{server.port}"
    assert record["msg"] == (
        f"oo-serving {record['version']} starting on 127.0.0.1:{server.port} with 2 workers:"
        f" database {database} (schema version {latest}), policy linucb-v1,"
        " exploration epsilon:0.1, shadow policies linucb-v2"
    )


def test_serve_on_postgres_names_the_database_without_its_password(
    server_factory: Any, postgres_url: str
) -> None:
    url = with_password(postgres_url)
    split = "linucb-v1:50,linucb-v2:50"
    server: Server = server_factory(database_url=url, env={"OO_POLICY_SPLIT": split})
    log = server.log()
    assert SECRET not in log
    record = start_record(log)
    assert record["database"] == redact_url(url)
    assert ":***@" in record["database"]
    assert record["schema_version"] == len(migrations.load("postgres"))
    assert record["policy_split"] == split
    assert record["workers"] == 1
    assert f"with 1 worker: database {redact_url(url)} " in record["msg"]
    assert f"policy split {split}," in record["msg"]


# ── exit codes ───────────────────────────────────────────────────────────────


def test_serve_exits_3_when_its_address_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = oo_serving("serve", "--port", str(port), "--database", f"sqlite:///{tmp_path}/a.db")
    assert done.returncode == ExitCode.NOT_STARTED == 3, done.stderr
    assert "Address already in use" in done.stderr
    assert f"Cannot listen on 127.0.0.1:{port}" in done.stderr


def test_a_usage_error_exits_2() -> None:
    done = oo_serving("check", "--no-such-flag")
    assert done.returncode == ExitCode.REFUSED
    assert "No such option: --no-such-flag" in done.stderr


def test_a_setting_refused_exits_2_naming_it(tmp_path: Path) -> None:
    done = oo_serving("serve", "--workers", "0", "--database", f"sqlite:///{tmp_path}/a.db")
    assert done.returncode == ExitCode.REFUSED
    assert "workers" in done.stderr
    assert not (tmp_path / "a.db").exists()


def docs_sections() -> dict[str, str]:
    """docs/cli.md's section of each command."""
    parts = re.split(r"^## `oo-serving (\w+)`$", DOCS.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_docs_give_every_command_its_options_and_exit_codes() -> None:
    sections = docs_sections()
    assert set(sections) == set(COMMANDS)
    for name, command in commands().items():
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                assert f"`{opt}" in sections[name], f"docs/cli.md: {name} lacks {opt}"
        assert re.search(r"exit code", sections[name], re.I), name
    table = DOCS.read_text().split("## Exit codes", 1)[1]
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \|", table, re.M), code
