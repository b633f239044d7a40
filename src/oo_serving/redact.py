"""Passwords out of what the service prints: database URLs and the messages that hold them.

A database URL may carry a password (`postgresql://user:password@host/db`, or
`?password=...`), and so may an error about it: libpq quotes a URL it cannot parse in
full. Whatever is echoed or logged goes through here first. The rest of the URL (user,
host, port, database, other parameters) is kept: it is what an operator needs to see.
"""

from __future__ import annotations

import re

MASK = "***"

# A `password=` setting: in a URL's query (up to the next `&` or `#`) or in a libpq
# key=value string, where the value may be single-quoted.
_PASSWORD_SETTING = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|[^\s&#'\"]+)", re.IGNORECASE
)
# A URL within a message: scheme://, then anything up to whitespace or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, wherever it is given.

    The userinfo's password (`scheme://user:password@host`) ends at the last `@` before
    the query, so one holding a raw `/` or `@` is masked whole, as is one with its `@`
    percent-encoded (`%40`); `password=` values in the query are masked too. The URL need
    not be well formed: nothing here parses it strictly. (A raw `?` or `#` in a password,
    which a URL must percent-encode, would end it early.)
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _PASSWORD_SETTING.sub(_mask_setting, url)
    at = rest.rfind("@", 0, len(re.split(r"[?#]", rest, maxsplit=1)[0]))
    if at >= 0 and not scheme.lower().startswith("sqlite"):
        user, colon, _password = rest[:at].partition(":")
        rest = f"{user}{':' + MASK if colon else ''}{rest[at:]}"
    return f"{scheme}://{_PASSWORD_SETTING.sub(_mask_setting, rest)}"


def redact_secrets(text: str) -> str:
    """`text` (an error message, a log line) with every URL in it redacted, and every
    libpq `password=...` setting masked."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _PASSWORD_SETTING.sub(_mask_setting, text)


def _mask_setting(match: re.Match[str]) -> str:
    return f"{match.group('key')}{MASK}"
