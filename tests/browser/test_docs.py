"""/docs, /redoc and `GET /` in a real Chromium, over a real server, with no internet.

Each page must render from this server alone: no request beyond loopback, none failed,
no console error.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import BrowserPage
from tests.conftest import Server

# Swagger UI and ReDoc build the page in JavaScript after loading the schema: wait for it.
RENDER_TIMEOUT_MS = 30_000


def _open(bp: BrowserPage, url: str) -> None:
    response = bp.page.goto(url, wait_until="load")
    assert response is not None
    assert response.status == 200


def test_swagger_ui_lists_the_operations(browser_page: BrowserPage, server: Server) -> None:
    page = browser_page.page
    _open(browser_page, f"{server.base_url}/docs")
    score = page.locator(".opblock-post").filter(
        has=page.locator(".opblock-summary-path", has_text="/score")
    )
    score.first.wait_for(timeout=RENDER_TIMEOUT_MS)
    assert page.locator(".info .title").inner_text().startswith("oO ML Serving")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    for path in ("/score", "/reward", "/health", "/ready", "/stats/{user_id}"):
        assert any(p.replace("\u200b", "") == path for p in paths), paths
    page.wait_for_load_state("networkidle")
    browser_page.assert_self_contained()


def test_swagger_ui_tries_an_operation(browser_page: BrowserPage, server: Server) -> None:
    """Try it out → Execute on GET /health: the answer, 200 and its body, is shown."""
    page = browser_page.page
    _open(browser_page, f"{server.base_url}/docs#/operations/health_health_get")
    health = page.locator(".opblock-get").filter(
        has=page.locator(".opblock-summary-path", has_text="/health")
    )
    health.first.wait_for(timeout=RENDER_TIMEOUT_MS)
    block = health.first
    if not block.locator(".try-out__btn").is_visible():
        block.locator(".opblock-summary").click()  # expand it
    block.locator(".try-out__btn").click()
    block.locator(".execute").click()
    live = block.locator(".live-responses-table .response")
    live.wait_for(timeout=RENDER_TIMEOUT_MS)
    assert live.locator(".response-col_status").inner_text().strip() == "200"
    assert '"ok": true' in live.locator(".response-col_description").inner_text()
    browser_page.assert_self_contained()


def test_redoc_renders(browser_page: BrowserPage, server: Server) -> None:
    page = browser_page.page
    _open(browser_page, f"{server.base_url}/redoc")
    heading = page.locator("h1", has_text="oO ML Serving")
    heading.first.wait_for(timeout=RENDER_TIMEOUT_MS)
    # An operation of the schema, in ReDoc's menu.
    page.get_by_role("menuitem").filter(has_text="Score").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    page.wait_for_load_state("networkidle")
    browser_page.assert_self_contained()


def test_index_links_to_the_docs(browser_page: BrowserPage, server: Server) -> None:
    page = browser_page.page
    _open(browser_page, f"{server.base_url}/")
    assert page.title() == "oO ML Serving"
    links = {a.get_attribute("href"): a.inner_text() for a in page.locator("a").all()}
    for path in ("/docs", "/redoc", "/dashboard", "/health", "/ready", "/metrics"):
        assert path in links, links
    browser_page.assert_self_contained()
    page.locator('a[href="/docs"]').click()
    page.wait_for_url(f"{server.base_url}/docs")
    page.locator(".opblock-summary-path", has_text="/score").first.wait_for(
        timeout=RENDER_TIMEOUT_MS
    )
    page.wait_for_load_state("networkidle")
    browser_page.assert_self_contained()


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/"])
def test_pages_render_with_api_keys_set(
    browser_page: BrowserPage, server_factory: object, path: str
) -> None:
    """With keys, the reference stays readable without one, and Swagger UI offers
    "Authorize" for them."""
    assert callable(server_factory)
    guarded = server_factory(env={"OO_API_KEYS": "admin-key-0123456789abc:admin"})
    page = browser_page.page
    _open(browser_page, f"{guarded.base_url}{path}")
    if path == "/docs":
        page.locator(".btn.authorize").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    elif path == "/redoc":
        page.locator("h1", has_text="oO ML Serving").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    else:
        assert page.title() == "oO ML Serving"
    page.wait_for_load_state("networkidle")
    browser_page.assert_self_contained()
