"""``harmonize one``: all stages written with metrics; bad input gives one line naming the file, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

TINY = ["--size", "48", "--pass1-iters", "2", "--pass2-iters", "2", "--weights", "random:0", "--device", "cpu"]


def _harmonize(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from flows.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def _save(path: Path, array: torch.Tensor) -> Path:
    data = (array.clamp(0, 1) * 255).round().to(torch.uint8)
    image = Image.fromarray(data.permute(1, 2, 0).numpy() if data.shape[0] == 3 else data[0].numpy())
    image.save(path)
    return path


@pytest.fixture
def item(tmp_path):
    generator = torch.Generator().manual_seed(0)
    style = torch.rand(3, 40, 48, generator=generator)
    mask = torch.zeros(1, 40, 48)
    mask[:, 10:28, 14:34] = 1
    content = torch.where(mask.bool(), torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1), style)
    return {"content": _save(tmp_path / "naive.png", content), "style": _save(tmp_path / "painting.png", style),
            "mask": _save(tmp_path / "mask.png", mask), "out": tmp_path / "out"}


def _args(item, **replace):
    paths = {**item, **replace}
    return ["one", "--content", str(paths["content"]), "--style", str(paths["style"]), "--mask", str(paths["mask"]),
            "--out", str(paths["out"]), *TINY]


def test_one_writes_every_stage_and_the_metrics(item):
    result = _harmonize(*_args(item))
    assert result.returncode == 0, result.stderr
    out = item["out"]
    for stage in ("dilate", "pass1", "blend", "pass2", "reconstruct"):
        with Image.open(out / f"{stage}.png") as image:
            assert image.size == (48, 40)  # inputs already at the working size are not resampled
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["sizing"]["size"] == 48
    assert metrics["config"]["backbone"]["weights"] == "random:0"
    assert len(metrics["weights_digest"]) == 64
    assert set(metrics["stages"]) == {"dilate", "pass1", "blend", "pass2", "reconstruct"}
    assert metrics["stages"]["pass2"]["tau"] == 5.0  # the authors' middle level when no tau is given
    assert metrics["stages"]["pass1"]["curves"]["total"]
    assert metrics["peak_memory"]["cpu_rss_mib"] > 0


def _assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_file(item, tmp_path):
    _assert_one_line_error(_harmonize(*_args(item, style=tmp_path / "nope.jpg")), "nope.jpg", "not found")


def test_unreadable_image(item, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    _assert_one_line_error(_harmonize(*_args(item, content=broken)), "broken.jpg", "not a readable image")


def test_size_mismatch(item, tmp_path):
    small = _save(tmp_path / "small.png", torch.rand(3, 20, 24))
    _assert_one_line_error(_harmonize(*_args(item, style=small)), "size mismatch", "small.png 24x20", "naive.png 48x40")


def test_empty_mask(item, tmp_path):
    empty = _save(tmp_path / "empty.png", torch.zeros(1, 40, 48))
    _assert_one_line_error(_harmonize(*_args(item, mask=empty)), "empty.png", "empty")


def test_random_weights_only_when_asked(item):
    args = _args(item)
    args[args.index("random:0")] = "imagenet"
    args[args.index("--weights"):args.index("--weights")] = ["--backbone", "vgg19"]
    result = subprocess.run([sys.executable, "-c", "import sys; from flows.cli.main import main; sys.exit(main())", *args],
                            capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "TORCH_HOME": str(item["out"] / "empty-torch-home"),
                                 "HARMONIZE_OFFLINE_TEST": "1"})
    # Offline, ImageNet weights cannot be downloaded: a clear error, never a silent fallback to random weights.
    if result.returncode == 0:
        pytest.skip("imagenet weights were downloadable here (online machine)")
    _assert_one_line_error(result, "weights")
