"""What a stage reports besides its image: progress events while a pass runs, and the metrics record of every stage.

Nothing here decides a pixel, so no cache key counts this module (``REPORTING_ONLY``, read by
``tasks.code_digest``): rewording a progress line or adding a metric never recomputes a stage.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import HarmonizeConfig, stage_section
from ..version import __version__

REPORTING_ONLY = True  # tasks.code_digest: this module decides no pixel; it is left out of every stage's code digest

PROGRESS_ORDER = ("content", "style", "hist", "tv")  # term groups in the order progress lines print them


@dataclass(frozen=True)
class Iterate:
    """A progress event from a long stage: ``step`` of ``total`` iterations, current loss terms, seconds so far.

    ``relative``: each term (and "total") divided by its first logged value, so 1.0 at the start and falling as the
    term is optimised; a term that starts at 0 (pass 2's content) is divided by the starting total instead. (Pass
    2's raw total is dominated by TV, whose gradient is normalised anyway: the per-term figures show progress.)
    ``image_change`` / ``image_change_max``: mean / largest absolute change of the image, in 8-bit levels over the
    loose-mask pixels, since the previous event (0 at the first).
    """

    stage: str
    step: int
    total: int
    losses: dict[str, float]
    elapsed: float
    relative: dict[str, float] = field(default_factory=dict)
    image_change: float = 0.0
    image_change_max: float = 0.0

    def relative_groups(self) -> dict[str, float]:
        """Return the relative value per term group (style_relu3_1 + style_relu4_1 -> style: the group's sum over
        the sum of its references), "total" left out, content / style / hist / tv first."""
        values: dict[str, float] = {}
        references: dict[str, float] = {}
        for name, value in self.losses.items():
            if name == "total" or name not in self.relative:
                continue
            group = re.sub(r"_relu\d+_\d+$", "", name)
            values[group] = values.get(group, 0.0) + value
            ratio = self.relative[name]
            references[group] = references.get(group, 0.0) + (value / ratio if ratio else 0.0)
        order = sorted(values, key=lambda g: (PROGRESS_ORDER.index(g) if g in PROGRESS_ORDER else len(PROGRESS_ORDER), g))
        return {g: values[g] / references[g] if references[g] else 1.0 for g in order}

    def summary(self) -> str:
        """Return one line: ``pass2  120/1000  content 0.82  style 0.31  hist 0.55  tv 1.10 (x start)  image moved
        0.8 levels (max 12)  (12.3 s)``."""
        groups = "  ".join(f"{name} {value:.3g}" for name, value in self.relative_groups().items())
        terms = f"  {groups} (x start)" if groups else ""
        return (f"{self.stage}  {self.step:>4}/{self.total}{terms}  image moved {self.image_change:.2g} levels "
                f"(max {self.image_change_max:.3g})  ({self.elapsed:.1f} s)")


ProgressFn = Callable[[Iterate], None]


def stage_record(stage: str, seconds: float, config: HarmonizeConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Return a stage's JSON-able metrics record: stage, seconds, core version, the config section that keys it
    (``config.stage_section``) and the stage's own ``metrics``."""
    return {"stage": stage, "seconds": round(seconds, 4), "core_version": __version__,
            "config": stage_section(config, stage), **metrics}
