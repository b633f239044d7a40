"""The examples in deploy/ are true to the code, so that they cannot rot.

systemd: every `oo-serving` command the units run exists with the flags given, every OO_*
variable named anywhere in deploy/ is a setting, the environment file's values are
valid, and the stop timeout outlasts the graceful shutdown. Prometheus: the alert rules
have the shape Prometheus loads, and every metric, label and route they name is one a
real server exports after some traffic.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main
import yaml
from prometheus_client.parser import text_string_to_metric_families

from oo_serving.cli import app as cli_app
from oo_serving.settings import Settings

ROOT = Path(__file__).parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
ENV_FILE = SYSTEMD / "oo-serving.env"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
KEEP_ALIVE_S = 5  # uvicorn's keep-alive timer: idle connections close within it
STOP_MARGIN_S = 5  # closing the store, and the process exiting


# ── systemd ──────────────────────────────────────────────────────────────────


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as section -> [(key, value)], keys in order (a key may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=value"
        current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in unit(path).get(section, []) if k == key]


def single(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key} given {len(found)} times"
    return found[0]


def services() -> list[Path]:
    found = sorted(SYSTEMD.glob("*.service"))
    assert found, "deploy/systemd holds no unit"
    return found


def oo_serving_commands(exec_start: str) -> list[list[str]]:
    """The `oo-serving` invocations of one ExecStart= line: [subcommand, args...]."""
    line = exec_start.lstrip("-@:+!").replace("%%", "%")  # systemd's prefixes and escape
    argv = shlex.split(line)
    if Path(argv[0]).name == "sh" and argv[1:2] == ["-c"]:
        argv = [a for a in shlex.split(argv[2]) if a != "exec"]
    if Path(argv[0]).name != "oo-serving":
        return []
    return [argv[1:]]


def commands() -> dict[str, Any]:
    """The command line's subcommands by name (typer's own click commands)."""
    return dict(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]


def check_arguments(command: Any, args: list[str]) -> None:
    """Every option in args is one of `command`'s; a value follows each that takes one."""
    options = {opt: param for param in command.params for opt in param.opts}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"`{command.name}` takes no argument {arg!r}"
        name, has_value, _ = arg.partition("=")
        assert name in options, f"`oo-serving {command.name}` has no option {name}"
        takes_value = not getattr(options[name], "is_flag", False)
        i += 1 if has_value or not takes_value else 2


def test_every_oo_serving_command_in_the_units_exists_with_its_flags() -> None:
    known = commands()
    run: set[str] = set()
    for path in services():
        for exec_start in values(path, "Service", "ExecStart"):
            for subcommand, *args in oo_serving_commands(exec_start):
                assert subcommand in known, f"{path.name}: no command {subcommand!r}"
                check_arguments(known[subcommand], args)
                run.add(subcommand)
    assert run == {"serve", "sweep", "backup"}


def test_the_parser_of_exec_lines_finds_what_it_must() -> None:
    # The checks above are only as good as this parser: it must see through sh -c.
    line = "/bin/sh -c 'exec /opt/x/bin/oo-serving backup --to \"/b/oo-$(date +%%F).db\"'"
    assert oo_serving_commands(line) == [["backup", "--to", "/b/oo-$(date +%F).db"]]
    assert oo_serving_commands("/usr/bin/find /b -mtime +14 -delete") == []
    with pytest.raises(AssertionError, match="no option --since"):
        check_arguments(commands()["sweep"], ["--since", "7d"])
    check_arguments(commands()["check"], ["--json", "--database", "sqlite:///x.db"])


def env_file() -> dict[str, str]:
    """The environment file's assignments, read as systemd's EnvironmentFile= reads them."""
    found: dict[str, str] = {}
    for raw in ENV_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value: {line!r}"
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not a variable name: {line!r}"
        assert key not in found, f"{key} is set twice"
        # Kept to what /bin/sh reads alike, as the cron example sources the file.
        assert not re.search(r"[\s'\"$`\\]", value), f"{key}: quote-free values only"
        found[key] = value
    return found


