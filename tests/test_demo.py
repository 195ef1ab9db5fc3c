"""The demo a newcomer runs first: the README's command with its real settings keeps every object and ends by
saying where to look. Slow (three items at 256 px, 50 + 50 iterations, real offline VGG16 weights); CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli.main import main
from flows.summary import read_summary
from manifests.demo import DEMO_IDS, DEMO_STRUCTURE_MIN

pytestmark = pytest.mark.slow


def test_the_demo_keeps_every_object_and_points_at_its_report(prefect_api, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()
    report = Path(printed.split("open the report in a browser: ")[1].splitlines()[0])
    assert report.is_file() and any("open the report" in line for line in last[-2:])
    rows = {row["id"]: row for row in read_summary(str(report.parent / "summary.csv"))}
    assert sorted(rows) == list(DEMO_IDS) and {r["status"] for r in rows.values()} == {"completed"}
    for item_id, row in rows.items():  # the object survives: not faded into the painting
        assert float(row["quality_structure"]) >= DEMO_STRUCTURE_MIN, (item_id, row["quality_structure"])
        assert float(row["quality_seam"]) < 2.5, (item_id, row["quality_seam"])  # and no hard pasted edge
    page = report.read_text()
    assert all(f"demo-0{n}" in page for n in (1, 2, 3)) and page.count("<img") >= 12
