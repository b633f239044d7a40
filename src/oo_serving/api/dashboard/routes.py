"""The dashboard's routes: HTML pages for people, not part of the API's OpenAPI schema.

    GET /dashboard?window=7d              the overview (windows: data.WINDOWS)
    GET /dashboard/users?user_id=ID       the form's target: redirects to the user's page
    GET /dashboard/users/{user_id}?limit  one user's model and recent decisions
    GET /dashboard/static/dashboard.css   the stylesheet (public: it holds no data)

Every answer is HTML, errors included (400, 401, 403, 404, 503). Pages forbid scripts,
frames and any other origin (Content-Security-Policy), and are not cached: they show
user data.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from oo_serving.api.auth import KeyRing
from oo_serving.api.dashboard import data, pages
from oo_serving.api.dashboard.access import Refusal, refusal
from oo_serving.api.dashboard.style import CSS
from oo_serving.api.schemas import DOT_SEGMENTS, USER_ID_MAX_LENGTH, USER_ID_PATTERN
from oo_serving.errors import Unavailable
from oo_serving.service import Service
from oo_serving.settings import Settings

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self';"
    " base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_USER_ID = re.compile(USER_ID_PATTERN)


def valid_user_id(user_id: str) -> bool:
    """The ids /score accepts (api/schemas.py): no other id can have a page."""
    return (
        0 < len(user_id) <= USER_ID_MAX_LENGTH
        and user_id not in DOT_SEGMENTS
        and _USER_ID.fullmatch(user_id) is not None
    )


def _root(request: Request) -> str:
    """The path the app is mounted at behind a proxy ('' when it is not)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _page(html: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def _error(request: Request, status: int, title: str, message: str) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return _page(pages.error_page(title, message, root=_root(request)), status, headers)


def _refused(request: Request, why: Refusal) -> Response:
    html = pages.error_page(why.title, why.message, root=_root(request))
    return _page(html, why.status, why.headers)


def _unavailable(request: Request, exc: Unavailable) -> Response:
    return _error(request, 503, "Database unavailable", f"{exc.message}. Reload in a moment.")


def dashboard_router(service: Service, settings: Settings, ring: KeyRing) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/dashboard/static/dashboard.css")
    async def stylesheet() -> Response:
        # Asked for with the release in the query string: a new release, a new URL.
        return Response(
            CSS,
            media_type="text/css",
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    @router.api_route("/dashboard", methods=["GET", "HEAD"])
    async def overview(request: Request, window: str = data.DEFAULT_WINDOW) -> Response:
        denied = refusal(ring, request)
        if denied is not None:
            return _refused(request, denied)
        chosen = data.WINDOWS.get(window)
        if chosen is None:
            names = ", ".join(data.WINDOWS)
            return _error(request, 400, "Unknown window", f"window must be one of {names}.")
        try:
            view = await data.overview(service, settings, chosen)
        except Unavailable as exc:
            return _unavailable(request, exc)
        return _page(pages.overview_page(view, root=_root(request)))

    @router.api_route("/dashboard/users", methods=["GET", "HEAD"])
    async def find_user(request: Request, user_id: str = "") -> Response:
        denied = refusal(ring, request)
        if denied is not None:
            return _refused(request, denied)
        wanted = user_id.strip()
        if not valid_user_id(wanted):
            return _error(
                request,
                400,
                "Not a user id",
                "A user id is 1 to 256 letters, digits or - . _ ~ : @ + =.",
            )
        return RedirectResponse(pages.user_path(_root(request), wanted), status_code=303)

    @router.api_route("/dashboard/users/{user_id:whole}", methods=["GET", "HEAD"])
    async def user(request: Request, user_id: str, limit: str = "") -> Response:
        denied = refusal(ring, request)
        if denied is not None:
            return _refused(request, denied)
        if not valid_user_id(user_id):
            return _error(
                request, 404, "No such user", "This is not a user id the service accepts."
            )
        count = _limit(limit)
        if count is None:
            return _error(
                request,
                400,
                "Bad limit",
                f"limit must be a whole number from 1 to {data.MAX_DECISIONS}.",
            )
        try:
            view = await data.user_view(service, user_id, count)
        except Unavailable as exc:
            return _unavailable(request, exc)
        if not view.known:
            return _error(
                request,
                404,
                "No such user",
                f"No model and no logged decision for the user {user_id!r}: it has not"
                " been scored yet, or was erased.",
            )
        return _page(pages.user_page(view, root=_root(request)))

    return router


def _limit(text: str) -> int | None:
    """The number of decisions asked for; None if it is not one."""
    if not text:
        return data.DEFAULT_DECISIONS
    if not text.isdigit() or not 1 <= int(text) <= data.MAX_DECISIONS:
        return None
    return int(text)
