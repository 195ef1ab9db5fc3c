"""Which version of the algorithm produced a stage: a digest of the core code that computes it, by meaning.

``harmonize_core.__version__`` is a label people forget to bump, so cache keys use this instead: for each stage,
a sha256 over the definitions of the core that the stage's computation reaches, each normalised so that only what
the code does counts.

- **What counts.** Starting from what a stage task runs of the core (``STAGE_ROOTS``: the input decoding and
  resizing, the stage function, the PNG encoding, and for the two passes the network loader), every top-level
  definition (function, class, constant) the code refers to, followed through the core's own imports to wherever
  it is defined, and so on. A module's top-level statements that bind no name (a call, an attribute set) count
  whenever the module is reached. Code outside the core (torch, kornia) is pinned by ``requirements.lock``.
- **What does not.** Docstrings, comments (not in the AST), type annotations of parameters and returns, the
  messages of raised exceptions, import statements and module names or paths: a module moved, renamed or split
  changes no digest, as long as the code it holds is the same. Definitions the stage never reaches (another
  stage's function, the CLI, the demo data, the in-memory driver ``harmonize``) count for nothing. A module or
  definition that only reports (progress events, metrics records) says so with ``REPORTING_ONLY = True`` (the
  whole module) or ``REPORTING_ONLY = ("Name", ...)``; the walk does not enter it.

So an upgrade that changes the computation of a stage (say ``passes/pass2.py`` or ``losses/terms.py``) changes that stage's digest
and only that one (the later stages' keys change through its new output's digest when its pixels change); a change
to the pipeline layer (``tasks/``, ``flows/``, ``manifests/``), to the CLI or the report, or a docstring, comment or
module move, changes none. The normalised form is written out field by field (not ``ast.dump``, whose text differs
between Python versions), so two machines of a fleet on different Python 3 versions agree.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import harmonize_core
from harmonize_core import images
from harmonize_core.network.vgg import load_backbone
from harmonize_core.passes import stages

CORE_DIR = Path(harmonize_core.__file__).parent
EXEMPT_MARK = "REPORTING_ONLY"
WHOLE_MODULE = "*"  # a reference to a module object as a whole
# AST fields that never change what code does, or that only some Python versions have
IGNORED_FIELDS = frozenset({"type_comment", "kind", "type_params", "type_ignores"})
COMPOUND = (ast.If, ast.Try, ast.With, ast.For, ast.While)

# What each stage task (``tasks.stages``) runs of the core: its input files decoded and brought to working size,
# the upstream stages' PNGs decoded, the stage itself, its PNG encoded, and the network for the two passes.
# Objects rather than names: wherever a function moves, its ``__module__`` says where its definition is.
_INPUTS: tuple[Callable, ...] = (images.decode_image, images.decode_mask, stages.prepare_inputs, images.encode_png)
_UPSTREAM_IMAGES: tuple[Callable, ...] = (images.decode_png_exact,)
STAGE_ROOTS: dict[str, tuple[Callable, ...]] = {
    "dilate": (*_INPUTS, stages.dilate),
    "pass1": (*_INPUTS, *_UPSTREAM_IMAGES, stages.pass1, load_backbone),
    "blend": (*_INPUTS, *_UPSTREAM_IMAGES, stages.blend),
    "pass2": (*_INPUTS, *_UPSTREAM_IMAGES, stages.pass2, load_backbone),
    "reconstruct": (*_INPUTS, *_UPSTREAM_IMAGES, stages.reconstruct),
}


def root_name(obj: Callable, package: str = harmonize_core.__name__) -> str:
    """Return ``"module:name"`` of a core object, the module relative to the package (``"stages:dilate"``)."""
    module = obj.__module__.removeprefix(package).lstrip(".")
    return f"{module}:{obj.__qualname__.split('.')[0]}"


def stage_roots(stage: str) -> tuple[str, ...]:
    """Return the ``"module:name"`` roots of ``stage``'s code digest (``STAGE_ROOTS``)."""
    return tuple(root_name(obj) for obj in STAGE_ROOTS[stage])


# --- reading a package ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One top-level statement, read: its normalised text and the ``(module, name)`` pairs it refers to."""

    text: str
    references: tuple[tuple[str, str], ...]


