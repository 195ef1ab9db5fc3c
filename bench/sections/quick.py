"""The ``quick`` section: one item end to end under the ``quick`` preset as it ships, every stage measured."""

from __future__ import annotations

from harmonize_core.config import preset
from harmonize_core.errors import WeightsUnavailableError
from harmonize_core.network.vgg import load_backbone
from harmonize_core.passes import stages
from tasks.weights_fetch import fetch_weights

from .. import MIB, PeakMemory, timed
from ..common import STAGE_WEIGHTS, Options, Row, load_bench_item


def run_quick_preset(options: Options) -> list[Row]:
    """Return rows of one item end to end under the ``quick`` preset as it ships (CPU demos: 256 px, 60 + 60
    iterations, VGG16 offline weights): every stage measured, nothing extrapolated."""
    config = preset("quick")
    try:
        fetch_weights(config.backbone.weights, config.backbone.name)  # the default network: fetched once per machine
        backbone = load_backbone(config.backbone.name, config.backbone.weights, device=options.device)
    except WeightsUnavailableError:
        config = config.replace(**{"backbone.weights": STAGE_WEIGHTS})
        backbone = load_backbone(config.backbone.name, STAGE_WEIGHTS, device=options.device)
    item = load_bench_item(options.case, config.sizing.size)
    size, rows = config.sizing.size, []
    with PeakMemory(options.device) as memory:
        total_s, outputs = timed(lambda: stages.harmonize(item.content, item.style, item.mask, config,
                                                          backbone=backbone), options.device)
    note = (f"{config.backbone.name} {config.backbone.weights}, {config.pass1.iterations} + "
            f"{config.pass2.iterations} iterations, {item.source}")
    for stage, output in outputs.items():
        rows.append(Row("quick", size, "quick_preset", f"{stage}_seconds", round(output.metrics["seconds"], 3), "s",
                        note=note if not rows else ""))
    rows += [Row("quick", size, "quick_preset", "seconds", round(total_s, 3), "s", note="end to end, measured"),
             Row("quick", size, "quick_preset", "peak_mb", round(memory.peak_bytes / MIB, 1), "MB")]
    print("  quick preset: " + ", ".join(f"{r.metric} {r.value}" for r in rows), flush=True)
    return rows
