"""Logs: one JSON object a line (or plain text for a terminal), and the request log.

Every logger of the service, of uvicorn and of the database driver writes through one
handler to stderr, which masks passwords in messages (oo_serving.redact). A record may
carry structured fields in `extra={"fields": {...}}`; they become keys of the JSON
object. User ids are written as a keyed hash unless `OO_LOG_USER_IDS=clear`: the
same user gets the same hash for as long as the key stays the same, so a user's requests
can be followed without the log holding who they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import orjson

from oo_serving.redact import redact_secrets
from oo_serving.settings import Settings

REQUEST_LOGGER = "oo_serving.request"


def _utc(created: float) -> str:
    second = int(created)
    if second != _last_second[0]:
        _last_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_last_second[1]}.{int(created * 1000) % 1000:03d}Z"


# The last second formatted, and its text: strftime once a second, not once a line.
_last_second: list[Any] = [-1, ""]


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
            entry["exc"] = redact_secrets(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


_QUOTED_ESCAPES = {"\\": "\\\\", '"': '\\"'}
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(text: str, quoted: bool = True) -> str:
    """`text` with every non-printable character escaped as in JSON (\\n, \\u001b, \\u2028,
    ...), so nothing a terminal or a line splitter acts on is left; with `quoted`, also
    backslash and double quote, for writing it between double quotes."""
    escapes = {**_CONTROL_ESCAPES, **_QUOTED_ESCAPES} if quoted else _CONTROL_ESCAPES
    out = []
    for c in text:
        if c in escapes:
            out.append(escapes[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def _quoted(text: str, spaces: bool = False) -> str:
    """`text` as it is if it is plain: not empty, printable (which leaves no whitespace but
    the space), without `=`, `"` or backslash, and without spaces unless `spaces`.
    Otherwise between double quotes, escaped."""
    plain = (
        bool(text)
        and all(c.isprintable() and c not in '="\\' for c in text)
        and (spaces or " " not in text)
    )
    return text if plain else f'"{_escape(text)}"'


class TextFormatter(logging.Formatter):
    """`time level logger: msg key=value ...` for reading in a terminal.

    One record is one line, whatever it holds: a request path, hence a user id or an
    exception message, can carry a newline or an escape sequence, and written raw it would
    forge a record or rewrite the terminal. So a field value is written as it is only when
    plain (printable, no whitespace, `=` or `"`), and otherwise quoted with JSON's escapes;
    the message likewise, though plain spaces are allowed in it (messages are sentences).
    A traceback keeps its lines, escaped and indented, so that none can start a record.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = _quoted(record.getMessage(), spaces=True)
        line = f"{_utc(record.created)} {record.levelname:<7} {record.name}: {message}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(
                f"{_quoted(str(k))}={_quoted(str(v))}" for k, v in fields.items()
            )
        if record.exc_info:
            trace = redact_secrets(self.formatException(record.exc_info))
            line += "".join(f"\n    {_escape(part, quoted=False)}" for part in trace.splitlines())
        return line


def log_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for the service and uvicorn (uvicorn's own access
    log is off: the service writes the request log, with more in it)."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    level = settings.log_level.upper()
    handler = {"handlers": ["stderr"], "level": level, "propagate": False}
    # The driver's pool warns of every failed connection attempt; below warning it is
    # chatty (a line per connection lent).
    driver_level = max(logging.getLevelName(level), logging.WARNING)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "filters": {"redact": {"()": f"{RedactSecrets.__module__}.{RedactSecrets.__qualname__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": handler,
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "propagate": False},
            "oo_serving": handler,
            "psycopg": {**handler, "level": logging.getLevelName(driver_level)},
        },
    }


class RedactSecrets(logging.Filter):
    """Masks passwords in a record's message: libpq quotes a database URL it cannot parse
    whole, and the connection pool logs that error as it is (see oo_serving.redact)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class UserIdHasher:
    """HMAC-SHA256 of a user id under the log key, 16 hex digits; or the id itself.

    The keyed state is set up once and copied per id, and recent ids are remembered (at
    most CACHE of them), since a request log names the same users over and over.
    """

    CACHE = 4096

    def __init__(self, key: str, clear: bool = False) -> None:
        self._keyed = hmac.new(key.encode(), digestmod=hashlib.sha256)
        self._clear = clear
        self._seen: dict[str, str] = {}

    def __call__(self, user_id: str) -> str:
        if self._clear:
            return user_id
        label = self._seen.get(user_id)
        if label is None:
            h = self._keyed.copy()
            h.update(user_id.encode())
            label = h.hexdigest()[:16]
            if len(self._seen) >= self.CACHE:
                self._seen.clear()
            self._seen[user_id] = label
        return label


class RequestLog:
    """The request log: one line per request, through `oo_serving.request`.

    With the service's own JSON handler in place (`log_config`, the default), an INFO line
    is built with one orjson call and the lines of one event-loop turn are written to the
    handler's stream together, instead of each going through a LogRecord, the handler's
    lock, its filter and its formatter: measured in-process (bench/layers.py), 3 µs a line
    instead of 8, the line written once per loop turn rather than once per request.
    The line is the one JsonFormatter writes. Any other set-up (text format, handlers of
    an embedding application, a level that drops INFO), and every ERROR line, go through
    `logging` as any record.
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger(REQUEST_LOGGER)
        self._stream: Any = None
        self._checked = False
        self._lines: list[str] = []

    def __call__(self, level: int, fields: dict[str, Any]) -> None:
        if level != logging.INFO or self._fast_stream() is None:
            self._logger.log(level, "request", extra={"fields": fields})
            return
        if not self._logger.isEnabledFor(level):
            return
        entry = {
            "ts": _utc(time.time()),
            "level": "info",
            "logger": REQUEST_LOGGER,
            "msg": "request",
        }
        entry.update(fields)
        self._lines.append(orjson.dumps(entry).decode())
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write at once
                self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            with contextlib.suppress(OSError, ValueError):  # stderr closed: as logging does
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()

    def _fast_stream(self) -> Any:
        if not self._checked:
            self._checked = True
            self._stream = _json_stream(self._logger)
        return self._stream


def _json_stream(logger: logging.Logger) -> Any:
    """The stream of the handler `logger`'s records reach, if that is the one handler,
    a StreamHandler with JsonFormatter and no filter but RedactSecrets; else None."""
    current: logging.Logger | None = logger
    while current is not None and not current.handlers:
        current = current.parent if current.propagate else None
    if current is None or len(current.handlers) != 1:
        return None
    handler = current.handlers[0]
    if (
        type(handler) is logging.StreamHandler
        and type(handler.formatter) is JsonFormatter
        and all(isinstance(f, RedactSecrets) for f in handler.filters)
    ):
        return handler.stream
    return None
