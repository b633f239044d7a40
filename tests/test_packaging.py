"""The package as a production machine installs it (docs/install.md).

The wheel is built with the documented command from a copy of the sources, then read:
it must require no development tool (they belong to the `dev` extra), every dependency
must be pinned by requirements.lock, and it must hold every file of the package, the
SQL migrations above all. Then it is installed, alone, into a fresh virtualenv whose
dependencies come from this environment, and the command it installs must migrate a
database and serve.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from oo_serving.store import migrations
from tests.conftest import free_port

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "src" / "oo_serving"
DEV_TOOLS = {
    "pytest", "pytest-timeout", "hypothesis", "schemathesis", "ruff", "mypy", "playwright",
}  # fmt: skip
EXTRAS = {"export": {"pyarrow"}, "report": {"matplotlib"}}
BUILD_TIMEOUT_S = 240
START_TIMEOUT_S = 30.0


def name_of(requirement: str) -> str:
    """The normalised project name of a requirement (`psycopg[binary]>=3.2; ...`)."""
    name = re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel --no-deps -w dist .` builds, from a copy of the sources (a
    build in place would write build/ and egg-info/ into the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "--quiet", "-w", str(dist), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list(dist.glob("oo_serving-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def requirements(wheel: Path) -> dict[str | None, set[str]]:
    """Requires-Dist by extra (None: what every install gets)."""
    found: dict[str | None, set[str]] = {}
    for line in metadata(wheel).get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        found.setdefault(extra.group(1) if extra else None, set()).add(name_of(requirement))
    return found


def test_the_wheel_requires_no_development_tool(wheel: Path) -> None:
    needs = requirements(wheel)
    runtime = needs[None]
    assert {"fastapi", "uvicorn", "numpy", "psycopg"} <= runtime  # read it right
    assert not runtime & DEV_TOOLS, f"required by every install: {runtime & DEV_TOOLS}"
    assert needs["dev"] >= DEV_TOOLS
    for extra, packages in EXTRAS.items():
        assert needs[extra] == packages, extra
        assert not needs[extra] & DEV_TOOLS
    assert set(metadata(wheel).get_all("Provides-Extra") or []) >= {"dev", *EXTRAS}


def test_requirements_lock_pins_every_dependency_of_a_production_install(wheel: Path) -> None:
    # `pip install -c requirements.lock` fixes only what the lock names: a dependency
    # added without re-locking would be installed at whatever version is newest.
    pinned = {
        name_of(line)
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    needs = requirements(wheel)
    production = needs[None] | set().union(*(needs[extra] for extra in EXTRAS))
    assert production <= pinned, f"not pinned by requirements.lock: {production - pinned}"


def package_files() -> set[str]:
    return {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_wheel_holds_every_file_of_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    in_package = {n for n in names if n.startswith("oo_serving/")}
    # Data files (SQL, templates, ...) are left out unless pyproject.toml lists them.
    assert in_package == package_files(), (
        f"missing from the wheel: {sorted(package_files() - in_package)};"
        f" not in the sources: {sorted(in_package - package_files())}"
    )
    for backend in ("sqlite", "postgres"):
        sql = {n for n in names if n.startswith(f"oo_serving/store/migrations/{backend}/")}
        assert len(sql) == len(migrations.load(backend)), backend
    assert re.search(r"^oo-serving\s*=\s*oo_serving\.cli:main$", scripts, re.M), scripts


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Path:
    """A fresh virtualenv holding the wheel alone; its dependencies are this
    environment's packages, reached through a path file (their own path files, this
    checkout's editable install among them, are not read that way)."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def clean_env() -> dict[str, str]:
    """The environment without anything that would lead to this checkout's sources."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("OO_")
    }


def test_the_installed_command_migrates_a_database_and_serves(
    installed: Path, tmp_path: Path
) -> None:
    bin_dir = installed / "bin"
    env = clean_env()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False
        )

    where = run(str(bin_dir / "python"), "-c", "import oo_serving; print(oo_serving.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout

    version = run(str(bin_dir / "oo-serving"), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.split() == ["oo-serving", metadata_version(installed)]

    db = tmp_path / "var" / "oo.db"
    migrated = run(str(bin_dir / "oo-serving"), "migrate", "--database", f"sqlite:///{db}")
    assert migrated.returncode == 0, migrated.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations.load("sqlite"))

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(bin_dir / "oo-serving"), "serve", "--port", str(port), "--database", f"sqlite:///{db}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base, server), (tmp_path / "serve.log").read_text()
        scored = httpx.post(
            f"{base}/score",
            json={"user_id": "u-1", "candidates": [{"id": "t", "content": "T", "source": "x"}]},
            timeout=10,
        )
        assert scored.status_code == 200, scored.text
        assert scored.json()["tip_id"] == "t"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait(timeout=30)
    assert code == 0, (tmp_path / "serve.log").read_text()


def metadata_version(venv: Path) -> str:
    infos = list(venv.glob("lib/python*/site-packages/oo_serving-*.dist-info"))
    assert len(infos) == 1, infos
    return infos[0].name.removeprefix("oo_serving-").removesuffix(".dist-info")


def wait_ready(base: str, server: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            if httpx.get(f"{base}/ready", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False
