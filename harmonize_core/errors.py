"""Errors the core raises for users: one line, naming the file and the fix."""


class HarmonizeError(Exception):
    """Base class of errors that are the user's to fix (printed as one line, no traceback)."""


class InputError(HarmonizeError):
    """A bad input: missing or unreadable file, size mismatch, empty mask, bad value. Never retried."""


class WeightsUnavailableError(HarmonizeError):
    """The requested backbone weights cannot be loaded; the message says how to get them."""


class StageTimeoutError(HarmonizeError):
    """An optimisation ran past its configured ``max_seconds`` (a deadline checked between iterations)."""


class DivergedError(HarmonizeError):
    """An optimisation diverged: a loss or the image gradient became NaN or infinite, or the loss exploded."""