def setting_names() -> set[str]:
    return {f"OO_{name.upper()}" for name in Settings.model_fields}


def test_every_OO_variable_named_in_deploy_files_is_a_setting() -> None:  # noqa: N802
    named: dict[str, set[str]] = {}
    for path in sorted((ROOT / "deploy").rglob("*")):
        if path.is_file():
            for name in re.findall(r"\bOO_[A-Z0-9_]+\b", path.read_text()):
                named.setdefault(name, set()).add(path.name)
    assert "OO_DATABASE_URL" in named  # the search sees the files
    unknown = {name: files for name, files in named.items() if name not in setting_names()}
    assert not unknown, f"not settings: {unknown}"


def test_the_environment_file_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assigned = env_file()
    assert set(assigned) <= setting_names()
    for name in os.environ:
        if name.startswith("OO_"):
            monkeypatch.delenv(name)
    for name, value in assigned.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises on a value the server would refuse
    assert settings.database_url == "sqlite:////var/lib/oo-serving/oo-serving.db"
    # Not on loopback: the server would refuse to start without keys.
    assert settings.host != "127.0.0.1"
    assert settings.api_keys_file is not None


def seconds(timespan: str) -> float:
    """A systemd time span such as `45`, `45s`, `1min 30s`, `2m` in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan)
    assert parts, timespan
    return sum(float(n) * units[u] for n, u in parts)


def test_the_stop_timeout_outlasts_the_graceful_shutdown() -> None:
    service = SYSTEMD / "oo-serving.service"
    graceful = float(
        env_file().get(
            "OO_GRACEFUL_SHUTDOWN_S", Settings.model_fields["graceful_shutdown_s"].default
        )
    )
    timeout = seconds(single(service, "Service", "TimeoutStopSec"))
    assert timeout >= graceful + KEEP_ALIVE_S + STOP_MARGIN_S
    # SIGTERM to the main process, which drains and stops its workers.
    assert single(service, "Service", "KillMode") == "mixed"
    assert single(service, "Service", "KillSignal") == "SIGTERM"


def test_the_service_is_hardened_and_its_database_is_writable() -> None:
    service = SYSTEMD / "oo-serving.service"
    expected = {
        "User": "oo-serving",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert single(service, "Service", key) == value, key
    # ProtectSystem=strict leaves only the state directory writable: the SQLite file
    # must be in it.
    state = single(service, "Service", "StateDirectory")
    database = env_file()["OO_DATABASE_URL"].removeprefix("sqlite:///")
    assert Path(database).parent == Path("/var/lib") / state


def test_every_unit_reads_the_same_settings_and_release() -> None:
    for path in services():
        assert single(path, "Service", "EnvironmentFile") == "/etc/oo-serving/oo-serving.env"
        assert single(path, "Service", "User") == "oo-serving"
        assert single(path, "Service", "StateDirectory") == "oo-serving"
        # systemd applies the mode at each start: the units must not flip it.
        assert single(path, "Service", "StateDirectoryMode") == "0750"
        for exec_start in values(path, "Service", "ExecStart"):
            for program in re.findall(r"[^\s'\"]*/bin/oo-serving\b", exec_start):
                assert program == "/opt/oo-serving/current/bin/oo-serving", path.name
    for timer in sorted(SYSTEMD.glob("*.timer")):
        assert timer.with_suffix(".service").is_file(), f"{timer.name} starts no service"
        assert values(timer, "Timer", "OnCalendar"), timer.name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_reads_the_units_without_a_complaint(tmp_path: Path) -> None:
    """systemd's own parser: an unknown key or a bad value is a warning on stderr."""
    # It also wants the command to exist: this checkout's stands in for the release's.
    here = Path(sys.executable).parent / "oo-serving"
    assert here.is_file()
    for path in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.timer")]:
        text = path.read_text().replace("/opt/oo-serving/current/bin/oo-serving", str(here))
        (tmp_path / path.name).write_text(text)
    files = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


