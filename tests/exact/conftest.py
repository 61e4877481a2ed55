"""The session-wide runner of training subprocesses (see ``exact_harness``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from exact_harness import Runner


@pytest.fixture(scope="session")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    yield Runner(tmp_path_factory.mktemp("exact_runs"))
