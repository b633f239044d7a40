"""The operator's documents say one thing, and say it of the code as it is.

- Probes: route traffic by /ready, restart by /health. No document may point a load
  balancer (or a readiness check) at /health again.
- The upgrade guide has a row for every migration the package holds.
- The links of the operations documents lead to files and headings that exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from oo_serving.store import migrations

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
OWNED = ["install.md", "upgrade.md", "deploy.md", "operations.md"]

# Words that make a sentence about routing traffic, and words that make it about
# restarting a process; whichever comes last before `/health` says what it is for.
ROUTING = re.compile(
    r"load[- ]?balanc\w*|\blb\b|health[- ]?checks?|readiness\w*|rotation|target[- ]group"
    r"|upstream|\brout(?:e|es|ed|ing) (?:traffic|requests|clients)\b",
    re.I,
)
RESTARTING = re.compile(r"liveness\w*|restart\w*|supervis\w*|\balive\b", re.I)
HEALTH = re.compile(r"/health\b")


def sentences(text: str) -> Iterator[str]:
    """Sentences, list items and table rows, each on its own."""
    for block in re.split(r"\n\s*\n", text):
        for part in re.split(r"\n(?=\s*(?:[|*-]|\d+\.)\s)", block):
            yield from re.split(r"(?<=[.!?])\s+(?=[A-Z`*])", part)


def routing_to_health(text: str) -> list[str]:
    """The sentences that send traffic by `/health`: a routing word is the last of the
    routing and restarting words before it."""
    found = []
    for sentence in sentences(text):
        for match in HEALTH.finditer(sentence):
            before = sentence[: match.start()]
            routing = [m.end() for m in ROUTING.finditer(before)]
            restarting = [m.end() for m in RESTARTING.finditer(before)]
            if routing and max(routing) > max(restarting, default=-1):
                found.append(" ".join(sentence.split()))
                break
    return found


def documents() -> list[Path]:
    deploy = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(deploy)]


def test_no_document_routes_traffic_by_health() -> None:
    found = {
        str(path.relative_to(ROOT)): hits
        for path in documents()
        if (hits := routing_to_health(path.read_text()))
    }
    assert not found, (
        f"route traffic by /ready (readiness) and restart by /health (liveness): {found}"
    )


@pytest.mark.parametrize(
    "text",
    [
        "4. Point the load balancer's health check at `GET /health` (process liveness; it"
        " does not touch the database, so a database outage does not take every replica"
        " out of rotation).",
        "Route traffic by `/health`.",
        "Configure the LB to probe /health every 5 s.",
        "readinessProbe:\n  httpGet:\n    path: /health\n    port: 8000",
        "| readiness | `GET /health` | stop routing |",
    ],
)
def test_the_reader_finds_routing_by_health(text: str) -> None:
    assert routing_to_health(text)


@pytest.mark.parametrize(
    "text",
    [
        "Point an orchestrator's readiness probe here and its liveness probe at `/health`.",
        "Route traffic by `/ready`; restart by `/health`.",
        "- **Probes:** liveness `/health`, readiness `/ready`.",
        "readinessProbe:\n  httpGet:\n    path: /ready\nlivenessProbe:\n  httpGet:\n"
        "    path: /health",
        "With keys, every endpoint but `/health`, `/ready` and `/metrics` asks for one.",
        "| readiness | `GET /ready` | stop routing |\n| liveness | `GET /health` | restart |",
        "`/health` keeps answering 200 while the replica drains.",
    ],
)
def test_the_reader_lets_liveness_advice_be(text: str) -> None:
    assert routing_to_health(text) == []


def test_the_upgrade_guide_has_a_row_for_every_migration() -> None:
    guide = (DOCS / "upgrade.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", guide, re.M)
    documented = {int(version): name for version, name, *_ in rows}
    for backend in ("sqlite", "postgres"):
        shipped = {m.version: m.name for m in migrations.load(backend)}
        assert documented == shipped, f"docs/upgrade.md's table and the {backend} migrations"
    for version, _, release, change, additive in rows:
        assert release.strip(), version
        assert change.strip(), version
        assert additive.strip(), version


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("name", OWNED)
def test_links_lead_to_files_and_headings_that_exist(name: str) -> None:
    path = DOCS / name
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, name
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked here
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{name}: {link} leads nowhere"
        if anchor:
            assert file.suffix == ".md", f"{name}: {link}"
            assert anchor in anchors(file), f"{name}: {link}: no such heading"
