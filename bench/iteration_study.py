"""The same result for fewer evaluations: quality scores and losses against L-BFGS iterations (issue 10, point 3).

Usage (one torch thread each, ``--device cuda`` on a GPU; every command resumes where it stopped). The study in
docs/quality.md ("Iteration study") ran exactly these, at the default size of 128 px::

    python bench/iteration_study.py grid  OUT                        # pass 1 x 1000, then pass 2 from each length
    python bench/iteration_study.py grid  OUT --wait --lengths 200,100 --extend 400   # pass 2 longer than pass 1
    python bench/iteration_study.py noise OUT                        # jittered reference (after grid's pass 1)
    python bench/iteration_study.py check OUT                        # the fast preset end to end
    python bench/iteration_study.py score OUT                        # CSVs, markdown tables, plot PNG
    python bench/iteration_study.py bf16  OUT_BF16 --bf16-cases 0,8,5 --iters 100 && \
        python bench/iteration_study.py bf16-score OUT_BF16

Cases default to 0,16,8,24,5,23 (``--cases``); grid, noise and check can run in parallel processes on disjoint
``--cases`` (``--wait`` leaves pass 1 to another grid process).

``grid``: per case (the authors' composite, painting and tight mask from ``--cases-dir``, their tau from
``wikiart_output.txt``; ``quick`` preset = offline VGG16, the paper's loss settings, at ``--size``), one pass 1 of
``MAX_ITERATIONS`` with a snapshot of the image every ``STEP`` evaluations (L-BFGS's first n iterations of a long run
are an n-iteration run, so one run gives every pass-1 length), then pass 2 from the blend of the pass-1 snapshot
a, for a in ``LENGTHS``, run for a iterations with snapshots every ``STEP``: the schedule (a, b) for every b <= a,
in particular the diagonal (n, n) and the row (1000, b). Pass 2 depends on pass 1 only through its mapping (it starts
from the composite), so each pass-1 length needs its own pass-2 run.

``noise``: the reference (1000, 1000) run's pass 2 again from the same pass-1 blend, with the composite (pass 2's
init and content target) jittered by a seeded uniform -1/0/+1 8-bit level per pixel and channel: the spread of the
score under a perturbation no one can see (and that any re-encoding of the input makes) is the noise below which two
schedules cannot be told apart. ``score`` pools it with the other source of spread, the reference reconstructed with
two other seeds (PatchMatch's random init): the noise band is ``NOISE_FACTOR`` x the RMS of those differences.

``bf16``: pass 1 + pass 2 of ``--iters`` each in fp32, in bf16 (``backbone.precision=bf16``, CPU autocast) and in
fp32 from the jittered composite (the noise at that size and schedule); ``bf16-score`` prints the comparison.

``score`` blends and reconstructs every pass-2 snapshot as ``stages.pass2`` / ``stages.reconstruct`` do, scores it
with ``harmonize_core.quality.quality_scores`` against the (unjittered) composite, painting and tight mask, and writes
``OUT/study_scores.csv`` (case, schedule, scores, final pass-1 and pass-2 losses), ``OUT/study_tables.md`` and
``OUT/study_curves.png``; with early stopping replayed on the snapshots' image changes. ``check`` runs ``harmonize``
with the ``fast`` preset (at the study size, offline VGG16) and ``score`` tables its scores against 1000 + 1000.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.reference_cases import CASES_DIR, authors_taus  # noqa: E402
from harmonize_core.images import decode_png_exact, encode_png, quantize, read_bytes  # noqa: E402

# Two cases per tau level of the authors (about 1, 5, 10), masks from 2.4% to 23.5% of the image.
DEFAULT_CASES = (0, 16, 8, 24, 5, 23)
DEFAULT_BF16_CASES = (0, 8)
DEFAULT_SIZE = 128  # px: what 2 x 1000 iterations on six cases allow on the shared 2-core CPU (700 px: about 30x the cost)
MAX_ITERATIONS = 1000  # the authors' schedule: 1000 + 1000 (neural_gram.lua L182-186, gen_all.py L37)
LENGTHS = (1000, 400, 200, 100, 50)  # pass-1 lengths each given a pass-2 run (longest first: the reference)
STEP = 50  # snapshot spacing in evaluations (= the early-stop check interval)
JITTER_SEED = 1234
JITTER_LEVELS = 1  # +-1 8-bit level
RECONSTRUCT_SEEDS = (316, 317, 318)  # 316 = config.seed (neural_gram.lua L45), the pipeline's
SCORES = ("style", "structure", "seam")
# The match rule (fixed before the table was seen): a schedule gives "the same result" as 1000 + 1000 when, for each
# score, at most one case lies outside the noise band and none beyond twice the band. The band is NOISE_FACTOR x
# the RMS of the jittered reference's differences (about a 95% interval of a difference if it were normal).
NOISE_FACTOR = 2.0
MAX_OUTSIDE_PER_SCORE = 1
WORST_FACTOR = 2.0


def study_config(size: int, tau: float, **overrides):
    """Return the study's config: ``quick`` (offline VGG16, paper loss settings) at ``size``, the case's tau."""
    from harmonize_core import preset

    return preset("quick").replace(**{"sizing.size": size, "pass2.tau": tau, "pass1.log_every": STEP,
                                      "pass2.log_every": STEP, **overrides})


def save_png(path: Path, image: torch.Tensor) -> None:
    """Write ``image`` (1, C, H, W) in [0, 1] as an 8-bit PNG (exact for the pipeline's quantised stage images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))


def load_png(path: Path) -> torch.Tensor:
    """Return a PNG written by ``save_png`` as (1, C, H, W) float in [0, 1]."""
    return decode_png_exact(read_bytes(path), path.name)


class Case:
    """One reference case at the study size: its inputs, loose mask and folder (written on first use)."""

    def __init__(self, cases_dir: Path, out: Path, index: int, size: int) -> None:
        from harmonize_core import load_item
        from harmonize_core.stages import dilate, prepare_inputs

        self.index, self.size, self.folder = index, size, out / str(index)
        self.genre, self.tau = authors_taus(cases_dir)[index]
        self.config = study_config(size, self.tau)
        content, style, mask = load_item(*(cases_dir / f"{index}_{n}.jpg" for n in ("naive", "target", "c_mask")))
        self.inputs = prepare_inputs(content, style, mask, self.config)
        self.loose = dilate(self.inputs, self.config).image
        for name, image in (("content", self.inputs.content), ("style", self.inputs.style),
                            ("tight", self.inputs.tight), ("loose", self.loose)):
            if not (self.folder / f"{name}.png").exists():
                save_png(self.folder / f"{name}.png", image)

    def mtv(self) -> float:
        """Return the painting's noise estimate at 700 px (as ``stages.pass2`` passes it)."""
        from harmonize_core.losses import noise_estimate

        return noise_estimate(self.inputs.paper_size_painting())


def snapshot_writer(folder: Path, backbone, losses: dict[str, dict[str, float]]):
    """Return a ``Snapshots`` keeper that writes the quantised image of each snapshot to ``folder/<n>.png``."""

    def keep(n: int, x: torch.Tensor, values: dict[str, float]) -> None:
        save_png(folder / f"{n}.png", quantize(backbone.preprocessing.deprocess(x).clamp(0, 1).cpu()))
        losses[str(n)] = values

    return keep


def finish(folder: Path, losses: dict, metrics: dict, seconds: float) -> None:
    """Write a run's snapshot losses and metrics (curves, evaluations, early stop) and mark it done."""
    record = {"losses": losses, "seconds": round(seconds, 2), "load": _load(),
              **{k: metrics[k] for k in ("curves", "evaluations", "seconds_per_evaluation", "stopped_early")}}
    (folder / "run.json").write_text(json.dumps(record))


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else ""


def run_pass1_grid(case: Case, backbone, config, folder: Path, content: torch.Tensor | None = None) -> None:
    """Pass 1 for ``config.pass1.iterations`` with a snapshot every ``STEP`` evaluations into ``folder`` (from
    ``content`` instead of the case's composite when given)."""
    from harmonize_core.objective import Snapshots
    from harmonize_core.pass1 import run_pass1

    if (folder / "run.json").exists():
        return
    losses: dict = {}
    at = tuple(range(0, config.pass1.iterations + 1, STEP))
    started = time.perf_counter()
    content = case.inputs.content if content is None else content
    _, metrics = run_pass1(content, case.inputs.style, case.loose, backbone, config,
                           snapshots=Snapshots(at, snapshot_writer(folder, backbone, losses)))
    finish(folder, losses, metrics, time.perf_counter() - started)
    print(f"case {case.index} {folder.name}: {time.perf_counter() - started:.0f} s (load {_load()})", flush=True)


def run_pass2_grid(case: Case, backbone, config, blended: torch.Tensor, folder: Path,
                   content: torch.Tensor | None = None) -> None:
    """Pass 2 for ``config.pass2.iterations`` from ``blended`` (the pass-1 blend) with snapshots into ``folder``."""
    from harmonize_core.objective import Snapshots
    from harmonize_core.pass2 import run_pass2

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
    print(f"case {case.index} {folder.name}: {time.perf_counter() - started:.0f} s (load {_load()})", flush=True)


def pass1_blend(case: Case, folder: Path, n: int) -> torch.Tensor:
    """Return the blend of the pass-1 snapshot ``n`` (as ``stages.blend`` makes it)."""
    from harmonize_core.stages import blend

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


def score_precision(args) -> int:
    """Score the ``bf16`` runs: per case, bf16's and the jittered fp32's differences from fp32 (final images)."""
    taus = authors_taus(args.cases_dir)
    rows = []
    for folder in sorted(args.out.glob("*/precision_*")):
        case, n = int(folder.parent.name), int(folder.name.split("_")[1])
        inputs, _ = load_inputs(folder.parent)
        config = study_config(max(inputs.content.shape[-2:]), taus[case][1])
        scores = {}
        for run in PRECISION_RUNS:
            if (folder / run / "p2" / "run.json").exists():
                _, scores[run] = final_image(load_png(folder / run / "p2" / f"{n}.png"), inputs, config)
        if "fp32" not in scores:
            continue
        for run, values in scores.items():
            record = json.loads((folder / run / "p2" / "run.json").read_text())
            rows.append({"case": case, "iterations": n, "run": run, **values,
                         **{f"diff_{k}": round(relative_difference(k, values[k], scores["fp32"][k]), 4) for k in SCORES},
                         "seconds_per_evaluation_p2": record["seconds_per_evaluation"], "load": record["load"]})
    if rows:
        write_csv(rows, args.out / "precision_scores.csv")
        print("| case | run | style | structure | seam | diff style (ln) | diff structure | diff seam (ln) | s/eval pass 2 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['run']} | {r['style']:.3f} | {r['structure']:.3f} | {r['seam']:.3f} | "
                  f"{r['diff_style']:+.4f} | {r['diff_structure']:+.4f} | {r['diff_seam']:+.4f} | "
                  f"{r['seconds_per_evaluation_p2']:.3f} |")
    return 0


def case_folders(out: Path) -> list[Path]:
    """Return the case folders of a study with a finished pass-1 run, in case order."""
    return sorted((p for p in out.iterdir() if (p / "p1" / "run.json").exists()), key=lambda p: int(p.name))


def load_inputs(folder: Path):
    """Return (ItemInputs at the study size, loose mask) of a case folder written by ``Case``."""
    from harmonize_core.stages import ItemInputs

    images = {n: load_png(folder / f"{n}.png") for n in ("content", "style", "tight", "loose")}
    tight, loose = ((images[n][:, :1] > 0.5).float() for n in ("tight", "loose"))
    return ItemInputs(content=images["content"], style=images["style"], tight=tight), loose


def final_image(pass2_image: torch.Tensor, inputs, config) -> tuple[torch.Tensor, dict[str, float]]:
    """Return (the final image, its quality scores): ``stages.pass2``'s blend, then ``stages.reconstruct``."""
    from harmonize_core.stages import blend, reconstruct

    blended = blend(pass2_image, inputs, config, stage="pass2").image
    out = reconstruct(blended, inputs, config)
    return out.image, out.metrics["quality"]


def loss_groups(losses: dict[str, float], prefix: str) -> dict[str, float]:
    """Return the losses summed per group (content, style, hist, tv, total) as ``<prefix>_<group>``."""
    groups: dict[str, float] = {}
    for name, value in losses.items():
        group = re.sub(r"_relu\d+_\d+$", "", name)
        groups[f"{prefix}_{group}"] = groups.get(f"{prefix}_{group}", 0.0) + value
    return {k: float(f"{v:.6g}") for k, v in groups.items()}


def score_run(folder: Path, run: str, a: int, steps: list[int] | None, inputs, config, p1: dict) -> list[dict]:
    """Return one row per pass-2 snapshot of the run in ``folder`` (pass-1 length ``a``): scores and losses."""
    record = json.loads((folder / "run.json").read_text())
    changes = dict((int(s), v) for s, v in record["curves"]["image_change"])
    rows = []
    for key in record["losses"] if steps is None else [str(b) for b in steps]:
        b = int(key)
        if b == 0:
            continue
        _, quality = final_image(load_png(folder / f"{b}.png"), inputs, config)
        rows.append({"run": run, "pass1": a, "pass2": b, **quality, "p2_change": changes.get(b, ""),
                     **loss_groups(record["losses"][key], "p2"), **loss_groups(p1["losses"][str(a)], "p1"),
                     "p1_change": dict((int(s), v) for s, v in p1["curves"]["image_change"]).get(a, "")})
    return rows


def pass1_rows(folder: Path, inputs, config, p1: dict) -> list[dict]:
    """Return one row per pass-1 snapshot: the quality of its blend (as pass 1's output) and its losses."""
    from harmonize_core.quality import quality_scores
    from harmonize_core.stages import blend

    changes = dict((int(s), v) for s, v in p1["curves"]["image_change"])
    rows = []
    for key, losses in p1["losses"].items():
        if key == "0":
            continue
        blended = blend(load_png(folder / "p1" / f"{key}.png"), inputs, config).image
        quality = quality_scores(blended, inputs.content, inputs.style, inputs.tight)
        rows.append({"run": "p1blend", "pass1": int(key), "pass2": 0,
                     **{k: round(float(v), 4) for k, v in quality.items()}, "p2_change": "",
                     **loss_groups(losses, "p1"), "p1_change": changes.get(int(key), "")})
    return rows


def score_case(folder: Path, size: int, taus: dict[int, tuple[str, float]]) -> list[dict]:
    """Return every scored row of one case: the grid, the jittered reference, reconstruct seeds, bf16."""
    index = int(folder.name)
    genre, tau = taus[index]
    inputs, _ = load_inputs(folder)
    config = study_config(size, tau)
    p1 = json.loads((folder / "p1" / "run.json").read_text())
    rows = pass1_rows(folder, inputs, config, p1)
    for length in LENGTHS:
        if (folder / f"p2_from{length}" / "run.json").exists():
            rows += score_run(folder / f"p2_from{length}", "grid", length, None, inputs, config, p1)
    if (folder / "noise" / "run.json").exists():
        rows += score_run(folder / "noise", "jitter", MAX_ITERATIONS, None, inputs, config, p1)
    if (folder / f"p2_from{MAX_ITERATIONS}" / "run.json").exists():
        for seed in RECONSTRUCT_SEEDS[1:]:
            rows += score_run(folder / f"p2_from{MAX_ITERATIONS}", f"seed{seed}", MAX_ITERATIONS, [MAX_ITERATIONS],
                              inputs, config.replace(seed=seed), p1)
    return [{"case": index, "genre": genre, "tau": tau, **row} for row in rows]


def relative_difference(name: str, value: float, reference: float) -> float:
    """Return how far a score is from the reference: ln(value / reference) for the ratio scores (style, seam: a
    0.1 means 10% apart whatever the case's level), value - reference for ``structure`` (a correlation)."""
    if name == "structure":
        return value - reference
    return math.log(max(value, 1e-6) / max(reference, 1e-6))


def by_schedule(rows: list[dict], run: str = "grid") -> dict[tuple[int, int], dict[int, dict]]:
    """Return {(pass1, pass2): {case: row}} of one run kind."""
    table: dict[tuple[int, int], dict[int, dict]] = {}
    for row in rows:
        if row["run"] == run:
            table.setdefault((int(row["pass1"]), int(row["pass2"])), {})[int(row["case"])] = row
    return table


def noise_band(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Return per score the noise of the reference (1000 + 1000): ``band`` = NOISE_FACTOR x ``rms``, the RMS over
    cases of every perturbed run's difference from it (the jittered composite and the other reconstruct seeds,
    pooled), with each part's RMS (``jitter_rms``, ``seed_rms``), the largest |difference| and the sample count."""
    reference = by_schedule(rows)[(MAX_ITERATIONS, MAX_ITERATIONS)]
    out = {}
    for name in SCORES:
        parts = {}
        for run in ("jitter", *(f"seed{s}" for s in RECONSTRUCT_SEEDS[1:])):
            other = by_schedule(rows, run).get((MAX_ITERATIONS, MAX_ITERATIONS), {})
            parts[run] = [relative_difference(name, float(other[c][name]), float(reference[c][name]))
                          for c in other if c in reference]
        seeds = [d for run, ds in parts.items() if run != "jitter" for d in ds]
        pooled = parts["jitter"] + seeds
        rms = _rms(pooled)
        out[name] = {"rms": rms, "band": NOISE_FACTOR * rms, "max": max(map(abs, pooled), default=0.0),
                     "jitter_rms": _rms(parts["jitter"]), "seed_rms": _rms(seeds), "cases": len(parts["jitter"]),
                     "samples": len(pooled)}
    return out


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def compare(rows: list[dict], band: dict[str, dict[str, float]], run: str = "grid") -> list[dict]:
    """Return per schedule of ``run``: how many (case, score) pairs lie outside the noise band of the reference,
    the worst |difference| / band per score, and whether the schedule matches (MATCH_RULE)."""
    reference = by_schedule(rows)[(MAX_ITERATIONS, MAX_ITERATIONS)]
    table = []
    for (a, b), cases in sorted(by_schedule(rows, run).items()):
        if set(cases) != set(reference):
            continue
        entry: dict = {"pass1": a, "pass2": b, "run": run}
        ok = True
        for name in SCORES:
            ratios = [abs(relative_difference(name, float(cases[c][name]), float(reference[c][name])))
                      / max(band[name]["band"], 1e-9) for c in reference]
            outside = sum(r > 1 for r in ratios)
            entry[f"{name}_outside"], entry[f"{name}_worst"] = outside, round(max(ratios), 2)
            ok = ok and outside <= MAX_OUTSIDE_PER_SCORE and max(ratios) <= WORST_FACTOR
        entry["matches"] = ok
        table.append(entry)
    return table


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PANEL = (420, 260)  # px per panel
MARGIN = (56, 34, 16, 40)  # left, top, right, bottom inside a panel


def _x_position(iterations: float, left: int, width: int) -> float:
    """Return the x pixel of an iteration count on the log axis from STEP to MAX_ITERATIONS."""
    span = math.log(MAX_ITERATIONS / STEP)
    return left + width * math.log(max(iterations, STEP) / STEP) / span


def draw_panel(draw, origin: tuple[int, int], title: str, series: list[tuple[str, list[tuple[float, float]], bool]],
               y_range: tuple[float, float], band: float | None) -> None:
    """Draw one panel: ``series`` of (colour, [(iterations, y)], dashed), a grey noise band around 0 when given."""
    x0, y0 = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    width, height = PANEL[0] - MARGIN[0] - MARGIN[2], PANEL[1] - MARGIN[1] - MARGIN[3]
    low, high = y_range

    def ypos(value: float) -> float:
        return y0 + height * (high - min(max(value, low), high)) / (high - low)

    if band is not None:
        draw.rectangle([x0, ypos(band), x0 + width, ypos(-band)], fill="#e4e4e4")
        draw.line([x0, ypos(0), x0 + width, ypos(0)], fill="#888888")
    draw.rectangle([x0, y0, x0 + width, y0 + height], outline="#000000")
    draw.text((origin[0] + 8, origin[1] + 8), title, fill="#000000")
    for tick in (50, 100, 200, 400, 1000):
        x = _x_position(tick, x0, width)
        draw.line([x, y0 + height, x, y0 + height + 4], fill="#000000")
        draw.text((x - 10, y0 + height + 8), str(tick), fill="#000000")
    for value in (low, (low + high) / 2, high):
        draw.text((origin[0] + 4, ypos(value) - 6), f"{value:.2g}", fill="#000000")
    for colour, points, dashed in series:
        xy = [(_x_position(x, x0, width), ypos(y)) for x, y in points]
        if dashed:
            for point in xy:
                draw.ellipse([point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3], outline=colour)
        if len(xy) > 1:
            for start, end in zip(xy, xy[1:], strict=False):
                draw.line([start, end], fill=colour, width=1 if dashed else 2)


def plot(rows: list[dict], band: dict[str, dict[str, float]], path: Path) -> None:
    """Write the study's curves as a PNG: per score, each case's difference from its 1000 + 1000 result against
    pass-2 iterations (solid: pass 1 = 1000; circles: the diagonal n + n), the noise band in grey; last panel the
    pass-2 style loss (its Gram terms) relative to its value at 1000."""
    from PIL import Image, ImageDraw

    grid_rows = by_schedule(rows)
    reference = grid_rows[(MAX_ITERATIONS, MAX_ITERATIONS)]
    cases = sorted(reference)
    image = Image.new("RGB", (PANEL[0] * 2, PANEL[1] * 2 + 24), "white")  # 4 panels and a legend line
    draw = ImageDraw.Draw(image)
    titles = {"style": "style: ln(score / score at 1000+1000)", "structure": "structure: score - score at 1000+1000",
              "seam": "seam: ln(score / score at 1000+1000)"}
    for k, name in enumerate(SCORES):
        series = []
        for j, case in enumerate(cases):
            colour = PALETTE[j % len(PALETTE)]
            def diff(row, case=case, name=name):
                return relative_difference(name, float(row[name]), float(reference[case][name]))
            row_points = sorted((b, diff(r[case])) for (a, b), r in grid_rows.items() if a == MAX_ITERATIONS and case in r)
            diagonal = sorted((a, diff(r[case])) for (a, b), r in grid_rows.items() if a == b and case in r)
            series += [(colour, row_points, False), (colour, diagonal, True)]
        limit = max(0.05, 3 * band[name]["band"])
        draw_panel(draw, ((k % 2) * PANEL[0], (k // 2) * PANEL[1]), titles[name], series, (-limit, limit),
                   band[name]["band"])
    series = []
    for j, case in enumerate(cases):
        colour = PALETTE[j % len(PALETTE)]
        row = sorted((b, r[case]["p2_style"] / reference[case]["p2_style"]) for (a, b), r in grid_rows.items()
                     if a == MAX_ITERATIONS and case in r)
        series.append((colour, [(x, math.log10(y)) for x, y in row], False))
    # The style terms, not the total: pass 2's total is mostly TV, whose gradient is normalised and which barely moves.
    draw_panel(draw, (PANEL[0], PANEL[1]), "pass-2 style loss: log10(loss / loss at 1000)", series, (0.0, 1.2), None)
    x = 8
    for j, case in enumerate(cases):
        draw.text((x, PANEL[1] * 2 + 6), f"case {case}", fill=PALETTE[j % len(PALETTE)])
        x += 62
    draw.text((x + 10, PANEL[1] * 2 + 6), "x: pass-2 iterations (log); lines: pass 1 = 1000; circles: n + n; "
              "grey: noise band", fill="#000000")
    image.save(path, optimize=True)


STOP_LEVELS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)  # candidate thresholds (mean 8-bit levels per STEP evaluations)
STOP_PATIENCE = (1, 2, 3)
FAST_CAP, FAST_RULE = (1000, 600), (1.0, 2)  # the fast preset: iterations per pass, (stop_levels, stop_patience)


def stop_step(changes: dict[int, float], levels: float, patience: int, iterations: int) -> int | None:
    """Return where ``objective.EarlyStopper`` would stop a run whose image changes per check are ``changes``
    ({evaluation: levels since the previous check}), or None when it runs all ``iterations``."""
    quiet = 0
    for step in sorted(changes):
        if step == 0 or step >= iterations or step % STEP:
            continue
        quiet = quiet + 1 if changes[step] < levels else 0
        if quiet >= patience:
            return step
    return None


def early_stop_table(rows: list[dict], band: dict, schedule: tuple[int, int]) -> list[dict]:
    """Return per (threshold, patience): where pass 2 of ``schedule`` stops on each case, the evaluations saved and
    whether the stopped results still match the reference (the same rule as ``compare``)."""
    a, b = schedule
    grid = by_schedule(rows)
    reference = grid[(MAX_ITERATIONS, MAX_ITERATIONS)]
    table = []
    for levels in STOP_LEVELS:
        for patience in STOP_PATIENCE:
            stops, results = {}, {}
            for case in reference:
                changes = {pb: float(r[case]["p2_change"]) for (pa, pb), r in grid.items()
                           if pa == a and case in r and r[case]["p2_change"] != ""}
                stops[case] = stop_step(changes, levels, patience, b)
                results[case] = grid[(a, stops[case] or b)][case]
            verdict = compare([{**r, "run": "stopped", "pass2": b} for r in results.values()] +
                              [r for r in rows if r["run"] == "grid"], band, run="stopped")
            table.append({"levels": levels, "patience": patience, "stops": stops,
                          "saved": sum(b - (s or b) for s in stops.values()) / len(stops),
                          "matches": bool(verdict and verdict[0]["matches"]), "verdict": verdict[0] if verdict else {}})
    return table


def pass1_stops(rows: list[dict], levels: float, patience: int, iterations: int) -> dict[int, int | None]:
    """Return per case where pass 1's early stop (same rule) would end a pass 1 of ``iterations``."""
    changes: dict[int, dict[int, float]] = {}
    for row in rows:
        if row["run"] == "grid" and row["p1_change"] != "":
            changes.setdefault(int(row["case"]), {})[int(row["pass1"])] = float(row["p1_change"])
    for row in rows:
        if row["run"] == "p1blend" and row["p1_change"] != "":
            changes.setdefault(int(row["case"]), {})[int(row["pass1"])] = float(row["p1_change"])
    return {case: stop_step(c, levels, patience, iterations) for case, c in sorted(changes.items())}


def scored_rows(args) -> list[dict]:
    """Return every case's scored rows, cached per case in ``scores.json`` (rescored when a run is newer)."""
    taus = authors_taus(args.cases_dir)
    rows = []
    for folder in case_folders(args.out):
        cache = folder / "scores.json"
        runs = list(folder.glob("**/run.json"))
        if not cache.exists() or any(r.stat().st_mtime > cache.stat().st_mtime for r in runs):
            size = max(load_png(folder / "content.png").shape[-2:])
            started = time.perf_counter()
            cache.write_text(json.dumps(score_case(folder, size, taus)))
            print(f"scored case {folder.name} in {time.perf_counter() - started:.0f} s", flush=True)
        rows += json.loads(cache.read_text())
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Write dict rows (the union of their keys as columns) to ``path``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def seconds_per_evaluation(out: Path) -> tuple[float, float]:
    """Return the median seconds per evaluation of pass 1 and pass 2 over the grid's runs (this machine, 1 thread)."""
    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2] if values else float("nan")

    p1 = [json.loads(f.read_text())["seconds_per_evaluation"] for f in out.glob("*/p1/run.json")]
    p2 = [json.loads(f.read_text())["seconds_per_evaluation"] for f in out.glob(f"*/p2_from{MAX_ITERATIONS}/run.json")]
    return median(p1), median(p2)


def score(args) -> int:
    """Score every snapshot, then write the CSV, the markdown tables and the plot."""
    rows = scored_rows(args)
    write_csv(rows, args.out / "study_scores.csv")
    if not any(r["run"] == "jitter" for r in rows):
        print("no jittered reference yet: scores written, no noise band")
        return 0
    band = noise_band(rows)
    table = compare(rows, band)
    write_csv(table, args.out / "study_schedules.csv")
    costs = seconds_per_evaluation(args.out)
    text = markdown(rows, band, table, costs)
    text += "\n" + "\n".join(fast_markdown(args.out, rows, band)) + "\n"
    text += "\n" + "\n".join(replay_markdown(rows, band)) + "\n"
    (args.out / "study_tables.md").write_text(text)
    plot(rows, band, args.out / "study_curves.png")
    print(text)
    return 0


def cheapest_match(table: list[dict]) -> dict | None:
    """Return the schedule with the fewest evaluations (pass 1 + pass 2: their relative cost depends on the size and
    the device; fewer pass-2 iterations first on a tie) that matches, and so does every longer pass 2 after the
    same pass 1 (a schedule that matches by luck between two that do not is not chosen)."""
    def stable(entry: dict) -> bool:
        return all(e["matches"] for e in table if e["pass1"] == entry["pass1"] and e["pass2"] >= entry["pass2"])

    matches = [e for e in table if stable(e)]
    return min(matches, key=lambda e: (e["pass1"] + e["pass2"], e["pass2"])) if matches else None


def markdown(rows: list[dict], band: dict, table: list[dict], costs: tuple[float, float]) -> str:
    """Return the study's tables: noise, schedules against the reference, per-case scores, early stopping."""
    lines = ["### Noise of 1000 + 1000 (jittered composite and other reconstruct seeds vs the reference)", "",
             "| score | difference measure | jitter RMS | reconstruct-seed RMS | pooled RMS | largest | band (2 x RMS) "
             "| cases / samples |", "|---|---|---|---|---|---|---|---|"]
    for name in SCORES:
        n = band[name]
        measure = "absolute" if name == "structure" else "ln ratio"
        lines.append(f"| {name} | {measure} | {n['jitter_rms']:.4f} | {n['seed_rms']:.4f} | {n['rms']:.4f} | "
                     f"{n['max']:.4f} | {n['band']:.4f} | {n['cases']} / {n['samples']} |")
    lines += ["", f"Seconds per evaluation (median, this machine, 1 thread): pass 1 {costs[0]:.3f}, pass 2 {costs[1]:.3f}.",
              "", "### Schedules against 1000 + 1000 (cases outside the band / worst |difference| / band)", "",
              "| pass 1 | pass 2 | style | structure | seam | matches |", "|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['pass1']} | {e['pass2']} | " + " | ".join(
            f"{e[f'{n}_outside']} / {e[f'{n}_worst']:.2f}" for n in SCORES) + f" | {'yes' if e['matches'] else 'no'} |")
    best = cheapest_match(table)
    found = (f"Fewest evaluations that match, with every longer pass 2 after it: {best['pass1']} + {best['pass2']}"
             if best else "None matches.")
    lines += ["", found]
    lines += ["", *per_case_table(rows, [(50, 50), (100, 100), (200, 200), (400, 400), (1000, 100), (1000, 250),
                                         (1000, 1000), (100, 250), (100, 400)] +
                                  ([(best["pass1"], best["pass2"])] if best else []))]
    caps = [(best["pass1"], best["pass2"])] if best else []
    for cap in dict.fromkeys([*caps, (100, 400), (400, 400), FAST_CAP, (MAX_ITERATIONS, MAX_ITERATIONS)]):
        if cap in by_schedule(rows):
            lines += ["", *early_stop_markdown(rows, band, cap)]
    return "\n".join(lines) + "\n"


def per_case_table(rows: list[dict], schedules: list[tuple[int, int]]) -> list[str]:
    """Return markdown rows: per case and schedule, the three scores and the final losses of both passes."""
    grid = by_schedule(rows)
    jitter = by_schedule(rows, "jitter")
    lines = ["### Per case: scores and final losses", "",
             "| case | tau | schedule | style | structure | seam | pass-2 content | style | hist | tv | total "
             "| pass-1 total |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = sorted(grid[(MAX_ITERATIONS, MAX_ITERATIONS)])
    for case in cases:
        entries = [(f"{a} + {b}", grid[(a, b)][case]) for a, b in dict.fromkeys(schedules) if case in grid.get((a, b), {})]
        if case in jitter.get((MAX_ITERATIONS, MAX_ITERATIONS), {}):
            entries.append(("1000 + 1000 jittered", jitter[(MAX_ITERATIONS, MAX_ITERATIONS)][case]))
        for label, r in entries:
            lines.append(f"| {case} | {float(r['tau']):.2f} | {label} | {float(r['style']):.3f} | "
                         f"{float(r['structure']):.3f} | {float(r['seam']):.3f} | " + " | ".join(
                             f"{float(r.get(f'p2_{g}', 0.0)):.4g}" for g in ("content", "style", "hist", "tv", "total"))
                         + f" | {float(r['p1_total']):.4g} |")
    return lines


def early_stop_markdown(rows: list[dict], band: dict, schedule: tuple[int, int]) -> list[str]:
    """Return markdown rows of the early-stopping simulation on pass 2 of ``schedule`` (and pass 1's stops)."""
    lines = [f"### Early stopping on pass 2 of {schedule[0]} + {schedule[1]} (stop step per case; '-' = ran all)", "",
             "| levels | patience | stops per case | mean evaluations saved | matches | pass-1 stops (of "
             f"{schedule[0]}) |", "|---|---|---|---|---|---|"]
    for e in early_stop_table(rows, band, schedule):
        stops = ", ".join(f"{c}: {s or '-'}" for c, s in sorted(e["stops"].items()))
        p1 = ", ".join(f"{c}: {s or '-'}" for c, s in pass1_stops(rows, e["levels"], e["patience"], schedule[0]).items())
        lines.append(f"| {e['levels']} | {e['patience']} | {stops} | {e['saved']:.0f} | "
                     f"{'yes' if e['matches'] else 'no'} | {p1} |")
    return lines


def fast_markdown(out: Path, rows: list[dict], band: dict) -> list[str]:
    """Return the table of the ``fast`` preset's runs (``check``) against 1000 + 1000: evaluations, both results'
    scores and each difference over the noise band (an asterisk marks one outside it)."""
    reference = by_schedule(rows)[(MAX_ITERATIONS, MAX_ITERATIONS)]
    lines = ["### The fast preset (run end to end by `check`) against 1000 + 1000", "",
             "| case | tau | pass 1 / pass 2 iterations run | style fast / 1000+1000 | structure | seam |",
             "|---|---|---|---|---|---|"]
    for case in sorted(reference):
        path = out / str(case) / "fast" / "fast.json"
        if not path.exists():
            continue
        fast, ref = json.loads(path.read_text()), reference[case]
        cells = []
        for name in SCORES:
            ratio = abs(relative_difference(name, fast["quality"][name], float(ref[name]))) / band[name]["band"]
            cells.append(f"{fast['quality'][name]:.3f} / {float(ref[name]):.3f} ({ratio:.2f}{'*' if ratio > 1 else ''})")
        runs = " / ".join(str(fast[p]["evaluations"]) for p in ("pass1", "pass2"))
        lines.append(f"| {case} | {float(ref['tau']):.2f} | {runs} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("In parentheses: |difference| / noise band (ln ratio for style and seam, absolute for structure).")
    return lines


def replay_markdown(rows: list[dict], band: dict) -> list[str]:
    """Return per case the ``fast`` preset's result replayed from the snapshots (pass 1 ``FAST_CAP[0]``, pass 2 up
    to ``FAST_CAP[1]`` stopped by ``FAST_RULE``; pass 1 runs in full) against 1000 + 1000."""
    grid = by_schedule(rows)
    reference = grid[(MAX_ITERATIONS, MAX_ITERATIONS)]
    (a, b), (levels, patience) = FAST_CAP, FAST_RULE
    lines = [f"### fast ({a} + up to {b}, stop at {levels} levels x {patience}) replayed against 1000 + 1000", "",
             "| case | tau | pass 2 iterations | style fast / 1000+1000 | structure | seam |", "|---|---|---|---|---|---|"]
    for case in sorted(reference):
        changes = {pb: float(r[case]["p2_change"]) for (pa, pb), r in grid.items()
                   if pa == a and case in r and r[case]["p2_change"] != ""}
        stop = stop_step(changes, levels, patience, b) or b
        row, ref = grid[(a, stop)][case], reference[case]
        cells = []
        for name in SCORES:
            ratio = abs(relative_difference(name, float(row[name]), float(ref[name]))) / band[name]["band"]
            cells.append(f"{float(row[name]):.3f} / {float(ref[name]):.3f} ({ratio:.2f}{'*' if ratio > 1 else ''})")
        lines.append(f"| {case} | {float(ref['tau']):.2f} | {stop} | " + " | ".join(cells) + " |")
    return lines


def check(args) -> int:
    """Run ``harmonize`` with the ``fast`` preset (at the study size) on ``--cases`` and score it against the grid's
    1000 + 1000; also report the scores of the grid's snapshot at the same schedule and stop step."""
    from harmonize_core import harmonize, load_item, preset
    from harmonize_core.network.vgg import load_backbone

    taus = authors_taus(args.cases_dir)
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
        record = {"case": index, "seconds": round(time.perf_counter() - started, 1), "load": _load(),
                  "quality": outputs["reconstruct"].metrics["quality"],
                  **{stage: {k: outputs[stage].metrics.get(k) for k in ("evaluations", "stopped_early", "stopped_at")}
                     for stage in ("pass1", "pass2")}}
        (target / "fast.json").write_text(json.dumps(record))
        results.append(record)
        print(json.dumps(record), flush=True)
    (args.out / "fast_check.json").write_text(json.dumps(results, indent=1))
    return 0


def parse_cases(text: str) -> tuple[int, ...]:
    """Return the case numbers of a comma-separated list."""
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("grid", "noise", "bf16", "score", "bf16-score", "check"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases-dir", type=Path, default=CASES_DIR)
    parser.add_argument("--cases", type=parse_cases, default=DEFAULT_CASES)
    parser.add_argument("--bf16-cases", type=parse_cases, default=DEFAULT_BF16_CASES)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--iters", type=int, default=100, help="bf16: iterations per pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the VGG runs: cpu or cuda")
    parser.add_argument("--lengths", type=parse_cases, default=LENGTHS, help="grid: pass-1 lengths given a pass 2")
    parser.add_argument("--wait", action="store_true", help="grid: wait for another process's pass-1 runs")
    parser.add_argument("--extend", type=int, default=0, help="grid: run each pass 2 for at least this many iterations")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command in ("score", "bf16-score", "check"):
        return {"score": score, "bf16-score": score_precision, "check": check}[args.command](args)
    from harmonize_core.network.vgg import load_backbone

    backbone = load_backbone("vgg16", "offline-vgg16", device=args.device, ceil_mode=True)
    {"grid": grid, "noise": noise, "bf16": bf16}[args.command](args, backbone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
