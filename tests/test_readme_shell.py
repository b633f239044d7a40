"""The README's shell examples, pasted in order into one bash, against a real server.

The README follows these conventions, and this module holds it to them:

- A ```sh block (also bash, shell, console) is run, unless the line right before its
  opening fence is an HTML comment `<!-- not run: why -->` (invisible on GitHub).
- The blocks run in README order in one bash process, so a variable one block sets
  (EVENT_ID) is there for the next. They run in a folder laid out as a clone is for
  `make serve`: `.venv` is the project's, `./var/oo-serving.db` is the server's database,
  and `localhost:8000` or `127.0.0.1:8000` reach the server, which runs with the default
  settings (no API keys, no OO_* variables).
- Every command of a block must succeed: exit 0, every command of a pipe included.
- A ```json or ```text block right after a run block (blank lines between allowed) is what
  that block prints, stdout and stderr together, as a terminal shows them:
  - json: the same JSON. Objects have the same keys, lists the same length, and values
    the same type and value (numbers to 1e-9 relative); only a string the README shows
    as an id (UUID) or a timestamp (2026-11-27T12:00:00Z, or to the millisecond) may be
    another one of the same form. The README may wrap lines wherever JSON allows spaces.
  - text: the same lines, where a number in the README stands for any number, `…`
    inside a line for any text, and a line holding only `…` for any number of lines.
- Every ```json block in the README is valid JSON.
- Every `oo-serving` command in a shell block, run or not, parses with the real command
  line: its command and options exist and its values are of the right type.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import typer.main

from oo_serving.cli import app as cli_app
from tests.conftest import Server, free_port

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
SHELL = {"sh", "bash", "shell", "console"}
OUTPUT = {"json", "text"}
NOT_RUN = re.compile(r"^<!--\s*not run\b.*-->$")
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`]*)$")
README_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
RUN_TIMEOUT_S = 180

# Strings in a README answer that the service makes anew each time: their form is kept.
VARYING_STRINGS = {
    "an id": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    "a timestamp": re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{3})?Z"),
}
# A number in a README text output; not one that ends a word, as in `linucb-v1`.
NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
NUMBER_PATTERN = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"
ELLIPSIS = "…"


# ── the README's blocks ──────────────────────────────────────────────────────


@dataclass(frozen=True)
class Block:
    """A fenced block: its language, its text (unindented) and where it is."""

    line: int  # of the opening fence, from 1
    lang: str
    text: str
    marked_not_run: bool
    adjacent: bool  # only blank lines since the previous block's closing fence

    @property
    def runs(self) -> bool:
        return self.lang in SHELL and not self.marked_not_run

    def __str__(self) -> str:
        return f"README line {self.line} (```{self.lang})"


def parse_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    last_close = -2
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = opening["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"README line {i + 1}: a fence that is never closed"
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        before = [line.strip() for line in lines[:i] if line.strip()]
        blocks.append(
            Block(
                line=i + 1,
                lang=opening["info"].strip().split(" ")[0],
                text="\n".join(body),
                marked_not_run=bool(before) and bool(NOT_RUN.match(before[-1])),
                adjacent=all(not line.strip() for line in lines[last_close + 1 : i]),
            )
        )
        last_close = end
        i = end + 1
    return blocks


@dataclass(frozen=True)
class Example:
    """A block that runs, and the output the README shows for it (if any)."""

    index: int
    block: Block
    shown: Block | None


def examples(blocks: list[Block]) -> list[Example]:
    found: list[Example] = []
    for position, block in enumerate(blocks):
        if not block.runs:
            continue
        following = blocks[position + 1] if position + 1 < len(blocks) else None
        shown = following if following and following.adjacent else None
        assert shown is None or shown.lang in OUTPUT, (
            f"{shown}: the output of the shell block at {block} must be fenced as"
            " ```json or ```text"
        )
        found.append(Example(index=len(found), block=block, shown=shown))
    return found


BLOCKS = parse_blocks(README.read_text())
EXAMPLES = examples(BLOCKS)


# ── running them ─────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Outcome:
    output: str
    failures: str  # one line per command that exited non-zero


def bash_script(runs: list[Example], port: int) -> str:
    """One script: each block in a group whose output goes to its own file; every
    failing command, in the group or a command substitution, noted beside it."""
    parts = ["set -E -o pipefail"]
    for example in runs:
        n = example.index
        parts.append(
            f'trap \'echo "exit $? from: $BASH_COMMAND" >> "$README_RUN_DIR/{n}.failed"\' ERR'
        )
        parts.append("{")
        parts.append(README_ADDRESS.sub(f"127.0.0.1:{port}", example.block.text))
        parts.append(f'}} > "$README_RUN_DIR/{n}.out" 2>&1')
    parts.append("exit 0")  # a failed command is noted; bash stops early only on a syntax error
    return "\n".join(parts) + "\n"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Outcome]:
    """Start a server as `make serve` would, run every block once, keep what each did."""
    clone = tmp_path_factory.mktemp("clone")
    (clone / ".venv").symlink_to(sys.prefix)  # the virtualenv running the tests
    (clone / "var").mkdir()
    results = tmp_path_factory.mktemp("results")
    server = Server(
        db_path=clone / "var" / "oo-serving.db",
        port=free_port(),
        workers=1,
        log_path=results / "server.log",
    )
    server.start()
    try:
        script = results / "readme.sh"
        script.write_text(bash_script(EXAMPLES, server.port))
        env = {key: value for key, value in os.environ.items() if not key.startswith("OO_")}
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", str(script)],
            cwd=clone,
            env=env | {"README_RUN_DIR": str(results)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, f"bash stopped in {script}:\n{done.stderr}"
    finally:
        server.stop()
    return {
        example.index: Outcome(
            output=read(results / f"{example.index}.out"),
            failures=read(results / f"{example.index}.failed"),
        )
        for example in EXAMPLES
    }


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ── comparing an output with the README's ────────────────────────────────────


def json_differences(shown: Any, real: Any, path: str = "$") -> list[str]:
    """Where the service's answer `real` differs from what the README shows."""
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return [f"{path}: the README shows an object, the service answers {real!r:.80}"]
        problems = [
            f"{path}.{key}: shown in the README, not in the answer"
            for key in shown
            if key not in real
        ]
        problems += [
            f"{path}.{key}: in the answer ({json.dumps(value)!s:.80}), not shown in the README"
            for key, value in real.items()
            if key not in shown
        ]
        for key in shown:
            if key in real:
                problems += json_differences(shown[key], real[key], f"{path}.{key}")
        return problems
    if isinstance(shown, list):
        if not isinstance(real, list):
            return [f"{path}: the README shows a list, the service answers {real!r:.80}"]
        problems = []
        if len(shown) != len(real):
            problems.append(
                f"{path}: the README shows {len(shown)} items, the answer has {len(real)}"
            )
        for i, (a, b) in enumerate(zip(shown, real, strict=False)):
            problems += json_differences(a, b, f"{path}[{i}]")
        return problems
    return (
        []
        if same_value(shown, real)
        else [f"{path}: the README shows {shown!r}, the service answers {real!r}"]
    )


