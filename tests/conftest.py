"""Shared fixtures: a tiny LightningModule and a way to compare states exactly."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from same_state import assert_same  # noqa: E402  (tests import it by name; conftest is not importable as one)
from tiny import TinyModel, tiny_loader  # noqa: E402  (shared with the subprocess scripts)

__all__ = ["TinyModel", "assert_same", "tiny_loader"]


@pytest.fixture
def same():
    return assert_same


def _s3_server():
    """A real S3 server (moto) on 127.0.0.1 with an empty bucket; reached through s3fs."""
    from s3server import ENV, S3Server

    with pytest.MonkeyPatch.context() as env:
        for key, value in ENV.items():
            env.setenv(key, value)
        server = S3Server()
        server.start()
        server.fs().mkdir(server.bucket)
        yield server
        server.stop()


s3 = pytest.fixture(_s3_server, name="s3")
s3_module = pytest.fixture(_s3_server, name="s3_module", scope="module")  # for a module's shared multi-rank job


# Where every test fails on a file handle left open (``ResourceWarning: unclosed file``), on success and on
# every error path: a damaged checkpoint must not leak one handle per attempt. A handle left open warns when
# it is garbage-collected, often outside any test, as an "unraisable exception" (pytest's
# PytestUnraisableExceptionWarning): an error there too, and a collection at teardown keeps it in its test.
_TESTS = Path(__file__).parent
STRICT_HANDLES = (_TESTS / "store", _TESTS / "format", _TESTS / "faults" / "test_corruption.py")
_STRICT_MARKS = (pytest.mark.filterwarnings("error::ResourceWarning"),
                 pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"))


def _strict_handles(path: Path) -> bool:
    return any(path == where or where in path.parents for where in STRICT_HANDLES)


def pytest_collection_finish(session: pytest.Session) -> None:
    if "childproc" in sys.modules and session.items:  # a collected test module starts training runs
        sys.modules["childproc"].warm_up()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _strict_handles(item.path):
            for mark in _STRICT_MARKS:
                item.add_marker(mark)


@pytest.fixture(autouse=True)
def _collect_garbage_where_handles_are_strict(request: pytest.FixtureRequest):
    """Collect at teardown, so a leaked handle warns inside the test that leaked it."""
    yield
    if _strict_handles(request.node.path):
        gc.collect()
        # What survived the collection is no garbage of this test: later collections skip it. A collection
        # of the whole heap (torch, Lightning, moto: ~500k objects) costs ~0.3 s a test, more under load;
        # one of what later tests allocated, milliseconds. What they leak is still collected in their own.
        gc.freeze()
