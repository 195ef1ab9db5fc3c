"""The study's markdown tables: noise, schedules against the reference, per case, early stopping, ``fast``."""

from __future__ import annotations

import json
from pathlib import Path

from .common import FAST_CAP, FAST_RULE, MAX_ITERATIONS, SCORES
from .scoring import by_schedule, relative_difference
from .stopping import early_stop_table, pass1_stops, stop_step


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