def same_value(shown: Any, real: Any) -> bool:
    if type(shown) is not type(real):  # bool is not int, 1 is not 1.0
        return False
    if isinstance(shown, float):
        return math.isclose(shown, real, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(shown, str):
        for form in VARYING_STRINGS.values():
            if form.fullmatch(shown):
                return bool(form.fullmatch(real))
    return bool(shown == real)


def line_pattern(line: str) -> str:
    """A README output line as a regex: numbers stand for any number, `…` for any text."""
    pieces = []
    for part in line.split(ELLIPSIS):
        literal, at = [], 0
        for number in NUMBER.finditer(part):
            literal += [re.escape(part[at : number.start()]), NUMBER_PATTERN]
            at = number.end()
        pieces.append("".join([*literal, re.escape(part[at:])]))
    return ".*?".join(pieces)


def text_pattern(shown: str) -> re.Pattern[str]:
    parts = []
    for line in shown.strip("\n").splitlines():
        line = line.rstrip()
        parts.append(r"(?:[^\n]*\n)*?" if line.strip() == ELLIPSIS else line_pattern(line) + r"\n")
    return re.compile("".join(parts))


def tidy(output: str) -> str:
    """Output as compared: trailing spaces and blank lines at the end dropped."""
    return "".join(line.rstrip() + "\n" for line in output.strip("\n").splitlines())


def id_pairs(shown: Any, real: Any) -> Iterator[tuple[str, str]]:
    """(the README's id, the answer's) wherever the README shows an id."""
    if isinstance(shown, dict) and isinstance(real, dict):
        for key in shown:
            if key in real:
                yield from id_pairs(shown[key], real[key])
    elif isinstance(shown, list) and isinstance(real, list):
        for a, b in zip(shown, real, strict=False):
            yield from id_pairs(a, b)
    elif (
        isinstance(shown, str)
        and isinstance(real, str)
        and VARYING_STRINGS["an id"].fullmatch(shown)
    ):
        yield shown, real


def check_json(example: Example, output: str) -> None:
    assert example.shown is not None
    shown = json.loads(example.shown.text)
    try:
        real = json.loads(output)
    except json.JSONDecodeError:
        fail(f"{example.block}: the output is not one JSON value:\n{output}")
    problems = json_differences(shown, real)
    if problems:
        fail(
            f"{example.shown}, the output of the block at {example.block}, is not what the"
            " service answers:\n  " + "\n  ".join(problems) + f"\nthe answer:\n{output}"
        )


def check_text(example: Example, output: str) -> None:
    assert example.shown is not None
    if text_pattern(example.shown.text).fullmatch(tidy(output)):
        return
    diff = difflib.unified_diff(
        tidy(example.shown.text).splitlines(),
        tidy(output).splitlines(),
        "README",
        "output",
        lineterm="",
    )
    fail(
        f"{example.shown}, the output of the block at {example.block}, does not match"
        " what it prints (numbers and `…` aside):\n" + "\n".join(diff)
    )


def fail(message: str) -> NoReturn:
    """Fail with the message alone: it names the README line and what differs."""
    pytest.fail(message, pytrace=False)


# ── the README, run ──────────────────────────────────────────────────────────


def test_the_readme_has_a_walkthrough_that_runs() -> None:
    assert len(EXAMPLES) >= 10, "the README should have its shell examples run"
    silent = [str(e.block) for e in EXAMPLES if e.shown is None]
    assert not silent, f"blocks that run but do not show what they print: {silent}"
    assert any("EVENT_ID=" in e.block.text for e in EXAMPLES), "/score keeps its event_id"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"line-{e.block.line}")
