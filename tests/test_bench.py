"""The benchmark harness (bench/): a tiny smoke run of every section, and its arithmetic and instruments.

The smoke run uses random VGG16 weights and a procedural item at 48-64 px, so it needs neither the reference cases nor the
offline weights; it checks that the CSVs and the report hold the expected rows, that every naive-vs-ours row
compares equal results, and that the extrapolated figures are the measured ones plus the missing iterations.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import shutil

import pytest
import torch

from bench import MIB, PeakMemory, with_memory_format
from bench.cli import main
from bench.common import PAPER_ITERATIONS, lbfgs_history_bytes, steady_iteration_seconds
from bench.phases import PhaseError, recording_phases
from bench.sections.evalcost import EVAL_BAR, EvalCost, plain_forward_backward
from bench.sections.fastpaths.history import lbfgs_state_peak
from bench.sections.stages import PASS_PHASES
from harmonize_core import timing
from harmonize_core.config import preset
from harmonize_core.network.vgg import load_backbone
from harmonize_core.optimisation.objective import Problem, Term
from harmonize_core.passes import stages
from tasks import code_digest

STAGE_SIZE, RATIO_SIZE, ITERATIONS = 48, 64, 2
SMOKE_ARGS = ["--sizes", str(STAGE_SIZE), "--iterations", str(ITERATIONS), "--ratio-size", str(RATIO_SIZE),
              "--case", "procedural", "--arch", "vgg16", "--weights", "random:0", "--ratio-weights", "random:0",
              "--repeats", "1", "--fast-size", str(STAGE_SIZE), "--quality-size", str(STAGE_SIZE),
              "--quality-iterations", "2", "--no-compile", "--sections", "ratios,stages,fastpaths"]
STAGE_METRICS = {
    ("dilate", "seconds"), ("pass1", "match_relu3_1"), ("pass1", "match_relu4_1"), ("pass1", "match_relu5_1"),
    ("pass1", "per_iteration"), ("pass1", "seconds"), ("pass1", f"seconds_{PAPER_ITERATIONS}it"),
    ("pass1", "peak_mb"), ("blend", "seconds"), ("pass2", "match_relu4_1"), ("pass2", "refine"),
    ("pass2", "per_iteration"), ("pass2", "seconds"), ("pass2", f"seconds_{PAPER_ITERATIONS}it"),
    ("reconstruct", "seconds"), ("end_to_end", "seconds"), ("end_to_end", f"seconds_{PAPER_ITERATIONS}it"),
    ("end_to_end", "peak_mb"),
}
RATIO_NAMES = ["match_full_vs_chunked", "match_unmasked_vs_masked", "hist_naive_vs_sorted", "nsum_full_vs_chunked"]


def read_csv(path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main([*SMOKE_ARGS, "--out", str(out)])
    return out, code


def test_stage_rows_and_extrapolation(smoke):
    out, _ = smoke
    rows = read_csv(out / "stages.csv")
    value = {(r["stage"], r["metric"]): float(r["value"]) for r in rows if int(r["size"]) == STAGE_SIZE}
    assert STAGE_METRICS <= set(value)
    basis = {(r["stage"], r["metric"]): r["basis"] for r in rows}
    assert basis[("pass1", f"seconds_{PAPER_ITERATIONS}it")] == "extrapolated"
    assert basis[("pass1", "seconds")] == "measured"
    for stage in ("pass1", "pass2"):
        expected = value[(stage, "seconds")] + (PAPER_ITERATIONS - ITERATIONS) * value[(stage, "per_iteration")]
        assert value[(stage, f"seconds_{PAPER_ITERATIONS}it")] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    stage_sum = sum(value[(s, "seconds")] for s in ("dilate", "pass1", "blend", "pass2", "reconstruct"))
    assert value[("end_to_end", "seconds")] == pytest.approx(stage_sum, abs=1e-3)
    assert all(v > 0 for (s, m), v in value.items() if m in ("seconds", "per_iteration", "peak_mb"))
    assert all(value[key] > 0 for key in STAGE_METRICS if key[1].startswith("match_") or key[1] == "refine")


def test_ratio_rows_compare_equal_results(smoke):
    out, _ = smoke
    rows = read_csv(out / "ratios.csv")
    assert [r["name"] for r in rows] == RATIO_NAMES
    for row in rows:
        assert row["equal"] == "True", row
        assert float(row["ratio"]) == pytest.approx(float(row["naive_s"]) / float(row["ours_s"]), rel=1e-2)
        assert int(row["size"]) == RATIO_SIZE
    bars = {r["name"]: r["bar"] for r in rows}
    assert float(bars["match_full_vs_chunked"]) == 5.0 and float(bars["hist_naive_vs_sorted"]) == 10.0


def test_report_and_machine_record(smoke):
    out, code = smoke
    text = (out / "report.md").read_text()
    assert f"| {STAGE_SIZE} | " in text
    assert "| comparison | layer @ size |" in text
    assert text.count(f"@ {RATIO_SIZE} px |") == len(RATIO_NAMES)
    assert "GPU rows: not measured" in text or "cuda" in text
    machine = json.loads((out / "machine.json").read_text())
    assert len(machine["loadavg"]) == 3 and machine["torch_threads"] >= 1
    assert set(machine["loads"]) == {"stages", "ratios", "fastpaths"}
    ratios = read_csv(out / "ratios.csv")
    assert code == (1 if any(r["verdict"] == "FAIL" for r in ratios) else 0)


def test_fastpath_rows(smoke):
    out, _ = smoke
    value = {(r["stage"], r["metric"]): r["value"] for r in read_csv(out / "fastpaths.csv")}
    assert float(value[("channels_last", "gradient_rel_diff")]) < 1e-4
    # bf16 rounding alone (same input image): the first evaluation's loss within a few percent of fp32
    assert float(value[("pass1_bf16", "first_eval_worst_term_rel_diff")]) < 0.05
    assert float(value[("pass1_control", "first_eval_worst_term_rel_diff")]) < 1e-4
    numel = 3 * 36 * 48  # the procedural item is 4:3, so 36 x 48 at 48 px
    assert float(value[("lbfgs_history_100", "history_mb")]) == pytest.approx(
        lbfgs_history_bytes(numel, 100, 110) / MIB, abs=0.1)
    assert float(value[("lbfgs_history_10", "history_mb")]) == pytest.approx(
        lbfgs_history_bytes(numel, 10, 20) / MIB, abs=0.1)


def test_steady_iteration_seconds_skips_the_first_evaluation():
    assert steady_iteration_seconds([5.0, 6.0, 8.0, 11.0]) == pytest.approx(2.0)
    assert math.isnan(steady_iteration_seconds([5.0]))


def test_lbfgs_history_bytes_matches_torch_state():
    shape = (1, 3, 8, 10)
    for history, iterations in ((5, 12), (10, 4)):  # the first step adds no pair; then one per step, up to history
        _, kept, pairs = lbfgs_state_peak(shape, history, iterations, torch.device("cpu"), learning_rate=1.0)
        assert pairs == min(history, iterations - 1)
        assert kept == lbfgs_history_bytes(math.prod(shape), history, iterations)


def test_peak_memory_sees_an_allocation():
    size_mb = 64
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(size_mb * MIB // 4)
        del block
    assert memory.extra_bytes >= 0.9 * size_mb * MIB


def test_with_memory_format_gives_the_same_features():
    """The core now builds its backbones in channels_last; an NCHW copy gives the same features."""
    fast = load_backbone("vgg16", "random:0")
    assert next(fast.net.parameters()).is_contiguous(memory_format=torch.channels_last)
    plain = with_memory_format(fast, torch.contiguous_format)
    assert plain.net is not fast.net and next(plain.net.parameters()).is_contiguous()
    x = torch.randn(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    reference, other = plain.extract(x, ["relu3_1"])["relu3_1"], fast.extract(x, ["relu3_1"])["relu3_1"]
    assert other.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(other, reference, rtol=1e-4, atol=1e-5)


EVAL_SIZE = 48


def test_evalcost_section_rows(tmp_path):
    code = main(["--sections", "evalcost", "--evalcost-sizes", str(EVAL_SIZE), "--evalcost-nets", "vgg16:random:0",
                 "--evalcost-repeats", "1", "--case", "procedural", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "evalcost.csv")
    assert [(r["stage"], r["deepest"]) for r in rows] == [("pass1", "relu5_1"), ("pass2", "relu4_1")]
    for row in rows:
        plain, full, ratio = float(row["plain_s"]), float(row["eval_s"]), float(row["ratio"])
        assert plain > 0 and full > 0 and int(row["size"]) == EVAL_SIZE and row["shape"] == "36x48"
        assert ratio == pytest.approx(full / plain, rel=0.02, abs=1e-3)  # one pair: its ratio is the ratio
        assert row["verdict"] == ("PASS" if ratio <= EVAL_BAR else "FAIL")
        assert (row["arch"], row["weights"], int(row["threads"])) == ("vgg16", "random:0", torch.get_num_threads())
    assert code == (1 if any(r["verdict"] == "FAIL" for r in rows) else 0)
    assert "| pass1 | vgg16 random:0 | 48 | 36x48 | relu5_1 |" in (tmp_path / "report.md").read_text()


def test_plain_run_is_autograd_of_the_deepest_tap():
    backbone = load_backbone("vgg16", "random:0")
    problem = Problem(backbone, [Term("t", "relu2_1", torch.sum, 1.0), Term("u", "relu1_1", torch.sum, 1.0)],
                      {}, torch.ones(1, 3, 20, 24), normalize=False)
    x = torch.randn(1, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(backbone.extract(leaf, ["relu2_1"])["relu2_1"].sum(), leaf)
    torch.testing.assert_close(plain_forward_backward(problem, x)(), expected)


def test_evalcost_verdict_reads_the_bar():
    row = EvalCost("pass2", 700, "564x700", "vgg16", "w", "relu4_1", 1.0, 1.25, 1.25, 1.2, 3, 2, "1 -> 1")
    assert row.verdict == "PASS"
    assert dataclasses.replace(row, ratio=1.26).verdict == "FAIL"


# ------------------------------------------------------------------------ the core's phase hook (harmonize_core.timing)
@pytest.fixture(scope="module")
def tiny_passes():
    """Pass 1 and pass 2 of a 32 x 40 item, 1 iteration each, random VGG16: (inputs, loose, backbone, config)."""
    generator = torch.Generator().manual_seed(4)
    content, style = torch.rand(1, 3, 32, 40, generator=generator), torch.rand(1, 3, 32, 40, generator=generator)
    mask = torch.zeros(1, 1, 32, 40)
    mask[..., 10:22, 12:28] = 1
    config = preset("quick").replace(**{"sizing.size": 40, "pass1.iterations": 1, "pass2.iterations": 1,
                                        "backbone.name": "vgg16", "backbone.weights": "random:0"})
    inputs = stages.prepare_inputs(content, style, mask, config)
    backbone = load_backbone("vgg16", "random:0")
    return inputs, stages.dilate(inputs, config).image, backbone, config


def test_every_phase_the_bench_times_reports_once_per_layer_and_recording_changes_no_result(tiny_passes):
    inputs, loose, backbone, config = tiny_passes
    assert {name for names in PASS_PHASES.values() for name in names} == set(timing.PHASES)
    assert isinstance(timing.phase("pass1.match", "relu3_1"), contextlib.nullcontext)  # nothing recorded by default
    plain = stages.pass1(inputs, loose, backbone, config).image
    with recording_phases(torch.device("cpu"), PASS_PHASES["pass1"]) as phases1:
        out1 = stages.pass1(inputs, loose, backbone, config)
    assert torch.equal(out1.image, plain)
    assert isinstance(timing.phase("pass1.match"), contextlib.nullcontext)  # the recorder is gone after the block
    assert list(phases1.by_detail("pass1.match")) == list(config.pass1.style_layers)
    assert phases1.count("pass1.match") == 3 and phases1.total("pass1.match") > 0
    with recording_phases(torch.device("cpu"), PASS_PHASES["pass2"]) as phases2:
        stages.pass2(inputs, loose, stages.blend(out1.image, inputs, config).image, backbone, config)
    assert phases2.count("pass2.match") == 1 and phases2.count("pass2.refine") == 1
    assert list(phases2.by_detail("pass2.match")) == [config.pass2.reference_layer]
    assert set(phases2.times) == {"pass2.match", "pass2.refine"}  # nothing of pass 1's


def test_a_phase_that_never_reports_or_is_not_declared_fails_loudly(tiny_passes):
    inputs, loose, backbone, config = tiny_passes
    with pytest.raises(PhaseError, match=r"^phase\(s\) pass2.refine never reported"):
        with recording_phases(torch.device("cpu"), ("pass2.refine",)):
            stages.dilate(inputs, config)
    with pytest.raises(PhaseError, match="pass1.matching that harmonize_core.timing.PHASES does not declare"):
        with recording_phases(torch.device("cpu"), ("pass1.matching",)):
            pass
    with pytest.raises(PhaseError, match="reported phase\\(s\\) pass9.x missing"):
        with recording_phases(torch.device("cpu"), ()):
            with timing.phase("pass9.x"):
                pass


def test_the_timing_module_is_in_no_cache_key(tmp_path):
    """A phase added or renamed, or a recorder changed, in harmonize_core/timing.py recomputes no stage."""
    core = tmp_path / "harmonize_core"
    shutil.copytree(code_digest.CORE_DIR, core, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest.stage_code_digests(core)
    timing_py = core / "timing.py"
    text = timing_py.read_text()
    assert text.count('PHASES = ("pass1.match",') == 1 and text.count("contextlib.nullcontext()") == 1
    timing_py.write_text(text.replace('PHASES = ("pass1.match",', 'PHASES = ("pass1.features", "pass1.match",')
                         .replace("contextlib.nullcontext()", "contextlib.nullcontext(enter_result=None)"))
    assert code_digest.stage_code_digests(core) == before
