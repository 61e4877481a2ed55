"""Every test here fails on a file handle left open (``ResourceWarning: unclosed file``), on success
and on every error path: a damaged checkpoint must not leak one handle per attempt."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
# A handle left open warns when it is garbage-collected, often outside any test, where a warning is
# an "unraisable exception": pytest reports those as PytestUnraisableExceptionWarning, an error here too.
STRICT = [pytest.mark.filterwarnings("error::ResourceWarning"),
          pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:  # conftest hooks see every item of the session
            for mark in STRICT:
                item.add_marker(mark)


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Collect at teardown, so a leaked handle warns inside the test that leaked it."""
    yield
    gc.collect()
