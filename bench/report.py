"""The outputs of one ``python -m bench`` run: the CSVs, ``machine.json`` and the markdown report.

Each section formats its own table (``stage_table``, ``ratio_table``, ``precision_table``, ``evalcost_table``);
this module puts them together and writes the files under ``--out``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from .common import Options, Row, md_cell
from .sections.evalcost import EvalCost, evalcost_table
from .sections.fastpaths.precision import precision_table
from .sections.ratios import Ratio, ratio_record, ratio_table
from .sections.stages import stage_table


def rows_table(rows: list[Row]) -> str:
    """Return a markdown table of long rows; a note is shown once per experiment."""
    lines = ["| experiment | size | metric | value | unit | basis | note |", "|---|---|---|---|---|---|---|"]
    seen: set[str] = set()
    for r in rows:
        note = r.note if r.stage not in seen else ""
        seen.add(r.stage)
        lines.append("| " + " | ".join(md_cell(v) for v in (r.stage, r.size, r.metric, r.value, r.unit, r.basis, note))
                     + " |")
    return "\n".join(lines)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` (same keys) as CSV with a header; nothing when empty."""
    if not records:
        return
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)



def report(options: Options, info: dict, stage_rows: list[Row], ratios: list[Ratio], fast_rows: list[Row],
           evalcost: list[EvalCost] | None = None) -> str:
    """Return the markdown report of one run."""
    parts = [f"# Benchmark run on {info['device']}", "",
             f"Machine: {info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']} with "
             f"{info['torch_threads']} threads" + (f", GPU {info['gpu']}" if "gpu" in info else "") + ".",
             "Load average (1/5/15 min) at each section start and end: "
             + "; ".join(f"{k} {v}" for k, v in options.loads.items()) + "."]
    if any(r.section == "stages" for r in stage_rows):
        parts += ["", f"## Stages ({options.arch}, weights {options.weights}, {options.iterations} iterations "
                      f"per pass measured; 1000-iteration figures extrapolated)", "", stage_table(stage_rows)]
        if options.device.type == "cpu":
            parts += ["", "GPU rows: not measured (no GPU in this run)."]
    quick = [r for r in stage_rows if r.section == "quick"]
    if quick:
        parts += ["", f"## Quick preset, end to end at {quick[0].size} px (measured; {quick[0].note})", "",
                  ", ".join(f"{r.metric} {r.value} {r.unit}" for r in quick) + "."]
    if ratios:
        parts += ["", f"## Naive vs ours ({ratios[0].size} px, {options.ratio_arch} {options.ratio_weights})", "",
                  ratio_table(ratios)]
    if fast_rows:
        precision = [r for r in fast_rows if r.stage.startswith(("pass1_", "pass2_"))]
        others = [r for r in fast_rows if r not in precision]
        parts += ["", "## Fast paths", "", rows_table(others)]
        if precision:
            change = "; ".join(f"{r.stage.split('_')[0]} {r.value}" for r in precision
                               if r.metric == "change_from_composite")
            note = next(r.note for r in precision if r.stage.endswith("_bf16")).split(";")[0]
            parts += ["", f"Precision at {precision[0].size} px ({note}); mean change of the fp32 result from the "
                          f"composite in the loose mask, 8-bit levels: {change}.", "", precision_table(precision)]
    if evalcost:
        parts += ["", "## One evaluation vs a plain forward + backward (median of alternating runs)", "",
                  evalcost_table(evalcost)]
    return "\n".join(parts) + "\n"


def write_outputs(options: Options, info: dict, stage_rows: list[Row], ratios: list[Ratio],
                  fast_rows: list[Row], evalcost: list[EvalCost] | None = None) -> Path:
    """Write the CSVs, machine.json and report.md under ``options.out``; return the report's path."""
    options.out.mkdir(parents=True, exist_ok=True)
    write_csv(options.out / "stages.csv", [dataclasses.asdict(r) for r in stage_rows])
    write_csv(options.out / "ratios.csv", [ratio_record(r) for r in ratios])
    write_csv(options.out / "fastpaths.csv", [dataclasses.asdict(r) for r in fast_rows])
    write_csv(options.out / "evalcost.csv", [{**dataclasses.asdict(r), "verdict": r.verdict} for r in evalcost or []])
    (options.out / "machine.json").write_text(json.dumps({**info, "loads": options.loads}, indent=2) + "\n")
    path = options.out / "report.md"
    path.write_text(report(options, info, stage_rows, ratios, fast_rows, evalcost))
    return path
