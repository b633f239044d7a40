"""/dashboard over a real server: the numbers shown are what the traffic made, what clients
sent is escaped, errors are friendly HTML pages, and API keys guard it (Bearer or Basic)."""

from __future__ import annotations

import base64
import html
import math
import re
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from tests.conftest import Server
from tests.dashboard_support import HOSTILE_TIP, SPLIT_ENV, Sent, drive, save_evaluation
from tests.support import metric

from oo_serving.api.dashboard import data, svg
from oo_serving.api.dashboard.evaluation import evaluation_view
from oo_serving.store.base import SavedReport

POLICIES = ("linucb-v1", "linucb-v2")
CHARTS = ("reward-rate", "join-rate", "volume", "exploration", "split")


def policy_rows(page: str) -> dict[str, dict[str, str]]:
    """The per-policy table: policy → field → the raw value (data-value) of its cell."""
    rows: dict[str, dict[str, str]] = {}
    table = page.split('<table id="policies">', 1)[1].split("</table>", 1)[0]
    for name, row in re.findall(r'<tr data-policy="([^"]*)">(.*?)</tr>', table, re.S):
        cells = re.findall(r'data-field="(\w+)" data-value="([^"]*)"', row)
        rows[html.unescape(name)] = dict(cells)
    return rows


def assert_html_page(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src" not in r.headers["content-security-policy"]  # none: scripts refused
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    page = r.text
    assert "<script" not in page.lower()
    # Nothing from another host: every URL in the page is a path of this server.
    assert not re.search(r'(?:href|src|action)="(?:[a-z]+:)?//', page), "an external URL"
    return page


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/oo.db"
    return str(request.getfixturevalue("fresh_postgres_url"))


def test_the_overview_shows_what_the_traffic_made(server_factory: Any, database_url: str) -> None:
    server: Server = server_factory(database_url=database_url, env=SPLIT_ENV)
    with server.client() as client:
        sent = drive(client, decisions=160, users=12, seed=3)
        metrics = client.get("/metrics").text
        pages = {w: client.get("/dashboard", params={"window": w}) for w in ("1h", "24h", "7d")}
        default = client.get("/dashboard")

    assert set(sent.decisions) == set(POLICIES)  # the split served both
    for window, r in {**pages, "default": default}.items():
        page = assert_html_page(r, 200)
        rows = policy_rows(page)
        assert set(rows) == set(POLICIES), window
        for policy in POLICIES:
            row = rows[policy]
            decisions = sent.decisions[policy]
            rewards = sent.rewards[policy]
            explored = metric(metrics, "oo_explored_decisions_total", policy=policy)
            assert int(row["decisions"]) == decisions, (window, policy)
            assert int(row["rewarded"]) == len(rewards)
            assert int(row["defaulted"]) == 0
            assert float(row["reward_rate"]) == pytest.approx(sent.reward_rate(policy), abs=1e-12)
            assert float(row["join_rate"]) == pytest.approx(len(rewards) / decisions, abs=1e-12)
            assert float(row["exploration_share"]) == pytest.approx(explored / decisions)
            assert int(row["users"]) == len(sent.users[policy])
        total = re.search(r'<b id="total-decisions">([\d,]+)</b>', page)
        assert total is not None
        assert int(total.group(1).replace(",", "")) == sum(sent.decisions.values())
        for chart in CHARTS:
            figure = page.split(f'<figure id="chart-{chart}">', 1)[1].split("</figure>", 1)[0]
            assert "<svg" in figure, chart
            for policy in POLICIES:
                assert html.escape(policy) in figure, (chart, policy)
        assert "No evaluation saved yet" in page
    assert sum(metric(metrics, "oo_explored_decisions_total", policy=p) for p in POLICIES) > 0


def test_the_user_page_shows_the_model_and_escapes_what_clients_sent(
    server_factory: Any,
) -> None:
    server: Server = server_factory(env=SPLIT_ENV)
    with server.client() as client:
        sent = drive(client, decisions=30, users=1, seed=6, hostile=True, user_prefix="ann@b.c")
        user_id = "ann@b.c-00"
        stats = client.get(f"/stats/{user_id}").json()
        r = client.get(f"/dashboard/users/{quote(user_id, safe='')}", params={"limit": "50"})

    page = assert_html_page(r, 200)
    assert html.escape(HOSTILE_TIP) in page  # the tip id, shown as text
    assert HOSTILE_TIP not in page
    weights = dict(
        re.findall(r'<tr data-feature="([^"]*)"><td[^>]*>[^<]*</td><td data-value="([^"]*)"', page)
    )
    assert list(weights) == stats["feature_names"]
    for name, theta in zip(stats["feature_names"], stats["theta"], strict=True):
        assert float(weights[name]) == pytest.approx(theta, rel=1e-12, abs=1e-15)
    assert f'data-field="pulls">{stats["pulls"]}<' in page
    assert f'data-field="serving_policy">{stats["policy"]}<' in page
    shown = re.findall(r'<details class="decision" data-event="([^"]*)"', page)
    assert shown == sent.events[user_id][::-1]  # every decision, newest first
    assert page.count("<b>shown</b>") == len(shown)


def test_the_user_page_lists_only_the_last_decisions_asked_for(server_factory: Any) -> None:
    server: Server = server_factory()
    with server.client() as client:
        sent = drive(client, decisions=25, users=1, seed=8)
        user_id = "user-00"
        default = assert_html_page(client.get(f"/dashboard/users/{user_id}"), 200)
        five = assert_html_page(client.get(f"/dashboard/users/{user_id}?limit=5"), 200)

    events = sent.events[user_id][::-1]
    assert re.findall(r'data-event="([^"]*)"', default) == events[:20]
    assert re.findall(r'data-event="([^"]*)"', five) == events[:5]
    assert f"/dashboard/users/{user_id}?limit=25" in five  # the way to older ones


def test_unknown_and_impossible_users_get_a_friendly_404_page(server: Server) -> None:
    with server.client() as client:
        unknown = client.get("/dashboard/users/nobody-ever-scored")
        impossible = client.get("/dashboard/users/" + quote("a b<c>", safe=""))
        dots = client.get("/dashboard/users/%2E%2E")

    page = assert_html_page(unknown, 404)
    assert "No such user" in page
    assert "nobody-ever-scored" in page
    assert 'action="/dashboard/users"' in page  # the form to try another
    page = assert_html_page(impossible, 404)
    assert "a b<c>" not in page
    assert dots.status_code == 404


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/dashboard?window=2d", "window must be one of 1h, 6h, 24h, 7d, 30d"),
        ("/dashboard/users/u?limit=0", "limit must be a whole number from 1 to 200"),
        ("/dashboard/users/u?limit=x", "limit must be a whole number"),
        ("/dashboard/users?user_id=" + quote("<b>"), "A user id is 1 to 256"),
        ("/dashboard/users?user_id=", "A user id is 1 to 256"),
    ],
)
def test_a_bad_query_gets_a_400_page_that_says_why(server: Server, path: str, says: str) -> None:
    with server.client() as client:
        page = assert_html_page(client.get(path), 400)
    assert says in page


