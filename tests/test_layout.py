"""The package's shape stays the architecture docs/ARCHITECTURE.md draws: imports point down the layers
only, no two modules import each other (directly or in a ring), nothing outside ``lightning/`` imports
Lightning, every module stays readable (about 400 lines at most), and no module reaches into another's
private attributes. Imports are read from the source with ``ast``: function-level and relative ones,
and ``importlib.import_module("...")`` with a literal name, included."""

from __future__ import annotations

import ast
import graphlib
import importlib
import inspect
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
# What a layer must not import although the order would allow it (each subpackage's docstring says so).
NOT_IMPORTED = {
    "policy": {"errors", "format", "store"},  # pure decisions: nothing of ours but other policies
    "distributed": {"policy", "history", "tiers"},
    "lightning.internals": {layer for layer in LAYERS if layer not in ("errors", "lightning.internals", "")},
}
# Lightning and its own packages are imported by lightning/ alone: the rest serves plain PyTorch and the CLI.
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics")
MAX_LINES = 400
MAX_ROOT_MODULES = 6  # besides __init__.py and errors.py
# Private attributes of other libraries read outside lightning/internals/, each for a reason written down
# (and listed in docs/INTERNALS.md where it is torch's):
PRIVATE_READS_ALLOWED = {
    ("format/codec.py", "_metadata"),  # torch's state_dict keeps module versions on this attribute; we store it
    ("format/blob.py", "_TYPES"),  # safetensors' dtype names, so ours can never drift from theirs
    ("distributed/state_broadcast.py", "_fields"),  # a named tuple's fields: documented public API despite the "_"
}
# Private members of a Lightning base class that ours override or call on ``self``, each in docs/INTERNALS.md:
PRIVATE_INHERITED_ALLOWED = {
    "ModelCheckpointView._find_last_checkpoints",  # ModelCheckpoint's, which "last" for ckpt_path= calls
    "Checkpointer._generate_state_key",  # Callback's, so two Checkpointers of a Trainer have keys as ModelCheckpoints do
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


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module> import ...`` refers to, for relative imports too."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = [ROOT, *[p for p in package if p]][: len(package) + 2 - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[str]:
    """Every module a file imports, in dotted form (``from a import b`` counts as ``a.b``: b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            found.extend(f"{source}.{alias.name}" if f"{source}.{alias.name}"[len(ROOT) + 1:] in MODULES else source
                         for alias in node.names)
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(node.args[0].value)
    return found


def _edges() -> dict[str, set[str]]:
    return {module: {target for name in _imports(module, path) if (target := _internal(name)) not in (None, module)}
            for module, path in MODULES.items()}


def _layer_name(module: str) -> str:
    """The longest layer name the module is in."""
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".") or layer == ""), key=len)


def _layer(module: str) -> int:
    return LAYERS.index(_layer_name(module))


def test_every_layer_names_a_module_of_the_tree():
    empty = [layer for layer in LAYERS if layer and not any(m == layer or m.startswith(layer + ".") for m in MODULES)]
    assert empty == []


def test_no_import_runs_up_a_layer():
    upward = [f"{module} ({_layer_name(module) or 'root'}) imports {target} ({_layer_name(target) or 'root'})"
              for module, targets in _edges().items() for target in targets if _layer(target) > _layer(module)]
    assert upward == [], "\n".join(upward)


def test_no_layer_imports_what_its_docstring_forbids():
    found = [f"{module} imports {target}" for module, targets in _edges().items()
             for target in targets if _layer_name(target) in NOT_IMPORTED.get(_layer_name(module), ())]
    assert found == [], "\n".join(found)


def test_no_import_cycle():
    try:
        list(graphlib.TopologicalSorter(_edges()).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_only_lightning_adapters_import_lightning():
    # Directly, or through an adapter of ours (which imports Lightning).
    below = [f"{module}: {name}" for module, path in MODULES.items() if module.split(".")[0] not in ("lightning", "")
             for name in _imports(module, path)
             if name.split(".")[0] in LIGHTNING_PACKAGES or (_internal(name) or "").split(".")[0] == "lightning"]
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
    """``obj._name`` and ``getattr(obj, "_name")`` / ``hasattr`` (the name a literal or a module constant such
    as ``_ATTR = "_name"``) on anything but ``self``/``cls`` or a class this file defines (a class reading its
    own helpers is not reaching into another's)."""
    tree = ast.parse(path.read_text())
    mine = {"self", "cls", *(n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef))}
    constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id in mine):
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and not (isinstance(node.args[0], ast.Name) and node.args[0].id in mine)):
            arg = node.args[1]
            name = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""), "")
        else:
            continue
        if isinstance(name, str) and name.startswith("_") and not name.startswith("__"):
            found.append((node.lineno, name))
    return found


def test_private_attributes_are_read_only_in_lightning_internals():
    reads = [f"{path.relative_to(PACKAGE)}:{line}: {name}" for module, path in MODULES.items()
             if not module.startswith("lightning.internals")
             for line, name in _private_reads(path)
             if (str(path.relative_to(PACKAGE)), name) not in PRIVATE_READS_ALLOWED]
    assert reads == [], "\n".join(reads)


def _inherited_private_uses(module: str) -> set[str]:
    """Private names of a Lightning base class that our subclasses (or their mixins) define or use on ``self``."""
    loaded = importlib.import_module(f"{ROOT}.{module}")
    found = set()
    for cls in vars(loaded).values():
        if not (inspect.isclass(cls) and cls.__module__ == loaded.__name__):
            continue
        ours = [c for c in cls.__mro__ if c.__module__.startswith(ROOT)]
        theirs = {name for c in cls.__mro__ if c not in ours and c is not object for name in vars(c)
                  if name.startswith("_") and not name.startswith("__") and name not in _ABC_NAMES}
        for c in ours:
            found |= {f"{c.__qualname__}.{name}" for name in vars(c) if name in theirs}
        ours_names = {name for c in ours for name in vars(c)}
        tree = ast.parse(inspect.getsource(cls))
        found |= {f"{cls.__qualname__}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                  and node.attr in theirs and node.attr not in ours_names}
    return found


_ABC_NAMES = {"_abc_impl"}  # abc's bookkeeping on every ABC subclass


def test_private_methods_of_lightning_are_overridden_or_called_only_where_docs_list_them():
    uses = set().union(*(_inherited_private_uses(m) for m in MODULES if m.split(".")[0] == "lightning"))
    assert uses == PRIVATE_INHERITED_ALLOWED
    internals = (PACKAGE.parent / "docs" / "INTERNALS.md").read_text()
    assert [name for name in uses if name.rsplit(".", 1)[-1] not in internals] == []


def test_lightning_internals_depend_on_nothing_of_ours_but_the_errors():
    # A Lightning release that moves an internal must break one folder, not the modules that use it.
    reach = {module: sorted(t for t in targets if t != "errors") for module, targets in _edges().items()
             if module.startswith("lightning.internals") and any(t != "errors" for t in targets)}
    assert reach == {}


def test_private_modules_and_names_of_other_packages_are_imported_only_in_lightning_internals():
    found = []
    for module, path in MODULES.items():
        if module.startswith("lightning.internals"):
            continue
        for name in _imports(module, path):
            if _internal(name) is None and any(p.startswith("_") and not p.startswith("__") for p in name.split(".")):
                found.append(f"{module}: {name}")
    assert found == []
