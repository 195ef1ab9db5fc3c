"""Cache keys follow the code: an algorithm change recomputes the stages it touches; a pipeline-only change does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harmonize_core.config import preset
from harmonize_core.stages import STAGES
from tasks import caching, code_digest

STAGE_SET = set(STAGES)


@pytest.fixture
def core_copy(tmp_path) -> Path:
    """A copy of the installed ``harmonize_core`` sources to edit."""
    target = tmp_path / "harmonize_core"
    shutil.copytree(code_digest.CORE_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def digests(package: Path) -> dict[str, str]:
    return {stage: code_digest.stage_code_digest(stage, package) for stage in code_digest.STAGE_ROOTS}


def changed_after(package: Path, module: str, text: str = "\n# an edit\n") -> set[str]:
    before = digests(package)
    with open(package / f"{module}.py", "a", encoding="utf-8") as stream:
        stream.write(text)
    after = digests(package)
    return {stage for stage in before if before[stage] != after[stage]}


def test_every_stage_has_roots_and_the_copy_matches_the_installed_core(core_copy):
    assert set(code_digest.STAGE_ROOTS) == STAGE_SET
    assert digests(core_copy) == code_digest.installed_code_digests()


@pytest.mark.parametrize(("module", "stages"), [
    ("pass2", {"pass2"}),
    ("histogram", {"pass2"}),
    ("losses", {"pass1", "pass2"}),  # tau.py and both passes import it
    ("objective", {"pass1", "pass2"}),
    ("postprocess", {"reconstruct"}),
    ("masks", STAGE_SET - {"reconstruct"}),  # reconstruct feathers with its own blend
    ("stages", STAGE_SET),  # the glue of every stage
    ("config", STAGE_SET),
])
def test_an_algorithm_change_recomputes_exactly_the_stages_that_use_it(core_copy, module, stages):
    if module == "masks" and "masks" in code_digest.module_closure(code_digest.STAGE_ROOTS["reconstruct"], core_copy):
        stages = STAGE_SET
    assert changed_after(core_copy, module) == stages


@pytest.mark.parametrize("module", ["cli", "demo_data", "io"])
def test_core_modules_that_do_not_decide_pixels_change_no_key(core_copy, module):
    assert changed_after(core_copy, module) == set()


def test_a_pipeline_change_keeps_every_key_and_a_core_change_moves_them():
    config = preset("quick")
    inputs = {"content": "c", "style": "s", "mask": "m"}
    keys = {stage: caching.stage_cache_key(stage, inputs, config, "w") for stage in STAGES}
    # tasks/, flows/ and manifests/ are not hashed at all: the installed digests are the only code input.
    assert keys == {stage: caching.stage_cache_key(stage, inputs, config, "w",
                                                   code=code_digest.installed_code_digests()[stage])
                    for stage in STAGES}
    moved = caching.stage_cache_key("pass2", inputs, config, "w", code="another core")
    assert moved != keys["pass2"]