def test_the_form_redirects_to_the_user_page(server: Server, user_id: str) -> None:
    wanted = f"{user_id}+a@b:c=d"
    with server.client() as client:
        r = client.get("/dashboard/users", params={"user_id": f"  {wanted} "})
    assert r.status_code == 303
    assert r.headers["location"] == f"/dashboard/users/{quote(wanted, safe='')}"


def test_the_stylesheet_is_served_by_the_service(server: Server) -> None:
    with server.client() as client:
        page = client.get("/dashboard").text
        href = re.search(r'<link rel="stylesheet" href="([^"]+)"', page)
        assert href is not None
        css = client.get(href.group(1))
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert ".card" in css.text
    assert "url(" not in css.text  # no font or picture fetched from anywhere


def interval(policy: str, estimator: str, value: float, half: float) -> dict[str, Any]:
    return {
        "policy": policy, "estimator": estimator, "value": value,
        "ci_low": value - half, "ci_high": value + half,
        "cs_low": value - 2 * half, "cs_high": None, "ess": 123.4,
    }  # fmt: skip


def test_the_latest_saved_evaluation_is_shown_escaped(server_factory: Any) -> None:
    server: Server = server_factory()
    hostile = "linucb-v2 <img src=x onerror=alert(1)> is better"
    result = {
        "events": 1234, "users": 56, "verdict": hostile, "enough": True, "alpha": 0.05,
        "first_ts": "2026-01-02T03:04:05.000Z", "last_ts": "2026-01-09T03:04:05.000Z",
        "estimates": [interval("logging", "dr", 0.41, 0.02), interval("greedy", "dr", 0.47, 0.03),
                      interval("greedy", "ips", 0.9, 0.5)],
        "differences": [{**interval("greedy", "dr", 0.06, 0.01), "ess": None}],
        "verdicts": [{"policy": "greedy", "text": hostile, "decided": True, "better": True,
                      "events_needed": None}],
        "agreement": {"greedy": 0.8}, "skipped": {"pending": 7},
    }  # fmt: skip
    save_evaluation(
        server.database_url, {**result, "verdict": "older"}, created_ms=1_000, command="old"
    )
    save_evaluation(
        server.database_url,
        result,
        created_ms=1_767_225_600_000,  # 2026-01-01 00:00:00 UTC
        command="oo-serving evaluate --since 7d",
    )
    with server.client() as client:
        page = assert_html_page(client.get("/dashboard"), 200)

    section = page.split('<div id="evaluation">', 1)[1].split("<h2>", 1)[0]
    assert "2026-01-01 00:00:00 UTC" in section
    assert "oo-serving evaluate --since 7d" in section
    assert "1,234 events of 56 users" in section
    assert html.escape(hostile) in section
    assert "<img" not in page
    assert "older" not in section
    assert "<svg" in section  # the estimates drawn with their intervals
    assert '<tr data-policy="greedy"><td>greedy</td><td>0.4700</td>' in section
    assert "[0.4400, 0.5000]" in section  # the CI
    assert "[0.4100, +∞]" in section  # the CS, unbounded above
    assert "+0.0600" in section  # the difference to logging
    assert "pending 7" in section


