"""The README's settings and limits tables are the truth about the code.

A setting added without a README row, a row for a setting that no longer exists, a
default that changed, a flag of `serve` not documented, or a constraint of the API
schema whose bound the Limits section does not state: each fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main
from pydantic import SecretStr

from oo_serving.api.app import create_app
from oo_serving.cli import app as cli_app
from oo_serving.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()
# A default the README describes in words, for settings that are empty by default.
WORDED_DEFAULTS = {"(none)", "(random per run)", "(temporary)"}


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def settings_rows() -> dict[str, tuple[str, str]]:
    """variable -> (flag, default) from the README's settings table."""
    rows = {}
    for line in section("Settings").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`OO_"):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2].strip("`"))
    return rows


def documented_default(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def test_every_setting_has_a_row_with_its_default() -> None:
    rows = settings_rows()
    for name, field in Settings.model_fields.items():
        variable = f"OO_{name.upper()}"
        assert variable in rows, f"{variable} is a setting the README's table does not list"
        default = documented_default(field.get_default(call_default_factory=True))
        written = rows[variable][1]
        if default == "":
            assert written in WORDED_DEFAULTS, f"{variable}: default is empty, README {written!r}"
        else:
            assert written == default, f"{variable}: default is {default!r}, README {written!r}"


def test_every_row_is_a_setting() -> None:
    known = {f"OO_{name.upper()}" for name in Settings.model_fields}
    assert set(settings_rows()) <= known


def test_every_flag_of_serve_is_documented() -> None:
    serve = typer.main.get_command(cli_app).commands["serve"]  # type: ignore[attr-defined]
    flags = {opt for p in serve.params for opt in p.opts if opt.startswith("--")}
    in_table = {flag for flag, _ in settings_rows().values() if flag}
    assert flags - {"--help"} <= in_table, flags - in_table


def _bounds(schema: dict[str, Any]) -> set[float]:
    """Every numeric bound stated anywhere in an OpenAPI document."""
    found: set[float] = set()
    keywords = {"maxLength", "minLength", "maximum", "minimum", "maxItems", "minItems"}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in keywords and isinstance(value, int | float):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return found


def test_every_bound_in_the_api_schema_is_in_the_limits_section(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/unused.db")
    schema = create_app(settings).openapi()
    limits = section("Limits").replace(",", "").replace("−", "-")
    for bound in _bounds(schema):
        text = str(int(bound)) if float(bound).is_integer() else str(bound)
        assert re.search(rf"(?<![\d.]){re.escape(text)}(?![\d])", limits), (
            f"the API schema has a bound of {text} that the README's Limits section does not state"
        )
    # The limits that are settings name their variable.
    for variable in ("OO_MAX_BODY_BYTES", "OO_MAX_CANDIDATES", "OO_DECISION_LOG_PER_USER"):
        assert variable in limits
