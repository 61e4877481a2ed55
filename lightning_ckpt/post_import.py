"""Run a function once a module has been imported, whenever that happens: a post-import hook.

``import lightning_ckpt`` before ``import lightning`` must still let ``MyModel.load_from_checkpoint(dir)`` read
our directories, yet importing ``lightning_ckpt`` must stay cheap (the CLI imports neither torch nor Lightning).
So the package leaves a finder on ``sys.meta_path`` (the standard post-import hook technique): it finds nothing
itself, but when the watched module is imported it asks the other finders for its spec and wraps that spec's
loader, so that the function runs right after the module's code has run. Then the finder leaves ``sys.meta_path``
and the module's own loader is put back on it.

Imports nothing of ours and nothing but the standard library: the root ``__init__`` passes the function.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _Watcher:
    """A ``sys.meta_path`` finder that wraps the loader of one module, once."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name = name
        self.then = then
        self._searching = False

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if fullname != self.name or self._searching:
            return None
        self._searching = True  # the other finders may ask the whole meta path again
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, self)
        return spec

    def fired(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.then()


class _Loader:
    """The module's own loader, and the watcher's function after its ``exec_module``."""

    def __init__(self, loader: Any, watcher: _Watcher) -> None:
        self.loader = loader
        self.watcher = watcher

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)  # raises as the import would: the watcher stays for a retry
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.watcher.fired()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: the module's own loader's
        return getattr(self.loader, name)


def when_imported(name: str, then: Callable[[], None]) -> bool:
    """Call ``then()`` once, right after module ``name`` is first imported (now if it is imported already).

    Returns:
        True when ``then`` ran now, False when it waits for the import.
    """
    if name in sys.modules:
        then()
        return True
    if not any(isinstance(f, _Watcher) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _Watcher(name, then))
    return False