@dataclass
class Module:
    """One module of the package: its top-level statements by the names they bind, the statements that bind no
    name (side effects), its own imports of the package, and what it declares ``REPORTING_ONLY``."""

    name: str
    definitions: dict[str, list[Statement]] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local name -> (module, attribute)
    side_effects: list[Statement] = field(default_factory=list)
    exempt: bool | frozenset[str] = frozenset()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_bindings(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, package: str,
                     known: frozenset[str]) -> dict[str, tuple[str, str | None]]:
    """Return ``{local name: (package-relative module, attribute or None for the module itself)}`` of an import
    that names the package's own code; imports of other libraries bind nothing here."""
    bindings: dict[str, tuple[str, str | None]] = {}
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == package or alias.name.startswith(package + "."):
                target = alias.name.removeprefix(package).lstrip(".")
                bindings[alias.asname or alias.name.split(".")[0]] = (target if alias.asname else "", None)
        return bindings
    if node.level:
        parts = module.split(".") if module else []
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    elif node.module and (node.module == package or node.module.startswith(package + ".")):
        base = node.module.removeprefix(package).lstrip(".")
    else:
        return bindings
    for alias in node.names:
        submodule = f"{base}.{alias.name}" if base else alias.name
        bindings[alias.asname or alias.name] = (submodule, None) if submodule in known else (base, alias.name)
    return bindings


def _bound_names(node: ast.stmt) -> list[str]:
    """Return the names a top-level statement binds (functions, classes, assignments, inside compound statements)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [name.id for target in targets for name in ast.walk(target)
                if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store)]
    if isinstance(node, COMPOUND):
        return [name for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)
                for name in _bound_names(child)]
    return []


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _exempt(tree: ast.Module) -> bool | frozenset[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == EXEMPT_MARK for t in node.targets):
            value = ast.literal_eval(node.value)
            return value is True or frozenset(value if isinstance(value, (tuple, list)) else ())
    return frozenset()


@lru_cache(maxsize=512)
def read_module(text: str, name: str, is_package: bool, package: str, known: frozenset[str]) -> Module:
    """Return the ``Module`` read from a module's source ``text`` (cached by text: unchanged files are read once)."""
    tree = ast.parse(text)
    module = Module(name, exempt=_exempt(tree))
    for node in tree.body:
        imports = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for statement in imports:  # module level, or in a top-level if/try (TYPE_CHECKING, fallbacks)
                module.imports.update(_import_bindings(statement, name, is_package, package, known))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_docstring(node):
            continue
        bound = _bound_names(node)
        inner_imports = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if not bound and inner_imports:
            continue  # a top-level ``if TYPE_CHECKING:`` or ``try: import ...`` block of imports
        local: dict[str, tuple[str, str | None]] = {}  # imports inside a function bind names for it alone
        for inner in inner_imports:
            local.update(_import_bindings(inner, name, is_package, package, known))
        tree_node = _Normaliser().visit(node)  # in place: this tree was parsed for this reading only
        read = Statement(canonical(tree_node), tuple(_references(module, tree_node, local)))
        for bound_name in bound:
            module.definitions.setdefault(bound_name, []).append(read)
        if not bound:
            module.side_effects.append(read)
    return module


