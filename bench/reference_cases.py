"""The authors' reference cases for the bench scripts: where they are by default and the tau each was given.

The cases are the 35 examples published with the authors' code (their ``data/`` folder: ``N_naive.jpg``,
``N_target.jpg``, ``N_c_mask.jpg`` ... and ``wikiart_output.txt``, one line per case with the genre their classifier
gave and the resulting tau). They are not part of this repository; the scripts look for them in a
``shared/dph-cases`` folder beside it unless told otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

CASES_DIR = Path(__file__).resolve().parents[2] / "shared" / "dph-cases"
LINE = re.compile(r"idx=(\d+), classified label=(.*), weight=([0-9.]+)")


def authors_taus(folder: Path) -> dict[int, tuple[str, float]]:
    """Return {case: (genre, authors' tau)} read from ``folder/wikiart_output.txt``, in the file's order."""
    taus = {}
    for line in (folder / "wikiart_output.txt").read_text().splitlines():
        match = LINE.match(line.strip())
        if match:
            taus[int(match[1])] = (match[2].strip(), float(match[3]))
    return taus
