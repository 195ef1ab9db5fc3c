"""What every step of the iteration study shares: its constants, config, case inputs and image files."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from bench.reference_cases import authors_taus
from harmonize_core import load_item, preset
from harmonize_core.images import decode_png_exact, encode_png, read_bytes
from harmonize_core.losses.terms import noise_estimate
from harmonize_core.passes.stages import ItemInputs, blend, dilate, prepare_inputs, reconstruct

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
STOP_LEVELS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)  # candidate thresholds (mean 8-bit levels per STEP evaluations)
STOP_PATIENCE = (1, 2, 3)
FAST_CAP, FAST_RULE = (1000, 600), (1.0, 2)  # the fast preset: iterations per pass, (stop_levels, stop_patience)


def study_config(size: int, tau: float, **overrides):
    """Return the study's config: ``quick`` (offline VGG16, paper loss settings) at ``size``, the case's tau."""
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
        return noise_estimate(self.inputs.paper_size_painting())


def load_inputs(folder: Path):
    """Return (ItemInputs at the study size, loose mask) of a case folder written by ``Case``."""
    images = {n: load_png(folder / f"{n}.png") for n in ("content", "style", "tight", "loose")}
    tight, loose = ((images[n][:, :1] > 0.5).float() for n in ("tight", "loose"))
    return ItemInputs(content=images["content"], style=images["style"], tight=tight), loose


def final_image(pass2_image: torch.Tensor, inputs, config) -> tuple[torch.Tensor, dict[str, float]]:
    """Return (the final image, its quality scores): ``stages.pass2``'s blend, then ``stages.reconstruct``."""
    blended = blend(pass2_image, inputs, config, stage="pass2").image
    out = reconstruct(blended, inputs, config)
    return out.image, out.metrics["quality"]


def case_folders(out: Path) -> list[Path]:
    """Return the case folders of a study with a finished pass-1 run, in case order."""
    return sorted((p for p in out.iterdir() if (p / "p1" / "run.json").exists()), key=lambda p: int(p.name))


def write_csv(rows: list[dict], path: Path) -> None:
    """Write dict rows (the union of their keys as columns) to ``path``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def load_average() -> str:
    """Return the 1-minute load average as text (empty where /proc/loadavg is missing)."""
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else ""


def parse_cases(text: str) -> tuple[int, ...]:
    """Return the case numbers of a comma-separated list."""
    return tuple(int(x) for x in text.split(",") if x.strip())
