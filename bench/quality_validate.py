"""Validate the per-item quality scores (harmonize_core/quality/scores.py) on the reference cases.

Usage::

    python bench/quality_validate.py run   OUT [--cases DIR] [--size 256] [--iters 100] [--only 1,2,3] [--threads 1]
    python bench/quality_validate.py score OUT [--csv OUT/quality.csv] [--markdown OUT/quality.md]

``run`` harmonizes every usable case of ``DIR`` (default ``../shared/dph-cases`` next to the repository: ``N_naive.jpg``
composite, ``N_target.jpg`` painting, ``N_c_mask.jpg`` tight mask, the authors' tau from ``wikiart_output.txt``) with the
``quick`` preset at ``--size`` and ``--iters`` + ``--iters`` iterations on the offline VGG16, and writes under
``OUT/<N>/`` the working-size inputs (``content.png``, ``style.png``, ``tight.png``), the stage images and
``metrics.json``. Cases already done are skipped, so the command can be resumed.

``score`` reads those folders and scores four outputs per case against the same composite, painting and mask:

- ``naive``: the composite itself (nothing harmonized);
- ``pass1``: pass 1's result blended into the painting (``blend.png``), the robust coarse harmonization;
- ``final``: the final ``reconstruct.png``;
- ``erased``: the painting itself (the object removed entirely).

It writes one CSV row per case and output (``quality_scores.csv``), one row per case with the checks
(``quality_checks.csv``) and a markdown table (``quality_table.md``), and prints the table. The checks of issue 10:
the naive composite clearly worse on style than the harmonized output (``naive / harmonized >= STYLE_CLEAR_RATIO``)
and the erased output clearly worse on structure (``harmonized - erased >= STRUCTURE_CLEAR_GAP``), for both pass 1
and the final image.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.reference_cases import CASES_DIR, authors_taus  # noqa: E402
from harmonize_core.images import decode_png_exact, encode_png, read_bytes  # noqa: E402

OUTPUT_KINDS = ("naive", "pass1", "final", "erased")
HARMONIZED_KINDS = ("pass1", "final")
SCORE_KEYS = ("style", "structure", "seam")
# "Clearly worse" (fixed before looking at the full table): the worse output's style distance is at least this
# factor above the harmonized one's; its structure (a correlation in [0, 1]) at least this far below.
STYLE_CLEAR_RATIO = 1.5
STRUCTURE_CLEAR_GAP = 0.2


def read_cases(folder: Path) -> list[tuple[int, str, float]]:
    """Return (index, genre, authors' tau) of every case with a composite, a painting and a tight mask."""
    return [(index, genre, tau) for index, (genre, tau) in authors_taus(folder).items()
            if all((folder / f"{index}_{name}.jpg").exists() for name in ("naive", "target", "c_mask"))]


def run_cases(folder: Path, out: Path, size: int, iters: int, only: set[int] | None) -> None:
    """Harmonize every case (skipping finished ones) and write its working-size inputs and outputs under ``out``."""
    from harmonize_core import harmonize, load_item, preset, save_outputs
    from harmonize_core.network.vgg import load_backbone
    from harmonize_core.passes.stages import prepare_inputs
    from tasks.weights_fetch import fetch_weights

    config = preset("quick").replace(**{"sizing.size": size, "pass1.iterations": iters, "pass2.iterations": iters})
    fetch_weights(config.backbone.weights, config.backbone.name)  # the default network: fetched once per machine
    backbone = load_backbone(config.backbone.name, config.backbone.weights, device="cpu",
                             ceil_mode=config.backbone.ceil_mode)
    for index, genre, tau in read_cases(folder):
        target = out / str(index)
        if (only and index not in only) or (target / "metrics.json").exists():
            continue
        started = time.perf_counter()
        content, style, mask = load_item(*(folder / f"{index}_{n}.jpg" for n in ("naive", "target", "c_mask")))
        item_config = config.replace(**{"pass2.tau": tau})
        outputs = harmonize(content, style, mask, item_config, backbone=backbone)
        inputs = prepare_inputs(content, style, mask, item_config)
        for name, image in (("content", inputs.content), ("style", inputs.style), ("tight", inputs.tight)):
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{name}.png").write_bytes(encode_png(image))
        save_outputs(outputs, target, extra={"case": index, "genre": genre, "tau": tau})
        print(f"case {index}: {time.perf_counter() - started:.1f} s", flush=True)


def load_case(folder: Path) -> dict[str, torch.Tensor]:
    """Return the working-size content, style, tight mask, pass-1 blend and final image of one ``run`` folder."""
    images = {name: decode_png_exact(read_bytes(folder / f"{name}.png"), name)
              for name in ("content", "style", "tight", "blend", "reconstruct")}
    images["tight"] = (images["tight"][:, :1] > 0.5).float()
    return images


def score_cases(out: Path) -> list[dict[str, object]]:
    """Return one row per case and output kind: case, genre, output, style, structure, seam."""
    from harmonize_core.quality.scores import quality_scores

    rows = []
    folders = sorted((p for p in out.iterdir() if (p / "reconstruct.png").exists()), key=lambda p: int(p.name))
    for folder in folders:
        images = load_case(folder)
        genre = json.loads((folder / "metrics.json").read_text()).get("genre", "")
        candidates = {"naive": images["content"], "pass1": images["blend"], "final": images["reconstruct"],
                      "erased": images["style"]}
        for kind, result in candidates.items():
            scores = quality_scores(result, images["content"], images["style"], images["tight"])
            rows.append({"case": int(folder.name), "genre": genre, "output": kind,
                         **{key: round(float(scores[key]), 4) for key in SCORE_KEYS}})
    return rows


def checks(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Return per case: every output's scores, and for each harmonized output the style ratio (naive / it), the
    structure gap (it - erased) and whether each check passes."""
    by_case: dict[int, dict[str, dict[str, object]]] = {}
    for row in rows:
        by_case.setdefault(int(row["case"]), {})[str(row["output"])] = row
    table = []
    for case, outs in sorted(by_case.items()):
        entry: dict[str, object] = {"case": case, "genre": outs["final"]["genre"],
                                    **{f"{k}_{key}": outs[k][key] for k in OUTPUT_KINDS for key in SCORE_KEYS}}
        for kind in HARMONIZED_KINDS:
            ratio = float(outs["naive"]["style"]) / max(float(outs[kind]["style"]), 1e-6)
            gap = float(outs[kind]["structure"]) - float(outs["erased"]["structure"])
            entry.update({f"{kind}_style_ratio": round(ratio, 3), f"{kind}_structure_gap": round(gap, 3),
                          f"{kind}_style_pass": ratio >= STYLE_CLEAR_RATIO,
                          f"{kind}_structure_pass": gap >= STRUCTURE_CLEAR_GAP})
        table.append(entry)
    return table


def markdown(table: list[dict[str, object]]) -> str:
    """Return the validation table as markdown (a cross marks a failed check), with a count line per check."""
    head = ("| case | genre | style naive | pass 1 | final | erased | ratio p1 | ratio final "
            "| structure pass 1 | final | erased | gap p1 | gap final | seam naive | pass 1 | final |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        lines.append(
            f"| {r['case']} | {r['genre']} | " + " | ".join(f"{r[f'{k}_style']:.2f}" for k in OUTPUT_KINDS)
            + f" | {_mark(r, 'pass1', 'style', 'ratio')} | {_mark(r, 'final', 'style', 'ratio')} | "
            + " | ".join(f"{r[f'{k}_structure']:.2f}" for k in ("pass1", "final", "erased"))
            + f" | {_mark(r, 'pass1', 'structure', 'gap')} | {_mark(r, 'final', 'structure', 'gap')} | "
            + " | ".join(f"{r[f'{k}_seam']:.2f}" for k in ("naive", "pass1", "final")) + " |")
    lines.append("")
    for kind in HARMONIZED_KINDS:
        style_ok = sum(bool(r[f"{kind}_style_pass"]) for r in table)
        structure_ok = sum(bool(r[f"{kind}_structure_pass"]) for r in table)
        ratios = sorted(float(r[f"{kind}_style_ratio"]) for r in table)
        gaps = sorted(float(r[f"{kind}_structure_gap"]) for r in table)
        lines.append(f"- {kind}: naive clearly worse on style (ratio >= {STYLE_CLEAR_RATIO}) on {style_ok}/{len(table)}"
                     f" cases (ratio min {ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}); erased clearly worse"
                     f" on structure (gap >= {STRUCTURE_CLEAR_GAP}) on {structure_ok}/{len(table)} cases (gap min"
                     f" {gaps[0]:.2f}, median {gaps[len(gaps) // 2]:.2f})")
    return "\n".join(lines) + "\n"


def _mark(row: dict[str, object], kind: str, check: str, value: str) -> str:
    """A check's value with two decimals, followed by a cross when the check fails."""
    return f"{row[f'{kind}_{check}_{value}']:.2f}" + ("" if row[f"{kind}_{check}_pass"] else " ✗")


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path`` as CSV."""
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "score"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=Path, default=CASES_DIR)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--only", default="", help="comma-separated case numbers")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "run":
        only = {int(x) for x in args.only.split(",") if x} or None
        run_cases(args.cases, args.out, args.size, args.iters, only)
        return 0
    rows = score_cases(args.out)
    table = checks(rows)
    write_csv(rows, args.out / "quality_scores.csv")
    write_csv(table, args.out / "quality_checks.csv")
    text = markdown(table)
    (args.out / "quality_table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
