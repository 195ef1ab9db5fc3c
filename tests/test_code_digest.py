"""Cache keys follow the meaning of the code: a stage's code digest changes when the code that computes it does, and
for nothing else (a docstring, a comment, a type hint, an error message, a module moved or renamed, another stage's
code, progress reporting, the CLI). Small synthetic packages first, then copies of the real core."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from harmonize_core.config import preset
from harmonize_core.passes.stages import STAGES
from tasks import caching, code_digest

STAGE_SET = set(STAGES)

# --- a synthetic package -------------------------------------------------------------------------------------------

TREE = {
    "__init__.py": '"""A tiny package."""\n',
    "ops.py": '''"""Arithmetic."""

from __future__ import annotations

SCALE = 2


def double(x: int) -> int:
    """Return twice x."""
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * SCALE


def unrelated(x):
    return x - 1
''',
    "report.py": '''"""Reporting only."""

REPORTING_ONLY = True


def say(x):
    print("value", x)
''',
    "stage_a.py": '''from .ops import double
from .report import say


def run_a(x: int) -> int:
    """Stage a."""
    say(x)
    return double(x) + 1
''',
    "stage_b.py": '''from . import ops


def run_b(x):
    return ops.unrelated(x)
''',
    "stage_c.py": '''def run_c(x):
    from .ops import double  # lazy: start-up time

    return double(x) * 3
''',
}
ROOTS = {"a": ("stage_a:run_a",), "b": ("stage_b:run_b",), "c": ("stage_c:run_c",)}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def tree_digests(root: Path) -> dict[str, str]:
    return {name: code_digest.code_digest(roots, root) for name, roots in ROOTS.items()}


def changed(tmp_path: Path, files: dict[str, str]) -> set[str]:
    """Return which synthetic stages' digests differ between ``TREE`` and ``files``."""
    before = tree_digests(write_tree(tmp_path / "pkg", TREE))
    after = tree_digests(write_tree(tmp_path / "pkg", files))
    return {name for name in before if before[name] != after[name]}


def edit(files: dict[str, str], name: str, old: str, new: str) -> dict[str, str]:
    assert files[name].count(old) == 1, old
    return {**files, name: files[name].replace(old, new)}


def test_the_closure_follows_calls_through_imports_and_skips_reporting(tmp_path):
    root = write_tree(tmp_path / "pkg", TREE)
    assert sorted(code_digest.closure(ROOTS["a"], root).included) == [
        ("ops", "SCALE"), ("ops", "double"), ("stage_a", "run_a")]  # report.say is reporting only
    assert sorted(code_digest.closure(ROOTS["b"], root).included) == [("ops", "unrelated"), ("stage_b", "run_b")]
    assert sorted(code_digest.closure(ROOTS["c"], root).included) == [
        ("ops", "SCALE"), ("ops", "double"), ("stage_c", "run_c")]
    with pytest.raises(KeyError, match="stage_a:missing is not defined under"):
        code_digest.code_digest(["stage_a:missing"], root)


@pytest.mark.parametrize("label", ["docstrings", "comments", "type hints", "error message", "reporting", "imports"])
def test_edits_that_change_no_computation_change_no_digest(tmp_path, label):
    files = {
        "docstrings": edit(edit(TREE, "ops.py", '"""Return twice x."""', '"""Return 2 x (reworded)."""'),
                           "stage_a.py", '    """Stage a."""\n', ""),
        "comments": edit(TREE, "ops.py", "    return x * SCALE\n", "    # scaled\n    return x * SCALE  # see SCALE\n"),
        "type hints": edit(TREE, "ops.py", "def double(x: int) -> int:", "def double(x: float | int) -> float:"),
        "error message": edit(TREE, "ops.py", 'f"negative: {x}"', '"x must not be negative"'),
        "reporting": edit(TREE, "report.py", 'print("value", x)', 'print(f"value {x!r}")'),
        "imports": edit(TREE, "stage_a.py", "from .ops import double\n", "from .ops import SCALE, double  # both\n"),
    }[label]
    assert changed(tmp_path, files) == set()


def test_a_module_renamed_or_moved_into_a_subpackage_changes_no_digest(tmp_path):
    renamed = {("arithmetic.py" if name == "ops.py" else name): text.replace(".ops", ".arithmetic")
               .replace("import ops", "import arithmetic as ops") for name, text in TREE.items()}
    assert changed(tmp_path, renamed) == set()
    moved = {("core/ops.py" if name == "ops.py" else name): text.replace("from .ops", "from .core.ops")
             .replace("from . import ops", "from .core import ops") for name, text in TREE.items()}
    moved["core/__init__.py"] = '"""Moved here."""\n'
    assert changed(tmp_path, moved) == set()


@pytest.mark.parametrize(("file", "old", "new", "stages"), [
    ("ops.py", "return x * SCALE", "return SCALE * x + 0", {"a", "c"}),  # the code both stages call
    ("ops.py", "SCALE = 2", "SCALE = 3", {"a", "c"}),  # a constant it reads
    ("ops.py", "return x - 1", "return x - 2", {"b"}),  # another function of the same module
    ("ops.py", "raise ValueError", "raise TypeError", {"a", "c"}),  # which exception, not its message
    ("stage_a.py", "double(x) + 1", "double(x) + 2", {"a"}),
    ("stage_c.py", "double(x) * 3", "double(x) * 4", {"c"}),
])
def test_a_computation_change_changes_exactly_the_stages_that_run_it(tmp_path, file, old, new, stages):
    assert changed(tmp_path, edit(TREE, file, old, new)) == stages


