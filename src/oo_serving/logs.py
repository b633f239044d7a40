"""Logs: one JSON object a line (or plain text for a terminal), and the request log.

Every logger of the service and of uvicorn writes through one handler to stderr. A
record may carry structured fields in `extra={"fields": {...}}`; they become keys of the
JSON object. User ids are written as a keyed hash unless `OO_LOG_USER_IDS=clear`: the
same user gets the same hash for as long as the key stays the same, so a user's requests
can be followed without the log holding who they are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

import orjson

from oo_serving.settings import Settings

REQUEST_LOGGER = "oo_serving.request"


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...fields, "exc"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time level logger: msg key=value ...` for reading in a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def log_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for the service and uvicorn (uvicorn's own access
    log is off: the service writes the request log, with more in it)."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    level = settings.log_level.upper()
    handler = {"handlers": ["stderr"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": handler,
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "propagate": False},
            "oo_serving": handler,
        },
    }


class UserIdHasher:
    """HMAC-SHA256 of a user id under the log key, 16 hex digits; or the id itself."""

    def __init__(self, key: str, clear: bool = False) -> None:
        self._key = key.encode()
        self._clear = clear

    def __call__(self, user_id: str) -> str:
        if self._clear:
            return user_id
        return hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()[:16]