# ── Prometheus ───────────────────────────────────────────────────────────────

DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
SEVERITIES = {"page", "ticket"}
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}  # fmt: skip
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself, not the service
TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*")
      | (?P<range>\[[^\]]*\])
      | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?)
      | (?P<ident>[A-Za-z_:][\w:]*)
      | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
      | (?P<space>\s+)""",
    re.X,
)


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # label, op, value


@dataclass
class Parsed:
    selectors: list[Selector]
    grouping: set[str]


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        assert match, f"cannot read {expr[pos : pos + 20]!r} in {expr!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def parse(expr: str) -> Parsed:
    """The metric selectors and grouping labels of a PromQL expression (a reader of the
    subset these rules use, not a PromQL parser)."""
    toks = tokens(expr)
    assert expr.count("(") == expr.count(")"), expr
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind != "ident":
            i += 1
        elif text in GROUPING and nxt == "(":
            close = next(j for j in range(i, len(toks)) if toks[j][1] == ")")
            grouping |= {t for k, t in toks[i + 2 : close] if k == "ident"}
            i = close + 1
        elif text in KEYWORDS or text in AGGREGATIONS or nxt == "(":  # not a series
            i += 1
        else:
            selector = Selector(text)
            i += 1
            if nxt == "{":
                close = next(j for j in range(i, len(toks)) if toks[j][1] == "}")
                body = [t for t in toks[i + 1 : close] if t[1] != ","]
                assert len(body) % 3 == 0, f"matchers of {text} in {expr!r}"
                for label, op, value in zip(body[::3], body[1::3], body[2::3], strict=True):
                    assert (label[0], op[0], value[0]) == ("ident", "op", "string"), expr
                    selector.matchers.append((label[1], op[1], value[1][1:-1]))
                i = close + 1
            selectors.append(selector)
    return Parsed(selectors, grouping)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_reader_of_expressions_sees_metrics_labels_and_grouping() -> None:
    parsed = parse(
        'histogram_quantile(0.99, sum by (job, le) (rate(oo_x_bucket{route="/score",'
        ' status=~"5.."}[5m] offset 1d))) > 0.5 unless on (job) up == 0'
    )
    assert [s.metric for s in parsed.selectors] == ["oo_x_bucket", "up"]
    assert parsed.selectors[0].matchers == [("route", "=", "/score"), ("status", "=~", "5..")]
    assert parsed.grouping == {"job", "le"}


def test_the_alert_rules_have_the_shape_prometheus_loads() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    names: list[str] = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        assert isinstance(group["name"], str)
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert re.fullmatch(r"OoServing[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
            names.append(rule["alert"])
            assert isinstance(rule["expr"], str)
            assert rule["expr"].strip()
            parse(rule["expr"])
            if "for" in rule:
                assert DURATION.fullmatch(rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in SEVERITIES
            assert all(isinstance(v, str) for v in rule["labels"].values())
            annotations = rule["annotations"]
            assert set(annotations) >= {"summary", "description"}
            assert all(isinstance(v, str) and v.strip() for v in annotations.values())
    assert len(names) == len(set(names)), "an alert name is used twice"


@dataclass
class Exported:
    labels: dict[str, set[str]]  # series name -> its label names
    values: dict[tuple[str, str], set[str]]  # (series name, label) -> values seen


def exported(text: str) -> Exported:
    """Every series name the exposition declares (with its histogram and counter
    suffixes, samples or not), the label names and values of its samples."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    found = Exported({}, {})
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, [""]):
            found.labels.setdefault(family.name + suffix, set())
        for sample in family.samples:
            found.labels.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                found.values.setdefault((sample.name, label), set()).add(value)
    return found