def test_the_block_runs_and_prints_what_the_readme_shows(
    example: Example, outcomes: dict[int, Outcome]
) -> None:
    outcome = outcomes[example.index]
    if outcome.failures:
        fail(f"{example.block}: a command failed:\n{outcome.failures}output:\n{outcome.output}")
    if example.shown is None:
        return
    if example.shown.lang == "json":
        check_json(example, outcome.output)
    else:
        check_text(example, outcome.output)


def test_an_id_shown_in_several_answers_is_one_id_of_the_service(
    outcomes: dict[int, Outcome],
) -> None:
    """The README's `event_id` of /score is the one /reward, /features and the export
    answer; the `explain` example's is another."""
    real_of: dict[str, str] = {}
    shown_of: dict[str, str] = {}
    problems = []
    for example in EXAMPLES:
        if example.shown is None or example.shown.lang != "json":
            continue
        try:
            real = json.loads(outcomes[example.index].output)
        except json.JSONDecodeError:
            continue  # the block's own test says so
        for shown_id, real_id in id_pairs(json.loads(example.shown.text), real):
            if real_of.setdefault(shown_id, real_id) != real_id:
                problems.append(
                    f"{example.shown}: {shown_id} was {real_of[shown_id]}, here {real_id}"
                )
            if shown_of.setdefault(real_id, shown_id) != shown_id:
                problems.append(
                    f"{example.shown}: {real_id} is shown as {shown_of[real_id]} and {shown_id}"
                )
    if problems:
        fail("an id the README shows stands for different ids:\n  " + "\n  ".join(problems))


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.lang == "json"], ids=lambda b: f"line-{b.line}"
)
def test_every_json_block_is_json(block: Block) -> None:
    try:
        json.loads(block.text)
    except json.JSONDecodeError as exc:
        fail(f"{block} is not valid JSON: {exc}")


