"""`oo-serving simulate`: the table, the JSON, the report files, and every refusal a
message naming what is wrong, exit code 2, never a traceback.

Real processes, tiny worlds (a few users and rounds): what is checked here is the
command, not the learning (tests/sim/ does that).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oo_serving.sim import report
from tests.support import oo_serving

TINY = ("--users", "6", "--rounds", "12", "--seeds", "1,2")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_simulate_prints_the_table_with_every_policy_and_its_settings() -> None:
    result = oo_serving(
        "simulate", *TINY, "--policy", "linucb-v1", "--policy", "linucb-v2", "--policy", "uniform"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("scenario realistic · 6 users × 12 rounds · seeds 1,2")
    assert "arrival cohorts:8" in lines[0]
    assert "ignored tips: no-reward" in lines[0]
    start = next(i for i, line in enumerate(lines) if line.startswith("policy"))
    header = lines[start]
    assert "total regret" in header
    assert "vs linucb-v1" in header
    assert "first 10 rounds" in header
    table = lines[start + 1 : lines.index("", start)]
    rows = {line.split()[0]: line for line in table}
    assert list(rows) == ["linucb-v1", "linucb-v2", "uniform"]
    assert "baseline" in rows["linucb-v1"]
    assert rows["linucb-v2"].count("±") == 4  # two totals, two paired changes
    assert rows["uniform"].count("%") == 4
    settings = lines[lines.index("settings:") + 1 :]
    assert any("linucb-v2" in s and "discount=0.99" in s for s in settings)
    assert any("linucb-v1" in s and "alpha=1" in s for s in settings)


def test_simulate_json_and_out_write_a_summary_a_png_and_a_page_that_fetches_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    args = ("simulate", *TINY, "--scenario", "drift", "--arrival", "round-robin")
    args += ("--policy", "linucb-v2:alpha=0.2", "--policy", "linucb-v1", "--set", "hour_sd=2")
    result = oo_serving(
        *args, "--ignored", "zero", "--refresh-every", "7", "--json", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {
        "scenario",
        "scenario_settings",
        "scenario_changes",
        "users",
        "rounds",
        "seeds",
        "arrival",
        "refresh_every",
        "ignored",
        "baseline",
        "cold_start_rounds",
        "command",
        "policies",
    } <= set(summary)
    assert (summary["scenario"], summary["users"], summary["rounds"]) == ("drift", 6, 12)
    assert summary["seeds"] == [1, 2]
    assert (summary["arrival"], summary["ignored"], summary["refresh_every"]) == (
        "round-robin",
        "zero",
        7,
    )
    assert summary["scenario_changes"] == {"hour_sd": 2.0}
    assert summary["baseline"] == "linucb-v2:alpha=0.2"  # the first policy
    assert list(summary["policies"]) == ["linucb-v2:alpha=0.2", "linucb-v1"]
    v1 = summary["policies"]["linucb-v1"]
    assert v1["settings"] == {"alpha": 1.0}
    assert {"total", "versus_baseline", "cold_start", "cumulative_regret"} <= set(v1)
    assert set(v1["total"]) == {"mean", "se"}
    assert set(v1["versus_baseline"]) == {"difference", "relative"}
    assert len(v1["cumulative_regret"]["mean"]) == 12
    assert v1["total"]["mean"] == pytest.approx(v1["cumulative_regret"]["mean"][-1])

    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "regret.png").read_bytes().startswith(PNG_MAGIC)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page
    assert "http://" not in page
    assert "https://" not in page
    assert "linucb-v2:alpha=0.2" in page
    assert "hour_sd" in page
    assert summary["command"] in page.replace("&#x27;", "'").replace("&quot;", '"')

    # The command line it reports reproduces the same figures.
    command = shlex.split(summary["command"])
    assert command[:2] == ["oo-serving", "simulate"]
    again = oo_serving(*command[1:], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["policies"] == summary["policies"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--policy", "linucb-v9"), "linucb-v9"),
        (("--policy", "linucb-v2:gamma=0.9"), "gamma"),
        (("--policy", "linucb-v2:alpha=lots"), "alpha"),
        (("--policy", "uniform", "--policy", "uniform"), "uniform"),
        (("--set", "hour_sdd=2"), "hour_sdd"),
        (("--set", "ignore_prob=1.5"), "ignore_prob"),
        (("--set", "users=3"), "--users"),
        (("--set", "tasks_min"), "tasks_min"),
        (("--arrival", "cohorts:0"), "cohorts:0"),
        (("--arrival", "eight-at-a-time"), "eight-at-a-time"),
        (("--scenario", "utopia"), "utopia"),
        (("--seeds", "1,x"), "'x'"),
        (("--baseline", "oracle"), "oracle"),
        (("--ignored", "skip"), "skip"),
    ],
)
def test_simulate_refuses_bad_input_naming_it(args: tuple[str, ...], named: str) -> None:
    """In-process (the command's own code, a process start saved per case); the real
    process's exit code is checked once below."""
    from oo_serving.cli import app

    result = CliRunner().invoke(app, ["simulate", *TINY, *args])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert named in result.stderr
    assert result.stderr.startswith("oo-serving: ")
    assert result.stdout == ""


def test_a_refusal_is_exit_code_2_and_one_line_in_a_real_process() -> None:
    result = oo_serving("simulate", *TINY, "--policy", "linucb-v2:gamma=0.9")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == (
        "oo-serving: --policy: policy 'linucb-v2:gamma=0.9': linucb-v2 has no setting gamma;"
        " its settings: alpha, prior_weight, interaction_prior_weight, discount,"
        " population_ridge\n"
    )
    assert result.stdout == ""


def test_out_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text(
        "raise ImportError('No module named matplotlib')\n"
    )
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "oo_serving", "simulate", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "pip install 'oo-serving[report]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # refused before running anything


def test_require_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(report.ReportUnavailable, match=r"oo-serving\[report\]"):
        report.require_matplotlib()


def test_other_commands_do_not_load_the_simulator_or_matplotlib() -> None:
    code = (
        "import sys, oo_serving.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('oo_serving.sim', 'matplotlib'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_cli_knows_every_preset() -> None:
    from oo_serving import cli
    from oo_serving.sim.runner import IGNORED
    from oo_serving.sim.scenarios import PRESETS

    assert set(cli.SIMULATE_SCENARIOS) == set(PRESETS)
    assert set(cli.SIMULATE_IGNORED) == set(IGNORED)
