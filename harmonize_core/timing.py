"""Named phases inside a stage, for timing: a hook that does nothing unless a caller records.

The passes mark the phases a benchmark wants to time on their own (``with phase("pass1.match", layer):``, each
name in ``PHASES``). By default ``phase`` returns a null context: nothing is timed, nothing is kept. A caller that
wants the timings wraps the stage call in ``recording(timer)``, where ``timer(name, detail)`` returns the context
manager entered around that phase (``bench.common.PhaseTimes`` synchronises the device and reads a clock). The
recorder is held in a context variable, so it applies to the calling thread's run only.

Nothing here decides a pixel, so no cache key counts this module (``REPORTING_ONLY``, read by
``tasks.code_digest``): adding or renaming a phase here, or changing how it is recorded, recomputes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar

REPORTING_ONLY = True  # tasks.code_digest: this module decides no pixel; it is left out of every stage's code digest

# Every phase the core reports, "stage.phase"; ``detail`` says which one of several (pass 1 matches per layer).
PHASES = ("pass1.match", "pass2.match", "pass2.refine")

Timer = Callable[[str, str], AbstractContextManager]
_timer: ContextVar[Timer | None] = ContextVar("harmonize_core_phase_timer", default=None)


def phase(name: str, detail: str = "") -> AbstractContextManager:
    """Return the context manager to run phase ``name`` (one of ``PHASES``) in: the recorder's, else a no-op."""
    timer = _timer.get()
    return contextlib.nullcontext() if timer is None else timer(name, detail)


@contextlib.contextmanager
def recording(timer: Timer) -> Iterator[None]:
    """Within the block, enter ``timer(name, detail)`` around every phase the core runs; yields nothing."""
    token = _timer.set(timer)
    try:
        yield
    finally:
        _timer.reset(token)
