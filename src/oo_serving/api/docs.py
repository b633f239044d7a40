"""The API reference, served whole by this app: Swagger UI at /docs, ReDoc at /redoc.

Their scripts, styles and icon are the files the `fastapi-offline` package ships (Swagger
UI 5, which reads the OpenAPI 3.1 that FastAPI writes, and ReDoc 2), served here under
/static/docs/, so the pages load on a machine without internet and make no request to
another host. Like /openapi.json they are public with or without API keys: they describe
the API and hold no data. A key typed into Swagger UI's "Authorize" is sent only to this
server.

None of these routes is in the OpenAPI schema.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from oo_serving.errors import NotFound

STATIC_PREFIX = "/static/docs"
ASSETS_PACKAGE = "fastapi-offline"
# Every file served, and its type; any other name is a 404.
MEDIA_TYPES: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# The pages ask for each file with a digest of its content in the query string (?v=), so
# a browser may keep it as long as it likes: another file gets another URL. Asked for
# without the current digest, a file may be kept for an hour.
CACHE_CONTROL = "public, max-age=31536000, immutable"
SHORT_CACHE_CONTROL = "public, max-age=3600"
# ReDoc's menu shows Redocly's logo from their CDN: a request to another host on every
# view, refused offline. It is swapped for an empty image; the credit's text stays.
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    digest: str  # of the body: the ?v= of its URL

    @classmethod
    def of(cls, body: bytes, media_type: str) -> Asset:
        return cls(body, media_type, hashlib.sha256(body).hexdigest()[:12])


def load_assets() -> dict[str, Asset]:
    """The files, read once (about 3 MB); an error at start-up if one is missing."""
    folder = importlib.resources.files("fastapi_offline").joinpath("static")
    assets: dict[str, Asset] = {}
    for name, media_type in MEDIA_TYPES.items():
        try:
            body = folder.joinpath(name).read_bytes()
        except OSError as exc:
            raise RuntimeError(f"{ASSETS_PACKAGE} is installed without {name}: {exc}") from exc
        if name == "redoc.standalone.js":
            body = body.replace(REDOC_CDN_LOGO, EMPTY_IMAGE)
        assets[name] = Asset.of(body, media_type)
    return assets


def _root(request: Request) -> str:
    """The path the app is mounted at behind a proxy ('' when it is not)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def docs_router(title: str, openapi_url: str) -> APIRouter:
    assets = load_assets()
    versions = {name: asset.digest for name, asset in assets.items()}
    router = APIRouter(include_in_schema=False)

    def asset_url(root: str, name: str) -> str:
        return f"{root}{STATIC_PREFIX}/{name}?v={versions[name]}"

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{title} - Swagger UI",
            swagger_js_url=asset_url(root, "swagger-ui-bundle.js"),
            swagger_css_url=asset_url(root, "swagger-ui.css"),
            swagger_favicon_url=asset_url(root, "favicon.png"),
        )

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{title} - ReDoc",
            redoc_js_url=asset_url(root, "redoc.standalone.js"),
            redoc_favicon_url=asset_url(root, "favicon.png"),
            with_google_fonts=False,
        )

    # One route with the name as a parameter: metrics label it by the template,
    # /static/docs/{name}, never by the file.
    @router.api_route(STATIC_PREFIX + "/{name}", methods=["GET", "HEAD"])
    async def asset(name: str, request: Request) -> Response:
        found = assets.get(name)
        if found is None:
            raise NotFound(f"no file {name!r} under {STATIC_PREFIX}/", ("path", "name"))
        current = request.query_params.get("v") == found.digest
        cache = CACHE_CONTROL if current else SHORT_CACHE_CONTROL
        return Response(found.body, media_type=found.media_type, headers={"Cache-Control": cache})

    return router


def install_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their files; the app is built with docs_url=None."""
    if app.openapi_url is None:
        raise ValueError("the API reference pages need the app's /openapi.json")
    app.include_router(docs_router(app.title, app.openapi_url))
