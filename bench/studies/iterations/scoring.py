"""Scoring the study's snapshots: quality scores and losses per schedule, the noise band of the reference, and
which schedules match it (``compare``)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from bench.reference_cases import authors_taus
from harmonize_core.passes.stages import blend
from harmonize_core.quality.scores import quality_scores

from .common import (
    LENGTHS,
    MAX_ITERATIONS,
    MAX_OUTSIDE_PER_SCORE,
    NOISE_FACTOR,
    RECONSTRUCT_SEEDS,
    SCORES,
    WORST_FACTOR,
    case_folders,
    final_image,
    load_inputs,
    load_png,
    study_config,
)


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


def seconds_per_evaluation(out: Path) -> tuple[float, float]:
    """Return the median seconds per evaluation of pass 1 and pass 2 over the grid's runs (this machine, 1 thread)."""

    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2] if values else float("nan")

    p1 = [json.loads(f.read_text())["seconds_per_evaluation"] for f in out.glob("*/p1/run.json")]
    p2 = [json.loads(f.read_text())["seconds_per_evaluation"] for f in out.glob(f"*/p2_from{MAX_ITERATIONS}/run.json")]
    return median(p1), median(p2)
