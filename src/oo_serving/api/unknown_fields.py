"""Fields a request body held that the API does not know.

They are accepted, as the prototype accepted them, but not silently: the route counts the
request in a metric and names the fields in the answer's `X-Unknown-Fields` header, so a
misspelt `"featrues"` is seen by the client instead of being scored on defaults.

The names come from the validated models (`extra="allow"` keeps unknown fields in
`__pydantic_extra__`), so the body is walked once, by pydantic; a route looks at a nested
model's extras only while it reads that model anyway.

The header is built from client input, so it is made safe here: every name is a dotted
path (`candidates[].features.featrues`), each key percent-encoded (UTF-8) outside
`A-Z a-z 0-9 _ - ~`, so a `.`, `,`, space, CR, LF or any non-ASCII character in a key
appears as `%2E`, `%2C`, `%20`, `%0D`, `%0A`, `%C3%BC`...; a key longer than
MAX_KEY_LENGTH characters once encoded is cut and ends in `...`; an empty key is `""`.
At most MAX_NAMES distinct names are given, in the order they were first met; a final
`...` says there were more. A name repeated in every candidate is given once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

HEADER = "X-Unknown-Fields"
MAX_NAMES = 10
MAX_KEY_LENGTH = 40
MORE = "..."
SEPARATOR = ", "

_PLAIN_KEY = re.compile(rf"[A-Za-z0-9_\-~]{{1,{MAX_KEY_LENGTH}}}")


def encode_key(key: str) -> str:
    """`key` as printable ASCII that cannot be mistaken for a separator, a path or
    another header: percent-encoded outside `A-Z a-z 0-9 _ - ~`, cut to MAX_KEY_LENGTH."""
    if _PLAIN_KEY.fullmatch(key):
        return key
    if not key:
        return '""'
    # quote leaves `.` as it is: encoded too, since it separates the path's parts.
    encoded = quote(key[: MAX_KEY_LENGTH + 1], safe="", errors="surrogatepass").replace(".", "%2E")
    if len(encoded) <= MAX_KEY_LENGTH:
        return encoded
    cut = MAX_KEY_LENGTH - len(MORE)
    # Never cut inside a %XX escape.
    percent = encoded.rfind("%", cut - 2, cut)
    if percent != -1:
        cut = percent
    return encoded[:cut] + MORE


class UnknownFields:
    """The distinct unknown field names of one body, at most MAX_NAMES of them."""

    __slots__ = ("_names", "more")

    def __init__(self) -> None:
        self._names: dict[str, None] = {}
        self.more = False

    def add(self, prefix: str, extra: Mapping[str, Any] | None) -> None:
        """Note the keys of a model's `__pydantic_extra__`, as `prefix` + key."""
        if not extra:
            return
        names = self._names
        for key in extra:
            name = prefix + encode_key(key)
            if name in names:
                continue
            if len(names) >= MAX_NAMES:
                self.more = True
                return
            names[name] = None

    def __bool__(self) -> bool:
        return bool(self._names)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def header(self) -> str:
        """The value of `X-Unknown-Fields`, e.g. `candidates[].featrues, extra`."""
        return SEPARATOR.join([*self._names, MORE] if self.more else self._names)
