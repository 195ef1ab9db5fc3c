"""Early stopping replayed on the snapshots' image changes: where ``lbfgs.EarlyStopper`` would stop each
case, and whether the stopped results still match the reference."""

from __future__ import annotations

from .common import MAX_ITERATIONS, STEP, STOP_LEVELS, STOP_PATIENCE
from .scoring import by_schedule, compare


def stop_step(changes: dict[int, float], levels: float, patience: int, iterations: int) -> int | None:
    """Return where ``lbfgs.EarlyStopper`` would stop a run whose image changes per check are ``changes``
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
