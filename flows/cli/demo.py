"""``harmonize demo``: make the procedural demo dataset (``harmonize_core.demo_data``) and run the flow on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import RUN_OVERRIDES, preflight, run_overrides
from .run import run_flow

DEMO_OUT = "demo-out"
DEMO_PRESET, DEMO_BACKBONE, DEMO_WEIGHTS = "quick", "vgg16", "offline-vgg16"  # the demo's small settings, explicitly


def cmd_demo(args: argparse.Namespace) -> int:
    """``harmonize demo``: make the procedural demo dataset in ``--out`` and run the flow on it; return the exit code.

    The demo manifest carries ``DEMO_OVERRIDES`` (size, iterations) in its cells; ``--size``/``--pass1-iters``/
    ``--pass2-iters``/``--tau`` given here are written into those cells instead of applying run-wide.
    """
    from manifests.demo import DEMO_OVERRIDES, write_demo
    from tasks import storage
    from tasks.weights_fetch import fetch_weights

    from ..report.build import latest_run, page_uri
    from ..summary import SUMMARY_NAME

    cells = {**DEMO_OVERRIDES, **{k: str(v) for k, v in run_overrides(args).items()}}
    for name in RUN_OVERRIDES:
        setattr(args, name, None)
    out = Path(args.out).resolve()
    manifest = write_demo(out / "inputs", overrides=cells)
    settings = ", ".join(f"{k} {v}" for k, v in cells.items())
    print(f"demo inputs: {manifest} (3 procedural paintings, each with a pasted object and its mask)\n"
          f"demo settings: preset {args.preset}, {settings}, backbone {args.backbone}, weights {args.weights}")
    preflight(str(manifest), args)
    fetch_weights(str(args.weights), str(args.backbone))  # the default network: once per machine, before the run
    code = run_flow(str(manifest), str(out / "results"), args)
    run_id = latest_run(str(out / "results"))
    if run_id:
        report = page_uri(storage.parent(storage.run_uri(str(out / "results"), run_id, SUMMARY_NAME)), 1)
        print(f"\nopen the report in a browser: {report}\n(each item's painting, composite, pass 1, final image, "
              f"loss curves and scores; the images themselves are in {out / 'results'}/<id>/)")
    return code
