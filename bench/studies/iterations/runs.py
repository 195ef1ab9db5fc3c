"""The study's runs: pass 1 and pass 2 with snapshots (``grid``), the jittered reference (``noise``), ``bf16``
and the ``fast`` preset end to end (``check``). Every run resumes: a finished one (its ``run.json``) is skipped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench.reference_cases import authors_taus
from harmonize_core import harmonize, load_item, preset
from harmonize_core.images import quantize
from harmonize_core.network.vgg import load_backbone
from harmonize_core.optimisation.lbfgs import Snapshots
from harmonize_core.passes.pass1 import run_pass1
from harmonize_core.passes.pass2 import run_pass2
from harmonize_core.passes.stages import blend
from tasks.weights_fetch import fetch_weights

from .common import (
    JITTER_LEVELS,
    JITTER_SEED,
    MAX_ITERATIONS,
    STEP,
    Case,
    load_average,
    load_png,
    save_png,
)


def snapshot_writer(folder: Path, backbone, losses: dict[str, dict[str, float]]):
    """Return a ``Snapshots`` keeper that writes the quantised image of each snapshot to ``folder/<n>.png``."""

    def keep(n: int, x: torch.Tensor, values: dict[str, float]) -> None:
        save_png(folder / f"{n}.png", quantize(backbone.preprocessing.deprocess(x).clamp(0, 1).cpu()))
        losses[str(n)] = values

    return keep


def finish(folder: Path, losses: dict, metrics: dict, seconds: float) -> None:
    """Write a run's snapshot losses and metrics (curves, evaluations, early stop) and mark it done."""
    record = {"losses": losses, "seconds": round(seconds, 2), "load": load_average(),
              **{k: metrics[k] for k in ("curves", "evaluations", "seconds_per_evaluation", "stopped_early")}}
    (folder / "run.json").write_text(json.dumps(record))


def run_pass1_grid(case: Case, backbone, config, folder: Path, content: torch.Tensor | None = None) -> None:
    """Pass 1 for ``config.pass1.iterations`` with a snapshot every ``STEP`` evaluations into ``folder`` (from
    ``content`` instead of the case's composite when given)."""
    if (folder / "run.json").exists():
        return
    losses: dict = {}
    at = tuple(range(0, config.pass1.iterations + 1, STEP))
    started = time.perf_counter()
    content = case.inputs.content if content is None else content
    _, metrics = run_pass1(content, case.inputs.style, case.loose, backbone, config,
                           snapshots=Snapshots(at, snapshot_writer(folder, backbone, losses)))
    finish(folder, losses, metrics, time.perf_counter() - started)
    print(f"case {case.index} {folder.name}: {time.perf_counter() - started:.0f} s (load {load_average()})", flush=True)


def run_pass2_grid(case: Case, backbone, config, blended: torch.Tensor, folder: Path,
                   content: torch.Tensor | None = None) -> None:
    """Pass 2 for ``config.pass2.iterations`` from ``blended`` (the pass-1 blend) with snapshots into ``folder``."""
    done = folder / "run.json"
    if done.exists() and json.loads(done.read_text())["evaluations"] >= config.pass2.iterations:
        return
    losses: dict = {}
    at = tuple(range(0, config.pass2.iterations + 1, STEP))
    started = time.perf_counter()
    content = case.inputs.content if content is None else content
    _, metrics = run_pass2(content, case.inputs.style, case.loose, case.inputs.tight, blended, backbone, config,
                           tau=case.tau, mtv=case.mtv(),
                           snapshots=Snapshots(at, snapshot_writer(folder, backbone, losses)))
    finish(folder, losses, metrics, time.perf_counter() - started)
    print(f"case {case.index} {folder.name}: {time.perf_counter() - started:.0f} s (load {load_average()})", flush=True)


def pass1_blend(case: Case, folder: Path, n: int) -> torch.Tensor:
    """Return the blend of the pass-1 snapshot ``n`` (as ``stages.blend`` makes it)."""
    return blend(load_png(folder / f"{n}.png"), case.inputs, case.config).image


def grid(args, backbone) -> None:
    """Pass 1 for every case first, then pass 2 from each pass-1 length in ``--lengths`` (the reference 1000
    first). With ``--wait`` pass 1 is left to another ``grid`` process: each case waits for its pass-1 run."""
    cases = [Case(args.cases_dir, args.out, i, args.size) for i in args.cases]
    if args.wait:  # case by case as their pass 1 appears
        for case in cases:
            while not (case.folder / "p1" / "run.json").exists():
                time.sleep(30)
            for length in args.lengths:
                run_pass2_from(case, backbone, length, args.extend)
        return
    for case in cases:
        run_pass1_grid(case, backbone, case.config.replace(**{"pass1.iterations": MAX_ITERATIONS}),
                       case.folder / "p1")
    for length in args.lengths:
        for case in cases:
            run_pass2_from(case, backbone, length, args.extend)


