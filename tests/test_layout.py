"""The package's shape stays the architecture docs/ARCHITECTURE.md draws: imports point down the layers
only, no two modules import each other (directly or in a ring), nothing below ``lightning/`` imports
Lightning, every module stays readable (about 400 lines at most), and no module reaches into another's
private attributes. Imports are read from the source with ``ast``, function-level ones included."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import lightning_ckpt

PACKAGE = Path(lightning_ckpt.__file__).parent
ROOT = "lightning_ckpt"

# Bottom to top: a module may import its own layer and those before it, never one after it.
LAYERS = [
    "errors", "format", "store", "policy", "history", "tiers", "distributed", "saving",
    "lightning.internals", "lightning.preemption", "lightning.loading", "lightning.exact", "lightning",
    "lightning.checkpointing", "lightning.rollback",
    "convert", "inspection", "cli", "",
]
# Third-party Lightning is imported by lightning/ alone: the layers below it serve plain PyTorch and the CLI.
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning")
MAX_LINES = 400
MAX_ROOT_MODULES = 6  # besides __init__.py and errors.py
# Private attributes of other libraries read outside lightning/internals/, each for a reason written down:
PRIVATE_READS_ALLOWED = {
    ("format/codec.py", "_metadata"),  # torch's state_dict keeps module versions on this attribute; we store it
    ("format/blob.py", "_TYPES"),  # safetensors' dtype names, so ours can never drift from theirs
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _internal(name: str) -> str | None:
    """The module of ours that an imported dotted name lives in, or None for another package."""
    if name != ROOT and not name.startswith(ROOT + "."):
        return None
    name = name[len(ROOT) + 1:]
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> list[str]:
    """Every module a file imports, in dotted form (``from a import b`` counts as ``a.b``: b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}"[len(ROOT) + 1:] in MODULES
                         else node.module for alias in node.names)
    return found


def _edges() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        edges[module] = {target for name in _imports(path) if (target := _internal(name)) not in (None, module)}
    return edges


def _layer(module: str) -> int:
    """The index of the longest layer name the module is in."""
    best = max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".") or layer == ""),
               key=len)
    return LAYERS.index(best)


def test_every_layer_names_a_module_of_the_tree():
    empty = [layer for layer in LAYERS if layer and not any(m == layer or m.startswith(layer + ".") for m in MODULES)]
    assert empty == []


def test_no_import_runs_up_a_layer():
    upward = [f"{module} ({LAYERS[_layer(module)] or 'root'}) imports {target} ({LAYERS[_layer(target)] or 'root'})"
              for module, targets in _edges().items() for target in targets if _layer(target) > _layer(module)]
    assert upward == [], "\n".join(upward)


def test_no_import_cycle():
    try:
        list(graphlib.TopologicalSorter(_edges()).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_only_lightning_adapters_import_lightning():
    below = [f"{module}: {name}" for module, path in MODULES.items() if not module.startswith("lightning")
             for name in _imports(path) if name.split(".")[0] in LIGHTNING_PACKAGES]
    assert below == [], below


def test_no_module_is_over_the_size_a_newcomer_reads_at_once():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_few_modules_lie_loose_at_the_package_root():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "errors.py"))
    assert len(loose) <= MAX_ROOT_MODULES, loose


def test_each_subpackage_says_what_it_owns_and_what_it_must_not_import():
    silent = [str(init.relative_to(PACKAGE)) for init in PACKAGE.rglob("__init__.py")
              if init.parent != PACKAGE and "import" not in (ast.get_docstring(ast.parse(init.read_text())) or "")]
    assert silent == []


def _private_reads(path: Path) -> list[tuple[int, str]]:
    """``obj._name`` and ``getattr(obj, "_name")`` on anything but ``self``/``cls``, where ``_name`` is not
    defined in this file (a class reading its own helpers is not reaching into another's)."""
    text = path.read_text()
    tree = ast.parse(text)
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    own |= {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")}
    own |= {t.id for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) for t in [n.target] if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        else:
            continue
        if name.startswith("_") and not name.startswith("__") and name not in own:
            found.append((node.lineno, name))
    return found


def test_private_attributes_are_read_only_in_lightning_internals():
    reads = [f"{path.relative_to(PACKAGE)}:{line}: {name}" for module, path in MODULES.items()
             if not module.startswith("lightning.internals")
             for line, name in _private_reads(path)
             if (str(path.relative_to(PACKAGE)), name) not in PRIVATE_READS_ALLOWED]
    assert reads == [], "\n".join(reads)


def test_lightning_internals_depend_on_nothing_of_ours_but_the_errors():
    # A Lightning release that moves an internal must break one folder, not the modules that use it.
    reach = {module: sorted(t for t in targets if t != "errors") for module, targets in _edges().items()
             if module.startswith("lightning.internals") and any(t != "errors" for t in targets)}
    assert reach == {}
