"""Shared fixtures: a tiny LightningModule and a way to compare states exactly."""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from tiny import TinyModel, tiny_loader  # noqa: E402  (shared with the subprocess scripts)

__all__ = ["TinyModel", "tiny_loader"]


def assert_same(a: object, b: object, path: str = "checkpoint") -> None:
    """Bit-exact and type-exact equality of two nested states."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata differs"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


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