def oo_serving_commands(block: Block) -> Iterator[list[str]]:
    """The arguments of every `oo-serving` command in a shell block."""
    text = re.sub(r"\$\([^)]*\)", "X", block.text.replace("\\\n", " "))
    for line in text.splitlines():
        if "oo-serving" not in line:
            continue  # not one, and perhaps a line of a quoted body
        words = shlex.split(line.removeprefix("$ "), comments=True)
        for at, word in enumerate(words):
            if word == "oo-serving" or word.endswith("/oo-serving"):
                yield words[at + 1 :]
                break


CLI_COMMANDS = [
    (block, args) for block in BLOCKS if block.lang in SHELL for args in oo_serving_commands(block)
]


def test_the_readme_shows_the_command_line() -> None:
    assert {args[0] for _, args in CLI_COMMANDS if args} >= {"serve", "check", "evaluate"}


@pytest.mark.parametrize(
    ("block", "args"),
    CLI_COMMANDS,
    ids=lambda v: f"line-{v.line}" if isinstance(v, Block) else " ".join(v),
)
def test_every_oo_serving_command_parses(block: Block, args: list[str]) -> None:
    commands = typer.main.get_command(cli_app).commands  # type: ignore[attr-defined]
    if not args or args[0] not in commands:
        fail(f"{block}: `oo-serving {' '.join(args)}`: no such command")
    try:
        commands[args[0]].make_context(args[0], args[1:])
    except typer.TyperException as exc:
        fail(f"{block}: `oo-serving {' '.join(args)}` does not parse: {exc}")


# ── the comparisons themselves, on outputs made up here ──────────────────────


def test_blocks_are_run_unless_marked_and_an_adjacent_block_is_their_output() -> None:
    blocks = parse_blocks(
        "text\n\n```sh\necho 1\n```\n```json\n1\n```\n\n<!-- not run: why -->\n"
        "```sh\nmake serve\n```\n```text\nx\n```\n\n```sh\necho 2\n```\nprose\n```text\n2\n```\n"
    )
    assert [(b.lang, b.runs) for b in blocks] == [
        ("sh", True), ("json", False), ("sh", False), ("text", False), ("sh", True), ("text", False),
    ]  # fmt: skip
    found = examples(blocks)
    assert [(e.block.text, e.shown and e.shown.text) for e in found] == [
        ("echo 1", "1"),
        ("echo 2", None),
    ]


def test_json_differences_name_every_key_and_value_that_differs() -> None:
    shown = {
        "ok": True,
        "n": 1,
        "x": [0.5, 1.0],
        "event_id": "01a21ce4-d360-703f-a75d-04061ec41447",
        "ts": "2026-11-27T12:02:41Z",
        "policy": "linucb-v1",
        "gone": 1,
    }
    real = {
        "ok": True,
        "n": 1.0,
        "x": [0.5 + 1e-12, 1.0, 2.0],
        "event_id": "01a23bcb-cfc4-7817-b5fc-0a0d20bd678c",
        "ts": "2026-12-03T12:05:42Z",
        "policy": "linucb-v2",
        "new": None,
    }
    assert json_differences(shown, real) == [
        "$.gone: shown in the README, not in the answer",
        "$.new: in the answer (null), not shown in the README",
        "$.n: the README shows 1, the service answers 1.0",
        "$.x: the README shows 2 items, the answer has 3",
        "$.policy: the README shows 'linucb-v1', the service answers 'linucb-v2'",
    ]
    assert json_differences({"id": "01a21ce4-d360-703f-a75d-04061ec41447"}, {"id": "late"}) == [
        "$.id: the README shows '01a21ce4-d360-703f-a75d-04061ec41447', the service answers 'late'"
    ]


def test_text_matches_numbers_and_ellipses_but_not_words() -> None:
    shown = "checked 3 models in 0.5 s\n…\ndone: … ok"
    assert text_pattern(shown).fullmatch(tidy("checked 12 models in 1,024.25 s\ndone: all ok\n"))
    assert text_pattern(shown).fullmatch(tidy("checked 1 models in 2 s\na\nb\ndone: so ok"))
    assert not text_pattern(shown).fullmatch(tidy("checked 1 model in 2 s\ndone: so ok"))
    assert not text_pattern(shown).fullmatch(tidy("checked 1 models in 2 s\ndone: so ok\nmore"))
    assert not text_pattern("linucb-v1 2.0").fullmatch(tidy("linucb-v2 2.0"))