def test_a_module_level_side_effect_counts_for_the_stages_that_reach_its_module(tmp_path):
    files = edit(TREE, "ops.py", "SCALE = 2\n", "SCALE = 2\nprint('configured')\n")
    assert changed(tmp_path, files) == {"a", "b", "c"}


# --- the real core -------------------------------------------------------------------------------------------------


@pytest.fixture
def core_copy(tmp_path) -> Path:
    """A copy of the installed ``harmonize_core`` sources to edit."""
    target = tmp_path / "harmonize_core"
    shutil.copytree(code_digest.CORE_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def insert_into(path: Path, name: str, line: str = "_edited = 1") -> None:
    """Insert ``line`` as the first statement (after the docstring) of the top-level definition ``name``."""
    text = path.read_text()
    node = next(n for n in ast.parse(text).body if getattr(n, "name", None) == name)
    first = node.body[1] if code_digest._is_docstring(node.body[0]) and len(node.body) > 1 else node.body[0]
    lines = text.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + line + "\n")
    path.write_text("".join(lines))


def test_the_stage_roots_exist_and_the_copy_matches_the_installed_core(core_copy):
    assert set(code_digest.STAGE_ROOTS) == STAGE_SET
    assert code_digest.stage_code_digests(core_copy) == code_digest.installed_code_digests()
    assert code_digest.stage_roots("dilate")[-1] == "passes.stages:dilate"


# (dotted module under the core, top-level definition edited) -> the stages whose digest changes
CORE_EDITS = [
    ("passes.masks", "dilate_mask", {"dilate"}),
    ("passes.masks", "feather_mask", {"blend", "pass2"}),  # pass 2 ends with the blend
    ("images", "quantize", STAGE_SET),  # every stage stores 8-bit images
    ("losses.terms", "masked_gram", {"pass1", "pass2"}),
    ("losses.histogram", "remap_histogram", {"pass2"}),
    ("passes.tau", "estimate_tau", {"pass2"}),
    ("network.vgg", "build_features", {"pass1", "pass2"}),
    ("network.weights", "normalize_state_dict", {"pass1", "pass2"}),
    ("postprocess.reconstruct", "reconstruct", {"reconstruct"}),
    ("quality.scores", "quality_scores", {"reconstruct"}),  # the scores are computed in the reconstruct stage
    ("passes.stages", "pass2", {"pass2"}),  # another stage's function in the same module changes nothing else
    ("passes.stages", "harmonize", set()),  # the in-memory driver: the tasks call the stages one by one
    ("optimisation.progress", "Iterate", set()),  # progress events
    ("optimisation.progress", "stage_record", set()),  # the metrics record
    ("optimisation.lbfgs", "ProgressLog", set()),  # loss curves for the report
    ("network.weights", "describe_network", set()),
    ("config", "HarmonizeConfig", set()),  # settings count through their values in the key, not the class
    ("estimate", "stage_seconds", set()),
]


def test_edits_to_the_real_core_change_exactly_the_stages_that_run_the_edited_code(core_copy):
    before = code_digest.stage_code_digests(core_copy)
    for module, name, stages in CORE_EDITS:
        path = core_copy.joinpath(*module.split(".")).with_suffix(".py")
        original = path.read_text()
        insert_into(path, name)
        after = code_digest.stage_code_digests(core_copy)
        path.write_text(original)
        assert ({stage for stage in before if before[stage] != after[stage]}, module, name) == (stages, module, name)


def test_docstrings_comments_and_module_moves_in_the_real_core_change_no_digest(core_copy):
    before = code_digest.stage_code_digests(core_copy)
    edits = 0
    for path in core_copy.rglob("*.py"):  # reword docstrings, add comments
        text = path.read_text()
        edits += text.count('"""Return ')
        path.write_text(text.replace('"""Return ', '"""Returns ') + "\n# an edit\n")
    assert edits > 100
    # passes/masks.py moves into another sub-package (its relative imports keep their level), histogram is renamed
    (core_copy / "ops").mkdir()
    (core_copy / "ops" / "__init__.py").write_text('"""Mask operations."""\n')
    (core_copy / "passes" / "masks.py").rename(core_copy / "ops" / "masks.py")
    (core_copy / "losses" / "histogram.py").rename(core_copy / "losses" / "histogram_matching.py")
    for path in core_copy.rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("from .masks import", "from ..ops.masks import")
                        .replace(".losses.histogram import", ".losses.histogram_matching import"))
    assert code_digest.stage_code_digests(core_copy) == before


def test_a_pipeline_change_keeps_every_key_and_a_core_change_moves_only_its_stage():
    config = preset("quick")
    inputs = {"content": "c", "style": "s", "mask": "m"}
    keys = {stage: caching.stage_cache_key(stage, inputs, config, "w") for stage in STAGES}
    # tasks/, flows/ and manifests/ are not hashed at all: the installed digests are the only code input.
    installed = code_digest.installed_code_digests()
    assert keys == {stage: caching.stage_cache_key(stage, inputs, config, "w", code=installed[stage])
                    for stage in STAGES}
    moved = caching.stage_cache_key("pass2", inputs, config, "w", code="another core")
    assert moved != keys["pass2"]
