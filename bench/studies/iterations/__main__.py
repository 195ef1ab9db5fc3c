"""``python -m bench.studies.iterations COMMAND OUT``: the iteration study's command line (see the package)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.reference_cases import CASES_DIR, authors_taus
from harmonize_core.network.vgg import load_backbone
from tasks.weights_fetch import fetch_weights

from . import __doc__ as STUDY_DOC
from .common import (
    DEFAULT_BF16_CASES,
    DEFAULT_CASES,
    DEFAULT_SIZE,
    LENGTHS,
    SCORES,
    final_image,
    load_inputs,
    load_png,
    parse_cases,
    study_config,
    write_csv,
)
from .plot import plot
from .runs import PRECISION_RUNS, bf16, check, grid, noise
from .scoring import compare, noise_band, relative_difference, scored_rows, seconds_per_evaluation
from .tables import fast_markdown, markdown, replay_markdown


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


def main(argv: list[str] | None = None) -> int:
    """Run one study command (see the package's docstring); return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.studies.iterations", description=STUDY_DOC.split("\n")[0])
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
    fetch_weights("offline-vgg16", "vgg16")  # the default network: fetched once per machine
    backbone = load_backbone("vgg16", "offline-vgg16", device=args.device, ceil_mode=True)
    {"grid": grid, "noise": noise, "bf16": bf16}[args.command](args, backbone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
