"""`GET /`: what this server is and where to go, as HTML or, when asked, JSON.

A client that ranks `application/json` above `text/html` in its Accept header gets
`{"name", "version", "links"}`; everyone else (a browser, `curl` with its `*/*`) gets a
small page with no scripts and nothing from another host. Public, like /health, and not
in the OpenAPI schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from oo_serving.api.docs import STATIC_PREFIX


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    path: str
    what: str


LINKS: tuple[Link, ...] = (
    Link("docs", "/docs", "API reference: every operation, with Try it out (Swagger UI)"),
    Link("redoc", "/redoc", "API reference, for reading (ReDoc)"),
    Link("openapi", "/openapi.json", "the OpenAPI schema"),
    Link("dashboard", "/dashboard", "operator dashboard"),
    Link("health", "/health", "liveness"),
    Link("ready", "/ready", "readiness: the database answers"),
    Link("metrics", "/metrics", "Prometheus metrics"),
)
# The page allows its own inline style and favicon, nothing else.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'"
STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto;
       padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; margin-bottom: 0; }
.version { color: #59636e; margin-top: 0; }
li { margin: 0.3rem 0; }
code { font-size: 0.95em; }
"""


def _quality(accept: str, media_type: str) -> float:
    """How much `accept` wants `media_type`: the q of its most specific matching range."""
    kind = media_type.split("/")[0]
    best = (-1, 0.0)  # (specificity, q)
    for item in accept.split(","):
        range_, *params = (part.strip() for part in item.split(";"))
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(range_.lower())
        if specificity is None or specificity < best[0]:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best = (specificity, q)
    return best[1]


def prefers_json(accept: str) -> bool:
    """True when the Accept header ranks application/json strictly above text/html."""
    return _quality(accept, "application/json") > _quality(accept, "text/html")


def _page(version: str, root: str) -> str:
    items = "\n".join(
        f'<li><a href="{escape(root + link.path)}">{escape(link.path)}</a>: {escape(link.what)}</li>'
        for link in LINKS
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>oO ML Serving</title>
<link rel="icon" href="{escape(root)}{STATIC_PREFIX}/favicon.png">
<style>{STYLE}</style>
</head>
<body>
<h1>oO ML Serving</h1>
<p class="version">version <span id="version">{escape(version)}</span></p>
<p>Picks which tip the oO app shows next, and learns from what the user does with it.</p>
<ul>
{items}
</ul>
<p>Ask with <code>Accept: application/json</code> for these links as JSON.</p>
</body>
</html>
"""


def index_router(version: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def index(request: Request) -> Response:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        if prefers_json(request.headers.get("accept", "")):
            links = {link.name: root + link.path for link in LINKS}
            body = {"name": "oO ML Serving", "version": version, "links": links}
            return JSONResponse(body, headers={"Vary": "Accept"})
        headers = {"Vary": "Accept", "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        return HTMLResponse(_page(version, root), headers=headers)

    return router
