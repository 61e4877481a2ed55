"""The layers import downwards only: the format, the stores, the engine and the sharded path never import
the converters, the CLI or the Lightning adapters that sit on top of them."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_ckpt

PACKAGE = Path(lightning_ckpt.__file__).parent
LOWER = ["errors.py", "engine.py", "format", "store", "distributed"]
UPPER = ("lightning_ckpt.convert", "lightning_ckpt.cli", "lightning_ckpt.lightning")


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # function-level imports included
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_the_lower_layers_never_import_an_upper_one():
    files = [f for part in LOWER
             for f in ([PACKAGE / part] if part.endswith(".py") else (PACKAGE / part).rglob("*.py"))]
    upward = [f"{f.relative_to(PACKAGE)}: {name}" for f in files for name in _imports(f)
              if name.startswith(UPPER)]
    assert upward == []
