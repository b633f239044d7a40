"""/dashboard in a real Chromium, over a real server that served real traffic, with no
internet: the numbers, the charts, the saved evaluation, a user's page, and API keys.

Screenshots of each page are saved in the test's tmp_path.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import BrowserPage
from tests.conftest import Server, free_port
from tests.dashboard_support import HOSTILE_TIP, SPLIT_ENV, Sent, drive, save_evaluation

pytestmark = pytest.mark.slow

POLICIES = ("linucb-v1", "linucb-v2")


def evaluate(server: Server) -> dict[str, Any]:
    """`oo-serving evaluate --json` on the server's database, as an operator runs it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "oo_serving",
            "evaluate",
            "--json",
            "--database",
            server.database_url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Sent, dict[str, Any]]]:
    """A server split between both policies, exploring, after 400 decisions of 20 users
    (a candidate of each with a hostile id), and its evaluation saved. Shared by the tests
    of this module, which only read it."""
    folder = tmp_path_factory.mktemp("served")
    server = Server(
        db_path=folder / "oo.db",
        port=free_port(),
        workers=1,
        log_path=folder / "server.log",
        env=SPLIT_ENV,
    )
    server.start()
    try:
        with server.client() as client:
            sent = drive(client, decisions=400, users=20, seed=42, hostile=True)
        result = evaluate(server)
        save_evaluation(server.database_url, result, command="oo-serving evaluate --json")
        yield server, sent, result
    finally:
        server.stop()


def _open(bp: BrowserPage, url: str, status: int = 200) -> None:
    response = bp.page.goto(url, wait_until="load")
    assert response is not None
    assert response.status == status


def test_the_overview_shows_each_policy_the_charts_and_the_evaluation(
    browser_page: BrowserPage, served: tuple[Server, Sent, dict[str, Any]], tmp_path: Path
) -> None:
    server, sent, result = served
    page = browser_page.page
    _open(browser_page, f"{server.base_url}/dashboard")

    assert page.title() == "Dashboard · oO ML Serving"
    for policy in POLICIES:
        card = page.locator(f'.card[data-policy="{policy}"]')
        assert (
            card.locator('[data-field="decisions"]').inner_text() == f"{sent.decisions[policy]:,}"
        )
        shown_rate = card.locator('[data-field="reward_rate"]').inner_text()
        assert shown_rate == f"{sent.reward_rate(policy):.3f}"
        row = page.locator(f'#policies tr[data-policy="{policy}"]')
        assert (
            row.locator('[data-field="rewarded"]').inner_text() == f"{len(sent.rewards[policy]):,}"
        )
    total = page.locator("#total-decisions").inner_text()
    assert total == f"{sum(sent.decisions.values()):,}"

    # Each chart is drawn, with a line (or points) per policy, visible on the page.
    for chart in ("reward-rate", "join-rate", "exploration"):
        figure = page.locator(f"#chart-{chart}")
        assert figure.locator("svg.chart").is_visible()
        for policy in POLICIES:
            series = figure.locator(f'g.series[data-series="{policy}"] circle')
            assert series.count() >= 1, (chart, policy)
    volume = page.locator("#chart-volume")
    for policy in POLICIES:
        for what in ("decisions", "rewarded"):
            assert volume.locator(f'g.series[data-series="{policy} {what}"]').count() == 1
    assert page.locator("#chart-reward-rate polygon.band").count() >= 2  # ±1.96 SE, per policy
    split = page.locator("#chart-split svg rect[fill]")
    assert split.count() >= 3 * len(POLICIES)

    evaluation = page.locator("#evaluation")
    text = evaluation.inner_text()
    verdicts = [v["text"] for v in result["verdicts"]] or [result["verdict"]]
    for verdict in verdicts:
        assert verdict.splitlines()[0] in text
    assert f"{result['events']:,} events of {result['users']:,} users" in text
    if result["enough"]:
        assert evaluation.locator('#estimates tr[data-policy="logging"]').count() == 1
        assert evaluation.locator("svg.chart").is_visible()

    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    browser_page.assert_self_contained()


def test_a_user_page_opened_from_the_form(
    browser_page: BrowserPage, served: tuple[Server, Sent, dict[str, Any]], tmp_path: Path
) -> None:
    server, sent, _ = served
    page = browser_page.page
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    user_id = max(sent.events, key=lambda u: len(sent.events[u]))
    _open(browser_page, f"{server.base_url}/dashboard")

    page.fill('form.lookup input[name="user_id"]', user_id)
    page.click("form.lookup button")
    page.wait_for_url(f"{server.base_url}/dashboard/users/{user_id}")

    stats = httpx.get(f"{server.base_url}/stats/{user_id}").json()
    features = page.locator("#weights tr[data-feature]")
    assert [f.get_attribute("data-feature") for f in features.all()] == stats["feature_names"]
    assert page.locator("#chart-weights svg.chart").is_visible()
    decisions = page.locator("#decisions details.decision")
    events = sent.events[user_id][::-1][:20]
    assert [d.get_attribute("data-event") for d in decisions.all()] == events
    first = decisions.first
    assert first.locator("tr.shown").count() == 1  # the shown candidate, marked
    assert first.locator("table.candidates tbody tr").count() == 4
    # The hostile tip id is text on the page, never markup: nothing ran.
    assert page.get_by_text(HOSTILE_TIP).count() >= 1
    assert page.locator("script").count() == 0
    assert dialogs == []

    page.screenshot(path=str(tmp_path / "dashboard-user.png"), full_page=True)
    browser_page.assert_self_contained()


def test_with_api_keys_the_browser_gives_the_key_as_a_password(
    chromium: Any, server_factory: Any
) -> None:
    """The answer without a key challenges for Basic credentials; the browser answers with
    the key as the password (what a person types at the prompt) and gets the page."""
    reader = "reader-key-0123456789"
    server: Server = server_factory(env={"OO_API_KEYS": f"{reader}:read", "OO_ACCESS_LOG": "true"})
    context = chromium.new_context(http_credentials={"username": "ops", "password": reader})
    problems: list[str] = []
    try:
        page = context.new_page()
        page.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        answer = page.goto(f"{server.base_url}/dashboard")
        assert answer is not None
        assert answer.status == 200
        assert page.locator("#policies").is_visible()
        border = page.locator("header.top").evaluate("e => getComputedStyle(e).borderBottomStyle")
        assert border == "solid"  # the stylesheet loaded too
    finally:
        context.close()
    assert problems == []
    # The server's request log: first the challenge, then the page for the key.
    answers = re.findall(r'"route":"/dashboard","status":(\d+)', server.log())
    assert answers == ["401", "200"]