def candidates() -> list[dict[str, Any]]:
    return [
        {"id": "a", "content": "A", "source": "todoist", "features": {"priority": 4}},
        {"id": "b", "content": "B", "source": "todoist", "features": {"is_overdue": True}},
    ]


def some_traffic(client: httpx.Client) -> None:
    """Decisions and rewards of every join, reads, and an unknown route."""
    for i in range(5):
        user = f"alert-user-{i}"
        out = client.post("/score", json={"user_id": user, "candidates": candidates()})
        assert out.status_code == 200, out.text
        event = out.json()["event_id"]
        for reward in (1.0, 0.5):  # the second is a repeat: learned="false"
            r = client.post("/reward", json={"user_id": user, "reward": reward, "event_id": event})
            assert r.status_code == 200, r.text
        tip = out.json()["tip_id"]  # no event_id: joined to the latest decision for the tip
        r = client.post(
            "/reward", json={"user_id": user, "tip_id": tip, "reward": 0.0, "features": {}}
        )
        assert r.status_code == 200, r.text
        # A tip never decided: learned on the request's features.
        r = client.post(
            "/reward", json={"user_id": user, "tip_id": "never", "reward": -1.0, "features": {}}
        )
        assert r.status_code == 200, r.text
        assert client.get(f"/stats/{user}").status_code == 200
    assert client.get("/nowhere").status_code == 404


LITERAL = re.compile(r"[\w/{}-]+")


def literal_values(op: str, value: str) -> list[str]:
    """The label values a matcher names: its value, or each alternative of a regex that
    is only an alternation of plain values (`score_tx|reward_tx`); [] for another regex."""
    if op in ("=", "!="):
        return [value]
    parts = value.split("|")
    return parts if all(LITERAL.fullmatch(p) for p in parts) else []


def test_every_metric_label_and_route_in_the_alert_rules_is_exported(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "alerts.db"
    server = server_factory(db_path=db, env={"OO_SQLITE_BUSY_TIMEOUT_MS": "200"})
    with server.client() as client:
        some_traffic(client)
        # The write lock held from outside: /ready fails, a store error is counted.
        fd = os.open(f"{db}.writelock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert client.get("/ready").status_code == 503
        finally:
            os.close(fd)
        assert client.get("/ready").status_code == 200
        text = client.get("/metrics").text
        routes = set(client.get("/openapi.json").json()["paths"])
    series = exported(text)

    def check_label_value(alert: str, metric: str, label: str, value: str) -> None:
        if label == "route":
            assert value in routes, f"{alert}: no route {value}"
        elif label == "status":
            assert re.fullmatch(r"[1-5]\d\d", value), f"{alert}: status {value}"
        else:
            seen = series.values.get((metric, label), set())
            assert value in seen, f"{alert}: {metric}{{{label}={value!r}}} never seen"

    used: set[str] = set()
    for rule in rules():
        parsed = parse(rule["expr"])
        labels_here = set(TARGET_LABELS)
        for selector in parsed.selectors:
            if selector.metric in PROMETHEUS_OWN:
                continue
            used.add(selector.metric)
            assert selector.metric in series.labels, (
                f"{rule['alert']}: {selector.metric} is not exported"
            )
            labels = series.labels[selector.metric]
            labels_here |= labels
            for label, op, value in selector.matchers:
                assert label in labels, f"{rule['alert']}: {selector.metric} has no {label}"
                for literal in literal_values(op, value):
                    check_label_value(rule["alert"], selector.metric, label, literal)
        assert parsed.grouping <= labels_here, (
            f"{rule['alert']}: groups by {parsed.grouping - labels_here}"
        )
    # The rules watch every family the service exports but the shadow agreement.
    families = {name.removesuffix("_bucket") for name in used}
    assert {
        "oo_http_requests_total",
        "oo_http_request_duration_seconds",
        "oo_decisions_total",
        "oo_explored_decisions_total",
        "oo_rewards_total",
        "oo_store_operation_duration_seconds",
        "oo_store_errors_total",
    } <= families
