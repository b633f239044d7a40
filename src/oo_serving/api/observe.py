"""What every request leaves behind: a request id, metrics, and one log line.

A pure ASGI middleware, outermost, so that refusals made before the endpoints (a body
over the limit, a missing key) are counted and logged like any answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from time import perf_counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oo_serving.api.schemas import DOT_SEGMENTS, USER_ID_MAX_LENGTH, USER_ID_PATTERN
from oo_serving.logs import REQUEST_LOGGER
from oo_serving.metrics import Metrics
from oo_serving.service import EventIds

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is kept if it is short and plain; anything else is replaced, so that a
# header cannot inject text into the logs.
_GOOD_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
# Set in the ASGI scope by the endpoints that learn the user id from the body.
USER_ID_KEY = "oo.user_id"
KEY_ID_KEY = "oo.key_id"
# Set by BodyLimitMiddleware when the client went away before its body was read whole:
# nothing is answered then, and the only place that can happen is there.
CLIENT_GONE_KEY = "oo.client_gone"
# A path's user id is logged only if it is one the endpoints accept: it arrives here
# percent-decoded and, on a refused request, unvalidated, so it could hold anything.
_VALID_USER_ID = re.compile(USER_ID_PATTERN)
# A request whose client went away before it was answered (nginx's "client closed
# request"): the client's doing, so neither a 500 in the metrics nor an error in the log.
CLIENT_CLOSED_REQUEST = 499

log = logging.getLogger(REQUEST_LOGGER)


class ObserveMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        user_label: Callable[[str], str],
        log_requests: bool,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.user_label = user_label
        self.log_requests = log_requests
        self.new_id = EventIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        request_id = self._request_id(scope)
        status = 500  # if no answer is started, and the client is still there

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER, request_id))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = perf_counter() - start
            if scope.get(CLIENT_GONE_KEY):
                status = CLIENT_CLOSED_REQUEST
            route = route_label(scope)
            self.metrics.request(scope["method"], route, status, seconds)
            if self.log_requests:
                self._log(scope, route, status, seconds, request_id)

    def _request_id(self, scope: Scope) -> bytes:
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                if _GOOD_REQUEST_ID.fullmatch(value):
                    return bytes(value)
                break
        return self.new_id().encode()

    def _log(
        self, scope: Scope, route: str, status: int, seconds: float, request_id: bytes
    ) -> None:
        user_id = scope.get(USER_ID_KEY) or _valid_user_id(
            scope.get("path_params", {}).get("user_id")
        )
        fields = {
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id.decode(),
            "user": self.user_label(user_id) if user_id else None,
            "key": scope.get(KEY_ID_KEY),
        }
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "request", extra={"fields": fields})


def _valid_user_id(user_id: object) -> str | None:
    """`user_id` if it is a valid user id, else None: whatever the path held (a newline,
    an escape sequence, a forged record) stays out of the log."""
    if (
        isinstance(user_id, str)
        and len(user_id) <= USER_ID_MAX_LENGTH
        and user_id not in DOT_SEGMENTS
        and _VALID_USER_ID.fullmatch(user_id)
    ):
        return user_id
    return None


def route_label(scope: Scope) -> str:
    """The route a request matched, as metrics and logs name it: the template without
    convertors (e.g. /stats/{user_id}), never a path that holds a value. A plain route of
    the framework's own (/openapi.json) records no template; its path is fixed (it has no
    parameters), so the path itself is the label. Anything else is "unmatched"."""
    template = getattr(scope.get("route"), "path_format", None)
    if template:
        return str(template)
    if scope.get("endpoint") is not None and scope.get("path_params") == {}:
        return str(scope["path"])
    return "unmatched"