def read_package(root: Path) -> dict[str, Module]:
    """Return every module under ``root`` (a package folder), keyed by its dotted name relative to ``root``."""
    paths = {_module_name(path, root): path for path in sorted(root.rglob("*.py")) if "__pycache__" not in path.parts}
    known = frozenset(paths)
    return {name: read_module(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", root.name, known)
            for name, path in paths.items()}


# --- normalising and following a definition -------------------------------------------------------------------------
class _Normaliser(ast.NodeTransformer):
    """Drops what never changes what code does: docstrings, imports, annotations of parameters and returns, and the
    message of a raised exception (which exception, and when, still count)."""

    def _strip(self, node: ast.AST) -> ast.AST:
        body = getattr(node, "body", None)
        if body and _is_docstring(body[0]):
            node.body = body[1:]
        return self.generic_visit(node)

    visit_Module = visit_ClassDef = _strip

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.returns = None
        return self._strip(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.annotation = None
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        if isinstance(node.exc, ast.Call):
            node.exc = ast.Call(func=node.exc.func, args=[], keywords=[])
        return self.generic_visit(node)

    def visit_Import(self, node: ast.AST) -> None:
        return None

    visit_ImportFrom = visit_Import


def canonical(node: object) -> str:
    """Return a Python-version-independent text of a (normalised) AST: node types and their non-empty fields."""
    if isinstance(node, ast.AST):
        fields = []
        for name in node._fields:
            value = getattr(node, name, None)
            if name in IGNORED_FIELDS or value is None or value == []:
                continue
            fields.append(f"{name}={canonical(value)}")
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(canonical(item) for item in node) + "]"
    return repr(node)


class _References(ast.NodeVisitor):
    """Collects the names a statement reads (not in annotations) and ``alias.attribute`` uses of module aliases."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.attributes: set[tuple[str, str]] = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and isinstance(node.value.ctx, ast.Load):
            self.attributes.add((node.value.id, node.attr))
        else:
            self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        for child in (node.target, node.value):
            if child is not None:
                self.visit(child)


def _references(module: Module, tree: ast.stmt, local: dict[str, tuple[str, str | None]]) -> list[tuple[str, str]]:
    """Return the ``(module, name)`` pairs a normalised statement of ``module`` refers to; ``(module, "*")`` stands
    for every definition of a module used as a whole."""
    refs = _References()
    refs.visit(tree)
    found: list[tuple[str, str]] = []
    for alias, attribute in sorted(refs.attributes):
        target = local.get(alias) or module.imports.get(alias)
        if target is not None and target[1] is None:  # ``module_alias.name``: that name of that module only
            found.append((target[0], attribute))
        else:
            refs.names.add(alias)
    for name in sorted(refs.names):
        target = local.get(name)
        if target is None:
            found.append((module.name, name))
        else:
            found.append((target[0], target[1] or WHOLE_MODULE))
    return found


class Closure:
    """The definitions a set of roots reaches in one package, and their digest."""

    def __init__(self, modules: dict[str, Module]) -> None:
        self.modules = modules
        self.included: dict[tuple[str, str], list[str]] = {}  # (module, name) -> normalised texts
        self._modules_reached: set[str] = set()

    def add(self, module: str, name: str) -> None:
        """Include the definition ``name`` of ``module`` (following imports and re-exports) and all it reaches."""
        todo = [(module, name)]
        while todo:
            for key in self.resolve(*todo.pop()):
                if key in self.included:
                    continue
                read = list(self.modules[key[0]].definitions[key[1]])
                if key[0] not in self._modules_reached:  # a module's side effects count once it is reached
                    self._modules_reached.add(key[0])
                    read += self.modules[key[0]].side_effects
                self.included[key] = [statement.text for statement in read]
                for statement in read:
                    todo.extend(statement.references)

    def resolve(self, module: str, name: str, depth: int = 0) -> list[tuple[str, str]]:
        """Return the definitions ``module.name`` stands for: its own, an import's target, or a whole module."""
        source = self.modules.get(module)
        if source is None or depth > len(self.modules) or source.exempt is True:
            return []
        if name == WHOLE_MODULE:
            return [(module, defined) for defined in source.definitions if defined not in source.exempt]
        if name in source.definitions:
            return [] if name in source.exempt else [(module, name)]
        if name in source.imports:
            target, attribute = source.imports[name]
            return self.resolve(target, attribute or WHOLE_MODULE, depth + 1)
        return []

    def digest(self) -> str:
        """Return the hex sha256 over the included definitions' normalised texts (order- and location-free)."""
        texts = sorted({hashlib.sha256(text.encode()).hexdigest() for texts in self.included.values() for text in texts})
        return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def closure(roots: Iterable[str], package: Path = CORE_DIR) -> Closure:
    """Return the ``Closure`` of ``"module:name"`` roots in the package folder ``package``."""
    result = Closure(read_package(package))
    for root in roots:
        module, _, name = root.partition(":")
        if not result.resolve(module, name):
            raise KeyError(f"code digest root {root} is not defined under {package}")
        result.add(module, name)
    return result


def code_digest(roots: Iterable[str], package: Path = CORE_DIR) -> str:
    """Return the hex sha256 of the code that ``"module:name"`` roots reach in the package at ``package``."""
    return closure(roots, package).digest()


def stage_code_digests(package: Path = CORE_DIR) -> dict[str, str]:
    """Return ``{stage: code digest}`` of the core sources at ``package`` (the installed core by default)."""
    return {stage: closure(stage_roots(stage), package).digest() for stage in STAGE_ROOTS}


def stage_code_digest(stage: str, package: Path = CORE_DIR) -> str:
    """Return the hex sha256 of the core code that decides ``stage``'s output (see the module docstring)."""
    return closure(stage_roots(stage), package).digest()


_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not safe to call from several threads at once


def installed_code_digests() -> dict[str, str]:
    """Return ``{stage: code digest}`` of the installed core (computed once per process, thread-safe)."""
    with _LOCK:
        return _installed()


@cache
def _installed() -> dict[str, str]:
    return stage_code_digests(CORE_DIR)
