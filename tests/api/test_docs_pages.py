"""/docs, /redoc, their files and `GET /`, over HTTP against real servers.

The pages must load with no internet: every URL they name is on this server, and every
file they name is served with its type. The browser's view of the same pages is in
tests/browser/test_docs.py.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from tests.support import error_locs, metric

from oo_serving import __version__
from oo_serving.api.index import prefers_json

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
KEYS = "admin-key-0123456789abc:admin"
METRICS_KEY = "metrics-key-0123456789"
PAGES_NOT_IN_SCHEMA = {"/", "/docs", "/redoc", "/docs/oauth2-redirect", "/static/docs/{name}"}
EXPECTED_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# In the attributes and the inline script of a page: every URL it makes the browser fetch.
_URL_IN_PAGE = re.compile(r"""(?:src|href)="([^"]*)"|url:\s*'([^']*)'|spec-url="([^"]*)\"""")


def page_urls(html: str) -> list[str]:
    return [
        next(g for g in match.groups() if g is not None) for match in _URL_IN_PAGE.finditer(html)
    ]


def assert_local_only(html: str) -> list[str]:
    """Every URL the page names is a path on this server; they are returned."""
    assert "http://" not in html, html
    assert "https://" not in html, html
    urls = page_urls(html)
    assert urls, html
    for url in urls:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
    return urls


def get_page(client: httpx.Client, path: str) -> str:
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    return r.text


# ── /docs and /redoc ──────────────────────────────────────────────────────────
def test_swagger_ui_page_names_only_local_files(client: httpx.Client) -> None:
    html = get_page(client, "/docs")
    urls = assert_local_only(html)
    files = {urlsplit(u).path for u in urls}
    assert {
        "/openapi.json",
        "/static/docs/swagger-ui-bundle.js",
        "/static/docs/swagger-ui.css",
        "/static/docs/favicon.png",
    } <= files
    assert "oO ML Serving - Swagger UI" in html


def test_redoc_page_names_only_local_files(client: httpx.Client) -> None:
    html = get_page(client, "/redoc")
    urls = assert_local_only(html)
    files = {urlsplit(u).path for u in urls}
    assert {"/openapi.json", "/static/docs/redoc.standalone.js"} <= files
    assert "fonts.googleapis" not in html


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_file_a_page_names_is_served_with_its_type(client: httpx.Client, page: str) -> None:
    for url in page_urls(get_page(client, page)):
        path = urlsplit(url).path
        if not path.startswith("/static/docs/"):
            continue
        r = client.get(url)
        assert r.status_code == 200, url
        name = path.rsplit("/", 1)[1]
        assert r.headers["content-type"].split(";")[0] == EXPECTED_TYPES[name], url
        # The URL carries the package version, so the file may be kept for long.
        assert "max-age=31536000" in r.headers["cache-control"]
        assert "v=" in urlsplit(url).query
        assert int(r.headers["content-length"]) == len(r.content) > 0


def test_the_scripts_are_swagger_ui_5_and_redoc(client: httpx.Client) -> None:
    swagger = client.get("/static/docs/swagger-ui-bundle.js")
    assert swagger.status_code == 200
    assert "SwaggerUIBundle" in swagger.text
    # Swagger UI 5 is the first major version that reads OpenAPI 3.1, as FastAPI writes.
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert re.search(r'PACKAGE_VERSION:"5\.\d+\.\d+"', swagger.text)
    redoc = client.get("/static/docs/redoc.standalone.js")
    assert redoc.status_code == 200
    assert "Redoc" in redoc.text


def test_redoc_asks_nothing_of_another_host(client: httpx.Client) -> None:
    """ReDoc's credit shows Redocly's logo from their CDN; the file served does not."""
    redoc = client.get("/static/docs/redoc.standalone.js")
    assert "cdn.redoc.ly" not in redoc.text
    assert "API docs by Redocly" in redoc.text


def test_a_file_asked_for_without_its_digest_is_kept_briefly(client: httpx.Client) -> None:
    versioned = page_urls(get_page(client, "/docs"))
    css = next(u for u in versioned if "swagger-ui.css" in u)
    assert "immutable" in client.get(css).headers["cache-control"]
    for url in ("/static/docs/swagger-ui.css", "/static/docs/swagger-ui.css?v=0123456789ab"):
        r = client.get(url)
        assert r.status_code == 200
        assert r.headers["cache-control"] == "public, max-age=3600"


def test_head_of_a_file_has_its_length_and_no_body(client: httpx.Client) -> None:
    full = client.get("/static/docs/swagger-ui.css")
    head = client.head("/static/docs/swagger-ui.css")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == full.headers["content-length"]


@pytest.mark.parametrize("name", ["nope.js", "core.py", "__init__.py", "..", "%2e%2e"])
def test_only_the_listed_files_are_served(client: httpx.Client, name: str) -> None:
    r = client.get(f"/static/docs/{name}")
    assert r.status_code == 404
    assert "fastapi" not in r.text.lower()
    if name not in ("..", "%2e%2e"):  # those never reach the route: the path is normalised
        assert ["path", "name"] in error_locs(r, 404)


def test_a_path_below_the_files_is_not_found(client: httpx.Client) -> None:
    r = client.get("/static/docs/..%2F__init__.py")
    assert r.status_code == 404
    assert "FastAPIOffline" not in r.text


def test_the_pages_stay_out_of_the_schema(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"] == {**spec["info"], "title": "oO ML Serving", "version": __version__}
    assert not PAGES_NOT_IN_SCHEMA & set(spec["paths"])
    assert "/score" in spec["paths"]


def test_metrics_label_files_by_route_template(client: httpx.Client) -> None:
    for name in EXPECTED_TYPES:
        assert client.get(f"/static/docs/{name}").status_code == 200
    assert client.get("/").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "oo_http_requests_total", route="/static/docs/{name}") >= len(
        EXPECTED_TYPES
    )
    assert metric(text, "oo_http_requests_total", route="/") >= 1
    for name in EXPECTED_TYPES:
        assert name not in text


# ── GET / ─────────────────────────────────────────────────────────────────────
def test_index_page_links_everywhere(client: httpx.Client) -> None:
    r = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "Accept" in r.headers["vary"]
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<title>oO ML Serving</title>" in r.text
    assert f'<span id="version">{__version__}</span>' in r.text
    hrefs = set(re.findall(r'<a href="([^"]+)"', r.text))
    assert {"/docs", "/redoc", "/dashboard", "/health", "/ready", "/metrics"} <= hrefs
    assert "<script" not in r.text
    assert_local_only(r.text)


def _index_json(client: httpx.Client, accept: str) -> dict[str, Any]:
    r = client.get("/", headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert "Accept" in r.headers["vary"]
    body: dict[str, Any] = r.json()
    return body


def test_index_as_json_for_a_client_that_prefers_it(client: httpx.Client) -> None:
    body = _index_json(client, "application/json")
    assert body["name"] == "oO ML Serving"
    assert body["version"] == __version__
    assert body["links"] == {
        "docs": "/docs",
        "redoc": "/redoc",
        "openapi": "/openapi.json",
        "dashboard": "/dashboard",
        "health": "/health",
        "ready": "/ready",
        "metrics": "/metrics",
    }
    assert _index_json(client, "text/html;q=0.5, application/json") == body


def test_index_links_answer(client: httpx.Client) -> None:
    links = _index_json(client, "application/json")["links"]
    for path in links.values():
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize("accept", [None, "*/*", BROWSER_ACCEPT, "text/html, application/json"])
def test_index_is_html_unless_json_is_preferred(client: httpx.Client, accept: str | None) -> None:
    request = client.build_request("GET", "/")
    if accept is None:  # no Accept header at all (httpx sends */* unless told otherwise)
        del request.headers["accept"]
    else:
        request.headers["accept"] = accept
    r = client.send(request)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")


def test_head_of_the_index(client: httpx.Client) -> None:
    r = client.head("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.content == b""


@pytest.mark.parametrize(
    ("accept", "json"),
    [
        ("", False),
        ("*/*", False),
        ("application/json", True),
        ("application/*", True),
        ("text/html", False),
        ("text/html, application/json", False),
        ("application/json, text/html", False),  # a tie goes to HTML
        ("text/html;q=0.9, application/json", True),
        ("application/json;q=0.1, */*;q=0.05", True),
        ("text/*;q=0.5, application/json;q=0.6", True),
        ("application/json;q=0, */*", False),
        ("text/html;q=0, */*", True),
        ("text/html;q=bogus, application/json;q=0.1", True),
        ("APPLICATION/JSON", True),
    ],
)
def test_prefers_json(accept: str, json: bool) -> None:
    assert prefers_json(accept) is json


# ── with API keys ─────────────────────────────────────────────────────────────
def test_with_keys_the_reference_stays_public_and_the_api_does_not(server_factory: Any) -> None:
    """Like /openapi.json, the pages and their files describe the API and hold no data."""
    guarded = server_factory(env={"OO_API_KEYS": KEYS, "OO_METRICS_KEY": METRICS_KEY})
    with guarded.client() as c:
        for path in ("/", "/docs", "/redoc", "/openapi.json", "/static/docs/swagger-ui.css"):
            assert c.get(path).status_code == 200, path
        # The schema the page loads declares the key, so Swagger UI offers "Authorize".
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert schemes["ApiKey"]["scheme"] == "bearer"
        assert c.get("/stats/someone").status_code == 401
        assert c.get("/metrics").status_code == 401
