"""The one exception type for mistakes in a user's input (config, data files, names), and the
helpers every error message uses.

The CLI turns a UserError into a single error line and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input that the user can fix; the message says what is wrong and how to fix it."""


def one_line(text: object, limit: int = 200) -> str:
    """`text` (or an exception's message) on one line of at most `limit` characters."""
    text = " ".join(str(text).split()) or (type(text).__name__ if isinstance(text, BaseException) else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unknown_name(what: str, name: object, choices: Iterable[str]) -> UserError:
    """'unknown WHAT 'x': did you mean 'y'? (choose one of a, b, c)'."""
    choices = list(choices)
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6) if isinstance(name, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"unknown {what} {one_line(repr(name), 60)}: {hint}(choose one of {', '.join(choices)})")
