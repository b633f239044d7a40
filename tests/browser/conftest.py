"""Pages loaded in a real headless Chromium, driven by Playwright.

The browser is the system's Chromium (`/usr/bin/chromium`, Debian's `chromium`
package, or `OO_CHROMIUM`); Playwright never downloads one. Without it the browser
tests skip, except on CI (`CI=true`), where `.ci/run` installs it and a missing
browser fails.

Every page is opened with the network closed beyond loopback: a request to any other
host is aborted and recorded, so a test can assert that a page needs nothing from the
internet. Console errors and failed requests are recorded too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    wanted = os.environ.get("OO_CHROMIUM") or "/usr/bin/chromium"
    return wanted if Path(wanted).exists() else shutil.which("chromium")


@dataclass
class BrowserPage:
    """A Playwright page and what it tried that a self-contained page must not."""

    page: Page
    external: list[str] = field(default_factory=list)  # requests beyond loopback
    console_errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def assert_self_contained(self) -> None:
        assert self.external == [], f"requests beyond loopback: {self.external}"
        assert self.failed == [], f"failed requests: {self.failed}"
        assert self.console_errors == [], f"console errors: {self.console_errors}"


# Per module, not per session: while Playwright's sync API runs, its event loop is the
# running loop of the main thread, and every other test's asyncio.run() would refuse to
# start. Each browser module starts its own Chromium and stops it before the next module.
@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no Chromium at /usr/bin/chromium: .ci/run installs Debian's chromium")
        pytest.skip("no system Chromium (install Debian's chromium package, or set OO_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# It takes server_factory so as to be set up after it, and so torn down before the
# test's servers stop: a server's graceful stop waits for the page's keep-alive
# connections to close, seconds a test otherwise.
@pytest.fixture
def browser_page(chromium: object, server_factory: object) -> Iterator[BrowserPage]:
    """A fresh page (own context: no cookies or cache shared between tests)."""
    from playwright.sync_api import Browser, ConsoleMessage, Request, Route

    assert isinstance(chromium, Browser)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    bp = BrowserPage(page)

    def guard(route: Route, request: Request) -> None:
        host = urlsplit(request.url).hostname or ""
        if request.url.startswith(("data:", "blob:", "about:")) or host in LOOPBACK:
            route.continue_()
        else:
            bp.external.append(request.url)
            route.abort()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            bp.console_errors.append(message.text)

    def on_failed(request: Request) -> None:
        if (urlsplit(request.url).hostname or "") in LOOPBACK:
            bp.failed.append(f"{request.url}: {request.failure}")

    context.route("**/*", guard)
    page.on("console", on_console)
    page.on("requestfailed", on_failed)
    try:
        yield bp
    finally:
        context.close()
