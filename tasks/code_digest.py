"""Which version of the algorithm produced a stage: a digest of the core's source that decides its pixels.

``harmonize_core.__version__`` is a label people forget to bump, so cache keys use this instead: for each stage,
the sha256 of the source files of the core modules the stage's output depends on. An upgrade that changes the
algorithm (say ``pass2.py`` or ``losses.py``) changes the digests of the stages that import it, directly or not,
and only those recompute; an upgrade that changes only the pipeline layer (``tasks/``, ``flows/``, ``manifests/``)
or the core's CLI, demo data or file helpers changes no digest, so every cached stage stays a hit.

The dependency closure is read from the modules' own relative imports (``from .losses import ...``, module-level
or inside functions) with ``ast``, starting from each stage's root modules (``STAGE_ROOTS``). ``stages.py`` holds
the glue of every stage: its bytes count for every stage, but its lazy imports are not followed (they reach every
stage's modules).
"""

from __future__ import annotations

import ast
import hashlib
import threading
from functools import cache
from pathlib import Path

import harmonize_core

CORE_DIR = Path(harmonize_core.__file__).parent
GLUE_MODULE = "stages"
# The modules whose code computes each stage's output (their imports are followed).
STAGE_ROOTS: dict[str, tuple[str, ...]] = {
    "dilate": ("masks", "images"),
    "pass1": ("pass1", "images"),
    "blend": ("masks", "images"),
    "pass2": ("pass2", "tau", "images"),
    "reconstruct": ("postprocess", "quality", "images"),
}


def relative_imports(path: Path) -> set[str]:
    """Return the sibling module names a core module imports (``from .x import`` / ``from . import x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


def module_closure(roots: tuple[str, ...], package: Path = CORE_DIR) -> list[str]:
    """Return the sorted module names reachable from ``roots`` through relative imports (``stages`` not followed)."""
    seen: set[str] = set()
    todo = [name for name in roots if (package / f"{name}.py").is_file()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == GLUE_MODULE:
            continue
        todo.extend(dep for dep in relative_imports(package / f"{name}.py")
                    if (package / f"{dep}.py").is_file() and dep not in seen)
    return sorted(seen | {GLUE_MODULE})


def stage_code_digest(stage: str, package: Path = CORE_DIR) -> str:
    """Return the hex sha256 over the names and bytes of the core modules that decide ``stage``'s output."""
    digest = hashlib.sha256()
    for name in module_closure(STAGE_ROOTS[stage], package):
        digest.update(name.encode() + b"\0" + (package / f"{name}.py").read_bytes() + b"\0")
    return digest.hexdigest()


_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not safe to call from several threads at once


def installed_code_digests() -> dict[str, str]:
    """Return ``{stage: code digest}`` of the installed core (computed once per process, thread-safe)."""
    with _LOCK:
        return _installed()


@cache
def _installed() -> dict[str, str]:
    return {stage: stage_code_digest(stage) for stage in STAGE_ROOTS}