# ── API keys ─────────────────────────────────────────────────────────────────

KEYS = {
    "reader": "reader-key-0123456789",
    "decider": "decider-key-0123456789",
    "admin": "admin-key-0123456789",
}


def basic(password: str, user: str = "operator") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_with_api_keys_the_dashboard_needs_the_read_scope(server_factory: Any) -> None:
    keys = f"{KEYS['reader']}:read,{KEYS['decider']}:decide,{KEYS['admin']}:admin"
    server: Server = server_factory(env={"OO_API_KEYS": keys})
    bearer = {"Authorization": f"Bearer {KEYS['decider']}"}
    with server.client() as client:
        sent = drive_with_key(client, bearer)
        user_page = f"/dashboard/users/{next(iter(sent.events))}"
        answers = {
            "none": client.get("/dashboard"),
            "wrong": client.get("/dashboard", headers=basic("not-a-key-at-all")),
            "garbled": client.get("/dashboard", headers={"Authorization": "Basic !!!"}),
            "no password": client.get("/dashboard", headers=basic("")),
            "decide": client.get("/dashboard", headers=basic(KEYS["decider"])),
            "read": client.get("/dashboard", headers=basic(KEYS["reader"])),
            "admin bearer": client.get(
                "/dashboard", headers={"Authorization": f"Bearer {KEYS['admin']}"}
            ),
            "user none": client.get(user_page),
            "user read": client.get(user_page, headers=basic(KEYS["reader"], user="")),
            "form none": client.get("/dashboard/users?user_id=u"),
        }
        css = client.get("/dashboard/static/dashboard.css")

    for name in ("none", "wrong", "garbled", "no password", "user none", "form none"):
        page = assert_html_page(answers[name], 401)
        assert answers[name].headers["www-authenticate"].startswith('Basic realm="oo-serving"')
        assert "API key" in page, name
    page = assert_html_page(answers["decide"], 403)
    assert html.escape("does not have the 'read' scope") in page
    assert "www-authenticate" not in answers["decide"].headers
    for name in ("read", "admin bearer"):
        page = assert_html_page(answers[name], 200)
        assert int(policy_rows(page)["linucb-v1"]["decisions"]) == sent.decisions["linucb-v1"]
    assert_html_page(answers["user read"], 200)
    assert css.status_code == 200  # the stylesheet holds no data: public


def drive_with_key(client: httpx.Client, headers: dict[str, str]) -> Sent:
    client.headers.update(headers)
    try:
        return drive(client, decisions=10, users=3, seed=11)
    finally:
        for name in headers:
            del client.headers[name]


def test_dashboard_requests_are_counted_by_route_template(server: Server, user_id: str) -> None:
    with server.client() as client:
        client.post(
            "/score",
            json={"user_id": user_id, "candidates": [{"id": "a", "content": "", "source": "s"}]},
        )
        assert client.get(f"/dashboard/users/{user_id}").status_code == 200
        assert client.get("/dashboard").status_code == 200
        text = client.get("/metrics").text

    by_template = metric(
        text, "oo_http_requests_total", route="/dashboard/users/{user_id}", status="200"
    )
    assert by_template >= 1
    assert metric(text, "oo_http_requests_total", route="/dashboard", status="200") >= 1
    assert user_id not in text


# ── the parts, with plain numbers ────────────────────────────────────────────


