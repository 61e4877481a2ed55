"""torchdata's ``StatefulDataLoader`` state layout: the flag that says its iterator ran to its end.

Checked with torchdata 0.11; ``tests/exact/test_streaming_resume.py::test_a_finished_state_starts_the_next_epoch``
fails when a release moves it.
"""

from __future__ import annotations

from typing import Any

# torchdata 0.11: StatefulDataLoader.state_dict()["_iterator_finished"] (stateful_dataloader._ITERATOR_FINISHED),
# in the states of both its single-process and its worker iterators.
ITERATOR_FINISHED = "_iterator_finished"


def as_finished(state: Any) -> dict[str, Any] | None:
    """``state`` of a loader that yielded its epoch's last batch, marked as run to its end, so that the
    loader it is loaded into starts the next epoch at its next ``iter()`` (its sampler's generator moved
    on as after that epoch), instead of resuming an epoch with nothing left. None if not torchdata's layout.

    Lightning stops a sized loader's epoch after its last batch without asking for another, so the
    flag is never set in the state it saves: a resume from an epoch-end save trains an empty epoch.
    """
    if not (isinstance(state, dict) and isinstance(state.get(ITERATOR_FINISHED), bool)):
        return None
    return {**state, ITERATOR_FINISHED: True}
