"""Errors the core raises for users: one line, naming the file and the fix; and ``quoted`` for values in them."""

from __future__ import annotations

QUOTED_LIMIT = 80  # characters of a user's value shown in a message (the rest is counted, not shown)
_LINE_BREAKS = {"\x85", "\u2028", "\u2029"}  # Unicode line breaks besides the control characters


class HarmonizeError(Exception):
    """Base class of errors that are the user's to fix (printed as one line, no traceback)."""


class InputError(HarmonizeError):
    """A bad input: missing or unreadable file, size mismatch, empty mask, bad value. Never retried."""


class LimitError(InputError):
    """An input over a configured limit (bytes, pixels, rows): the verdict depends on the settings, not on the file
    alone, so caches of verdicts must not keep it."""


class WeightsUnavailableError(HarmonizeError):
    """The requested backbone weights cannot be loaded; the message says how to get them."""


class StageTimeoutError(HarmonizeError):
    """An optimisation ran past its configured ``max_seconds`` (a deadline checked between iterations)."""


class DivergedError(HarmonizeError):
    """An optimisation diverged: a loss or the image gradient became NaN or infinite, or the loss exploded."""


def quoted(value: object, limit: int = QUOTED_LIMIT) -> str:
    """Return ``value`` as text in single quotes for a one-line message: never a Python repr, never a line break.

    Control characters and Unicode line breaks are written as ``\\xNN``/``\\uNNNN``; a text longer than ``limit``
    characters is cut there and its length given: ``'aaaa...' (200000 characters)``.
    """
    text = str(value)
    shown = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else f"\\u{ord(c):04x}" if c in _LINE_BREAKS
                    else c for c in text[:limit])
    return f"'{shown}...' ({len(text):,} characters)" if len(text) > limit else f"'{shown}'"
