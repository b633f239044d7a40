"""Path convertors for user ids, registered when the app is built (`register`).

Starlette keeps convertors in one process-wide table; registering them at import would
make importing this package change the framework for every app in the process.
"""

from __future__ import annotations

from starlette.convertors import CONVERTOR_TYPES, Convertor, register_url_convertor


class WholeSegmentConvertor(Convertor[str]):
    """Like `path`, but the match cannot stop short of a trailing newline.

    Starlette anchors route patterns with `$`, which also matches before a final "\\n";
    with `.*` an id of "u\\n" would reach the handler as "u". Matching everything lets
    the user_id pattern see, and refuse, the whole id.
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class WholeButExportConvertor(WholeSegmentConvertor):
    """`whole`, except a path that ends in /export, which is another resource.

    Without it `DELETE /users/u/export` would reach the delete route with the id
    "u/export" and answer 422, instead of 405 for a method the export does not have.
    No valid id holds a "/", so this refuses no id that could be deleted.

    The test is a lookahead from the start of the value, not a lookbehind at its end: a
    lookbehind sees past the value into the route's "/users" prefix, so the id "export"
    itself (path "/users/export") could not be deleted. `\\Z`, not `$`: only a value that
    ends in "/export", not one followed by a newline.
    """

    regex = r"(?s:(?!.*/export\Z).*)"


CONVERTORS: dict[str, Convertor[str]] = {
    "whole": WholeSegmentConvertor(),
    "whole_but_export": WholeButExportConvertor(),
}


def register() -> None:
    """Make `{user_id:whole}` and `{user_id:whole_but_export}` usable in route paths."""
    for name, convertor in CONVERTORS.items():
        if name not in CONVERTOR_TYPES:
            register_url_convertor(name, convertor)