def run_pass2_from(case: Case, backbone, length: int, extend: int = 0) -> None:
    """Pass 2 for max(``length``, ``extend``) iterations from the blend of the pass-1 snapshot ``length`` (a longer
    run replaces a shorter one: its first snapshots are the same images)."""
    config = case.config.replace(**{"pass2.iterations": max(length, extend)})
    run_pass2_grid(case, backbone, config, pass1_blend(case, case.folder / "p1", length),
                   case.folder / f"p2_from{length}")


def jittered(image: torch.Tensor, seed: int) -> torch.Tensor:
    """Return ``image`` with a seeded uniform -1/0/+1 8-bit level added to every pixel and channel, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(-JITTER_LEVELS, JITTER_LEVELS + 1, image.shape, generator=generator).float() / 255.0
    return quantize(image + noise)


def noise(args, backbone) -> None:
    """The reference pass 2 again with the composite jittered (waits for grid's pass-1 1000 of each case)."""
    pending = list(args.cases)
    while pending:
        index = pending[0]
        case = Case(args.cases_dir, args.out, index, args.size)
        if not (case.folder / "p1" / "run.json").exists():
            time.sleep(60)
            continue
        config = case.config.replace(**{"pass2.iterations": MAX_ITERATIONS})
        run_pass2_grid(case, backbone, config, pass1_blend(case, case.folder / "p1", MAX_ITERATIONS),
                       case.folder / "noise", content=jittered(case.inputs.content, JITTER_SEED + index))
        pending.pop(0)


PRECISION_RUNS = ("fp32", "bf16", "fp32_jitter")  # the control: fp32 again from the jittered composite


def bf16(args, backbone) -> None:
    """Pass 1 + pass 2 of ``--iters`` each in fp32, in bf16 (CPU autocast, ``backbone.precision=bf16``) and in fp32
    from the jittered composite (the noise at the same size and schedule), into ``<case>/precision_<iters>/<run>``."""
    for index in args.bf16_cases:
        case = Case(args.cases_dir, args.out, index, args.size)
        for run in PRECISION_RUNS:
            config = case.config.replace(**{"backbone.precision": "bf16" if run == "bf16" else "fp32",
                                            "pass1.iterations": args.iters, "pass2.iterations": args.iters})
            content = jittered(case.inputs.content, JITTER_SEED + index) if run == "fp32_jitter" else None
            folder = case.folder / f"precision_{args.iters}" / run
            run_pass1_grid(case, backbone, config, folder / "p1", content=content)
            run_pass2_grid(case, backbone, config, pass1_blend(case, folder / "p1", args.iters), folder / "p2",
                           content=content)


def check(args) -> int:
    """Run ``harmonize`` with the ``fast`` preset (at the study size) on ``--cases`` and score it against the grid's
    1000 + 1000; also report the scores of the grid's snapshot at the same schedule and stop step."""
    taus = authors_taus(args.cases_dir)
    fetch_weights("offline-vgg16", "vgg16")  # the default network: fetched once per machine
    backbone = load_backbone("vgg16", "offline-vgg16", device=args.device, ceil_mode=True)
    results = []
    for index in args.cases:
        target = args.out / str(index) / "fast"
        if (target / "fast.json").exists():
            results.append(json.loads((target / "fast.json").read_text()))
            continue
        config = preset("fast").replace(**{"sizing.size": args.size, "pass2.tau": taus[index][1],
                                           "backbone.name": "vgg16", "backbone.weights": "offline-vgg16"})
        started = time.perf_counter()
        content, style, mask = load_item(*(args.cases_dir / f"{index}_{n}.jpg" for n in ("naive", "target", "c_mask")))
        outputs = harmonize(content, style, mask, config, backbone=backbone)
        save_png(target / "reconstruct.png", outputs["reconstruct"].image)
        record = {"case": index, "seconds": round(time.perf_counter() - started, 1), "load": load_average(),
                  "quality": outputs["reconstruct"].metrics["quality"],
                  **{stage: {k: outputs[stage].metrics.get(k) for k in ("evaluations", "stopped_early", "stopped_at")}
                     for stage in ("pass1", "pass2")}}
        (target / "fast.json").write_text(json.dumps(record))
        results.append(record)
        print(json.dumps(record), flush=True)
    (args.out / "fast_check.json").write_text(json.dumps(results, indent=1))
    return 0
