"""The one layer every request passes: request id, body limit, hot routes, metrics, log.

One pure ASGI class around the whole app, instead of a stack of middlewares, so that a
request pays for one call frame instead of one per middleware, and so that refusals made
before any endpoint (a body over the limit) are counted and logged like any answer:

1. the request id: the caller's `X-Request-ID` if it is short and plain, else a new one,
   sent back on every answer;
2. the body of every request but GET, HEAD and OPTIONS is read here, counted as it
   arrives (a lying or absent Content-Length does not help), and refused with a JSON 413
   past `max_bytes`; a client that leaves mid-body is recorded as a 499 and not answered;
3. POST /score and POST /reward go to their plain handlers (`api/hot.py`) with the body;
   everything else to FastAPI, with the body handed on in one piece;
4. one count and one latency observation per request, and one log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from time import perf_counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oo_serving.api.errors import error_body
from oo_serving.api.hot import Answer, Handler, json_answer
from oo_serving.api.schemas import DOT_SEGMENTS, USER_ID_MAX_LENGTH, USER_ID_PATTERN
from oo_serving.api.scope_keys import KEY_ID_KEY, USER_ID_KEY
from oo_serving.logs import RequestLog
from oo_serving.metrics import Metrics
from oo_serving.service import EventIds

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is kept if it is short and plain; anything else is replaced, so that a
# header cannot inject text into the logs.
_GOOD_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
# A path's user id is logged only if it is one the endpoints accept: it arrives here
# percent-decoded and, on a refused request, unvalidated, so it could hold anything.
_VALID_USER_ID = re.compile(USER_ID_PATTERN)
# A request whose client went away before it was answered (nginx's "client closed
# request"): the client's doing, so neither a 500 in the metrics nor an error in the log.
CLIENT_CLOSED_REQUEST = 499
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})
_JSON = (b"content-type", b"application/json")

errors = logging.getLogger("oo_serving.api")


class _ClientGone(Exception):
    """The client closed the connection before its body was read whole."""


class _TooLarge(Exception):
    """The body is larger than the limit."""


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        hot: Mapping[str, Handler],
        metrics: Metrics,
        user_label: Callable[[str], str],
        log_requests: bool,
        max_bytes: int,
    ) -> None:
        self.app = app
        self.hot = hot
        self.metrics = metrics
        self.user_label = user_label
        self.log_requests = log_requests
        self.max_bytes = max_bytes
        self.new_id = EventIds()
        self.request_log = RequestLog()
        self._too_large = json_answer(
            413,
            error_body(
                ["body"], f"request body is larger than {max_bytes} bytes", "body_too_large"
            ),
            {"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        request_id, declared = self._read_headers(scope)
        status = 500  # if no answer is started, and the client is still there
        route: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            if scope["method"] in _NO_BODY:
                await self.app(scope, receive, send_with_id)
                return
            try:
                body = await self._read_body(receive, declared)
            except _ClientGone:
                status = CLIENT_CLOSED_REQUEST  # nobody to answer
                return
            except _TooLarge:
                status = await _send(send, self._too_large, request_id)
                return
            handler = self.hot.get(scope["path"]) if scope["method"] == "POST" else None
            if handler is None:
                await self.app(scope, _replay(body, receive), send_with_id)
                return
            route = scope["path"]
            try:
                answer = await handler(body, scope)
            except Exception:
                errors.exception("%s failed", route)
                answer = json_answer(500, error_body([], "Internal Server Error", "internal_error"))
            status = await _send(send, answer, request_id)
        finally:
            seconds = perf_counter() - start
            if route is None:
                route = route_label(scope)
            self.metrics.request(scope["method"], route, status, seconds)
            if self.log_requests:
                self._log(scope, route, status, seconds, request_id)

    def _read_headers(self, scope: Scope) -> tuple[bytes, int | None]:
        """The request id, and the declared Content-Length if it is a number."""
        request_id: bytes | None = None
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER and request_id is None:
                request_id = bytes(value) if _GOOD_REQUEST_ID.fullmatch(value) else b""
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        return request_id or self.new_id().encode(), declared

    async def _read_body(self, receive: Receive, declared: int | None) -> bytes:
        if declared is not None and declared > self.max_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

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
        self.request_log(logging.ERROR if status >= 500 else logging.INFO, fields)


async def _send(send: Send, answer: Answer, request_id: bytes) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [
                _JSON,
                (b"content-length", str(len(answer.body)).encode()),
                (REQUEST_ID_HEADER, request_id),
                *answer.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer.body})
    return answer.status


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` in one piece, then whatever the connection says next."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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
