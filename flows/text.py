"""Messages for users: every error becomes one line."""

from __future__ import annotations

from harmonize_core.errors import HarmonizeError


def one_line(exc: BaseException) -> str:
    """Return ``exc`` as one line: the message's first line; the class name too for unexpected errors."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, HarmonizeError):
        return text
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