def test_a_window_ends_at_the_bucket_boundary_after_now() -> None:
    week = data.WINDOWS["7d"]
    now = 1_767_225_600_000 + 5 * data.HOUR_MS + 17  # 2026-01-01 05:00:00.017 UTC
    since, until = week.range(now)
    assert until == 1_767_225_600_000 + 6 * data.HOUR_MS
    assert until - since == 7 * data.DAY_MS
    assert week.buckets == 28
    on_the_edge = week.range(until)
    assert on_the_edge[1] == until + 6 * data.HOUR_MS  # `until` itself is in the next one


def test_a_tally_gives_the_rates_as_the_docs_define_them() -> None:
    rewards = [1.0, 0.0, 1.0, 1.0, 0.5]
    t = data.Tally(
        decisions=8, rewarded=5, defaulted=1, reward_sum=sum(rewards),
        reward_sq_sum=sum(r * r for r in rewards), explored=2, reward_min=0.0, reward_max=1.0,
    )  # fmt: skip
    assert t.reward_rate == pytest.approx(statistics.mean(rewards))
    assert t.reward_se == pytest.approx(statistics.stdev(rewards) / math.sqrt(5))
    assert t.join_rate == 4 / 8  # the default reward is not the client's
    assert t.exploration_share == 2 / 8
    band = t.reward_band
    assert band is not None
    assert band[0] == pytest.approx(t.reward_rate - 1.96 * t.reward_se)  # type: ignore[operator]
    assert band[1] == 1.0  # ±1.96 SE would pass 1, the largest reward: a mean cannot
    assert data.Tally(decisions=3).reward_rate is None
    assert data.Tally(decisions=3, rewarded=1, reward_sum=1.0, reward_sq_sum=1.0).reward_se is None
    assert data.Tally().join_rate is None
    total = t + data.Tally(1, 1, 0, -1.0, 1.0, 0, -1.0, -1.0)
    assert (total.decisions, total.rewarded, total.reward_min, total.reward_max) == (
        9,
        6,
        -1.0,
        1.0,
    )


@pytest.mark.parametrize(
    ("before", "after", "direction"),
    [
        ([0.0, 1.0] * 10, [1.0] * 20, "up"),
        ([1.0] * 20, [0.0, 1.0] * 10, "down"),
        ([0.0, 1.0] * 10, [1.0, 0.0] * 10, "steady"),
        ([0.0] * 9, [1.0] * 20, "unknown"),  # under 10 rewards in a half
    ],
)
def test_the_trend_compares_the_halves_of_the_window(
    before: list[float], after: list[float], direction: str
) -> None:
    def tally(values: list[float]) -> data.Tally:
        return data.Tally(len(values), len(values), 0, sum(values), sum(v * v for v in values), 0)

    assert data.Trend(tally(before), tally(after)).direction == direction


def test_nice_ticks_and_time_ticks_are_round() -> None:
    assert svg.nice_ticks(0.12, 0.87) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert svg.nice_ticks(3.0, 3.0) == pytest.approx([3.0, 3.25, 3.5, 3.75, 4.0])  # span 0: 1
    week = data.WINDOWS["7d"]
    since, _ = week.range(1_767_225_600_000)
    step, ticks = svg.x_ticks(svg.TimeAxis(since, week.bucket_ms, week.buckets))
    assert step == data.DAY_MS
    assert all(t % data.DAY_MS == 0 for t in ticks)  # midnights, UTC
    assert len(ticks) == 7


def test_charts_escape_names_and_say_when_there_is_nothing() -> None:
    axis = svg.TimeAxis(0, 1_000, 4)
    hostile = '<script>alert("x")</script>'
    chart = svg.line_chart(
        [svg.Series(hostile, 0, [0.5, None, 0.7, 0.6], band=[(0.4, 0.6), None, None, None])],
        axis,
        label=hostile,
        y_format=str,
    )
    assert "<script" not in chart
    assert html.escape(hostile) in chart
    assert chart.count("<circle") == 3  # None is a gap, not a point
    assert chart.count("<polyline") == 1  # the two neighbours after the gap
    empty = svg.line_chart([svg.Series("p", 0, [None] * 4)], axis, label="x", y_format=str)
    assert "no decisions in this window" in empty


def test_a_saved_report_of_another_shape_says_so() -> None:
    view, error = evaluation_view(SavedReport(3, "evaluate", 1, {"something": "else"}))
    assert view is None
    assert error is not None
    assert "#3" in error
    assert evaluation_view(None) == (None, None)
