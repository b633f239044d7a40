"""Every error leaves as JSON of one shape: {"detail": [{"loc", "msg", "type"}]}.

The one place where error classes become HTTP statuses.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from oo_serving.api.auth import AuthError
from oo_serving.errors import Conflict, NotFound, ServiceError, Unavailable

STATUS_OF: tuple[tuple[type[ServiceError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
)


def status_of(exc: ServiceError) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 400


def error_body(loc: list[str | int], msg: str, type_: str) -> dict[str, Any]:
    return {"detail": [{"loc": loc, "msg": msg, "type": type_}]}


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", ""))
    if error.get("type") == "json_invalid" and "error" in error.get("ctx", {}):
        msg = f"{msg}: {error['ctx']['error']}"
    return msg


def validation_body(exc: RequestValidationError) -> dict[str, Any]:
    # The input and ctx of an error may be huge or not JSON (e.g. bytes): leave them out.
    return {
        "detail": [
            {"loc": list(e.get("loc", ())), "msg": _message(e), "type": e.get("type", "")}
            for e in exc.errors()
        ]
    }


def service_answer(exc: ServiceError) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """A service error's status, body and headers (Retry-After on a 503)."""
    status = status_of(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return status, error_body(list(exc.loc), exc.message, exc.code), headers


def auth_answer(exc: AuthError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A refused key's status, body and challenge."""
    body = error_body(["header", "Authorization"], exc.message, exc.code)
    return exc.status, body, {"WWW-Authenticate": exc.challenge}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_body(exc), status_code=422)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status, body, headers = service_answer(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        error_body([], str(exc.detail), f"http_{exc.status_code}"),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _auth_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthError)
    status, body, headers = auth_answer(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
