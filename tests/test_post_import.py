"""``lightning_ckpt.post_import``: a function runs once, right after a module is first imported, whenever that is;
the module keeps its own loader, and an import that fails leaves the watch for the next try."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_ckpt.post_import import when_imported


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # what a test leaves there goes with it
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("watched_")]:
        del sys.modules[name]


def test_runs_once_right_after_the_module_and_its_package_are_imported(package: Path) -> None:
    (package / "watched_pkg").mkdir()
    (package / "watched_pkg" / "__init__.py").write_text("import watched_pkg.sub\nVALUE = 7\n")
    (package / "watched_pkg" / "sub.py").write_text("X = 1\n")
    seen = []
    assert when_imported("watched_pkg", lambda: seen.append(sys.modules["watched_pkg"].VALUE)) is False
    assert when_imported("watched_pkg", lambda: seen.append("twice")) is False  # one watch per module
    assert seen == []
    import watched_pkg.sub  # noqa: F401  (a submodule first: the package runs whole, then the function)

    assert seen == [7]
    assert type(watched_pkg.__loader__).__name__ == "SourceFileLoader" and watched_pkg.__spec__.loader is watched_pkg.__loader__
    assert not any(type(f).__name__ == "_Watcher" and f.name == "watched_pkg" for f in sys.meta_path)
    assert when_imported("watched_pkg", lambda: seen.append("now")) is True
    assert seen == [7, "now"]


def test_a_failed_import_keeps_the_watch(package: Path) -> None:
    module = package / "watched_flaky.py"
    module.write_text("raise ImportError('not yet')\n")
    seen = []
    when_imported("watched_flaky", lambda: seen.append(1))
    with pytest.raises(ImportError, match="not yet"):
        import watched_flaky  # noqa: F401
    assert seen == []
    module.write_text("OK = True\n")
    import importlib

    importlib.invalidate_caches()
    import watched_flaky  # noqa: F401,F811

    assert seen == [1]
