"""User-facing errors. Every message says what was wrong, where, and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeltatuneError(Exception):
    """An error caused by the user's config, data or environment, with a fix in the message."""


class ConfigError(DeltatuneError):
    pass


class DataError(DeltatuneError):
    pass


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the nearest option, or the list of options if none is near."""
    options = sorted(set(options))
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if close:
        return f" (did you mean `{close[0]}`?)"
    return f" (valid: {', '.join(options)})" if options else ""
