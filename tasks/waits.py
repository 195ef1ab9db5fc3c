"""What a stage call waits for, said while it waits and counted after: its stage lock, then the device.

A stage call may wait twice before it computes: for its **stage lock** (``tasks.storage.locks``: another run or worker,
perhaps a killed one whose lease has not lapsed yet, holds the same cache key), then for the **device**
(``tasks.gpu``: another item's network stage is on it). ``flows.item`` opens a ``StageWaits`` scope around each
stage call (``waiting_in``); the lock manager and the device lock find it here (``current``), announce a wait that
lasts longer than ``NOTICE_SECONDS`` on the scope's progress line (and again every ``REMIND_SECONDS``), and add the
seconds waited to it, so the item's progress line and summary row can tell compute time from waiting.

The scope is a context variable holding a mutable object: Prefect runs a nested stage task and its transaction in a
copy of the caller's context, which still refers to the same scope.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

NOTICE_SECONDS = 2.0  # a wait shorter than this is not announced (items on one device take turns all the time)
REMIND_SECONDS = 60.0  # a long wait is announced again this often
logger = logging.getLogger(__name__)


@dataclass
class StageWaits:
    """One stage call of one item: who it is (for other waiters' lines and the lock's record), where its lines go,
    and the seconds it waited for its stage lock and for the device."""

    who: str  # e.g. "item 2/4 b" or "item 2/4 b/tau-5"
    stage: str
    run_id: str = ""
    announce: Callable[[str], None] = field(default=logger.info, repr=False)
    lock_s: float = 0.0
    device_s: float = 0.0
    lock_holder: str = ""  # whom the stage lock wait was behind (as announced)
    device_holder: str = ""  # whom the device wait was behind

    @property
    def doing(self) -> str:
        """Return ``"<who> <stage>"``, how other waiters name this stage call."""
        return f"{self.who} {self.stage}"

    def say(self, message: str) -> None:
        """Announce ``message`` prefixed with ``"<who>: <stage> "``."""
        self.announce(f"{self.who}: {self.stage} {message}")

    def waited(self) -> float:
        """Return the seconds this stage call waited in all (lock and device)."""
        return self.lock_s + self.device_s

    def describe(self) -> str:
        """Return the waits as a clause for the progress line (empty when both were under a second)."""
        parts = []
        if self.lock_s >= 1:
            parts.append(f"{self.lock_s:.0f} s waiting for its stage lock"
                         + (f" held by {self.lock_holder}" if self.lock_holder else ""))
        if self.device_s >= 1:
            parts.append(f"{self.device_s:.0f} s waiting for the device"
                         + (f" behind {self.device_holder}" if self.device_holder else ""))
        return ", after " + " and ".join(parts) if parts else ""


_CURRENT: ContextVar[StageWaits | None] = ContextVar("harmonize_stage_waits", default=None)


def current() -> StageWaits | None:
    """Return the stage call being run in this context, or None outside ``waiting_in``."""
    return _CURRENT.get()


@contextmanager
def waiting_in(scope: StageWaits) -> Iterator[StageWaits]:
    """Make ``scope`` the current stage call for the block; yield it (its waits are filled in as they happen)."""
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)


def announce(message: str) -> None:
    """Say ``message`` on the current stage call's progress line (prefixed with who and the stage), else log it."""
    scope = current()
    if scope is None:
        logger.info(message)
    else:
        scope.say(message)
