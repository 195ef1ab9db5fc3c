"""Timings of the phases inside a stage, through the core's own hook (``harmonize_core.timing``).

The bench never replaces a core function to time it: the passes mark their phases (``timing.PHASES``) and
``recording_phases`` listens for the run of one stage, synchronising the device around each phase. It fails
loudly when an expected phase is not one the core declares, when the core reports a phase it does not declare,
or when an expected phase never reported, so a renamed or removed phase cannot leave an empty timing behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from harmonize_core.timing import PHASES, recording

from . import synchronize


class PhaseError(RuntimeError):
    """A phase the bench times is not what the core reports (undeclared, or never reported)."""


@dataclass
class PhaseTimes:
    """The phases one run reported, in the order they ran: ``{name: [(detail, seconds), ...]}``."""

    device: torch.device
    times: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str) -> Iterator[None]:
        """Time the phase inside the block (the device synchronised on both sides) into ``times``."""
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.times.setdefault(name, []).append((detail, time.perf_counter() - started))

    def count(self, name: str) -> int:
        """Return how many times phase ``name`` ran."""
        return len(self.times.get(name, []))

    def total(self, name: str) -> float:
        """Return the seconds of every run of phase ``name`` added up."""
        return sum(seconds for _, seconds in self.times.get(name, []))

    def by_detail(self, name: str) -> dict[str, float]:
        """Return ``{detail: seconds}`` of phase ``name`` (pass 1's match: one entry per layer, in run order)."""
        out: dict[str, float] = {}
        for detail, seconds in self.times.get(name, []):
            out[detail] = out.get(detail, 0.0) + seconds
        return out


@contextlib.contextmanager
def recording_phases(device: torch.device, expected: tuple[str, ...]) -> Iterator[PhaseTimes]:
    """Within the block, record every phase the core runs; yield the ``PhaseTimes``.

    Raises ``PhaseError`` before the block when an ``expected`` name is not in ``harmonize_core.timing.PHASES``,
    and after it when one of them never reported or the core reported a name it does not declare.
    """
    unknown = [name for name in expected if name not in PHASES]
    if unknown:
        raise PhaseError(f"the bench times phase(s) {', '.join(unknown)} that harmonize_core.timing.PHASES does not "
                         f"declare ({', '.join(PHASES)}): update the bench's phase names")
    times = PhaseTimes(device)
    with recording(times):
        yield times
    undeclared = sorted(set(times.times) - set(PHASES))
    if undeclared:
        raise PhaseError(f"the core reported phase(s) {', '.join(undeclared)} missing from "
                         "harmonize_core.timing.PHASES: declare them there")
    missing = [name for name in expected if not times.count(name)]
    if missing:
        raise PhaseError(f"phase(s) {', '.join(missing)} never reported during the run: the core no longer marks "
                         "them with harmonize_core.timing.phase, so their timing would be empty")
