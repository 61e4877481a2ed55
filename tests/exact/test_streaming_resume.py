"""Streaming data resumes exactly under the Checkpointer (issue 20 item 7): a stateful
``IterableDataset`` read by a plain ``DataLoader`` and torchdata's ``StatefulDataLoader`` (0 and 2
workers), each killed with SIGKILL mid-epoch and resumed with ``ckpt_path="last"``.

The data: ``train_script``'s 48 noisy points, batch size 4, 2 epochs (24 batches); the Checkpointer
saves every 7 steps, so "last" is step 14 (epoch 1, batch 2) when the run is killed after batch 19.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from exact_harness import Runner, assert_same_training

_OPTS = {"max_epochs": 2, "checkpointer": {"every_n_steps": 7}}
NOT_EXACT = "cannot be exact"


def _kill_and_resume(runner: Runner, opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    reference, crashed = runner.run(opts, {**opts, "crash_at_batch": 19, "crash_signal": "SIGKILL"})
    assert crashed.returncode == -signal.SIGKILL, crashed.output[-3000:]
    (resumed,) = runner.run({**opts, "ckpt_path": "last", "ckpt_dir": str(crashed.ckpt_dir)})
    return reference, crashed, resumed


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("data", "num_workers"), [("stream", 0), ("stateful_loader", 0), ("stateful_loader", 2),
                                                  ("unsized_stream_loader", 0)],
                         ids=["stateful_iterable", "stateful_loader_0_workers", "stateful_loader_2_workers",
                              "stateful_loader_over_an_unsized_stream"])
def test_streaming_data_resumes_exactly_after_a_kill(runner: Runner, data: str, num_workers: int) -> None:
    reference, crashed, resumed = _kill_and_resume(runner, {**_OPTS, "data": data, "num_workers": num_workers})
    assert "Restoring states from the checkpoint path at" in resumed.output and "step=000000014" in resumed.output
    assert_same_training(reference, crashed, resumed, crashed_code=-signal.SIGKILL)
    records = resumed.records()
    assert records["audit"]["status"] == "exact", records["audit"]
    assert not [w for w in records["warnings"] if NOT_EXACT in w or "not resumable" in w], records["warnings"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("data", ["stream", "stateful_loader"])
def test_a_save_at_an_epoch_end_resumes_with_the_next_epoch(runner: Runner, data: str) -> None:
    """Saved after epoch 0's last batch (step 12): stock Lightning would resume a StatefulDataLoader in an
    epoch with nothing left (an empty epoch 1), and a dataset's own epoch counter from its start."""
    opts = {**_OPTS, "checkpointer": {"every_n_steps": 12}, "data": data}
    reference, crashed, resumed = _kill_and_resume(runner, opts)
    assert "step=000000012" in resumed.output
    assert_same_training(reference, crashed, resumed, crashed_code=-signal.SIGKILL)
    assert resumed.records()["audit"]["status"] == "exact", resumed.records()["audit"]


def test_a_finished_state_starts_the_next_epoch() -> None:
    """Guard for ``torchdata_state.as_finished`` (torchdata's private state key): a sized loader's state after
    its epoch's last batch, marked finished, makes a new loader start the next epoch as the first one would."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lightning_ckpt.lightning.internals.torchdata_state import as_finished

    def loader() -> StatefulDataLoader:
        torch.manual_seed(5)  # its sampler's own generator is seeded from torch's
        return StatefulDataLoader(list(range(12)), batch_size=3, shuffle=True)

    first = loader()
    epoch0 = [batch.tolist() for _, batch in zip(range(4), iter(first))]  # as Lightning stops: no StopIteration
    state = as_finished(first.state_dict())
    assert state is not None
    epoch1 = [batch.tolist() for batch in first]
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == epoch1 != epoch0
    assert as_finished({"other": "layout"}) is None


@pytest.mark.timeout(300)
def test_a_stream_without_state_gets_the_one_notice(runner: Runner) -> None:
    reference, crashed, resumed = _kill_and_resume(runner, {**_OPTS, "data": "stateless_stream"})
    assert resumed.returncode == 0, resumed.output[-3000:]
    notices = [w for w in resumed.records()["warnings"] if NOT_EXACT in w]
    assert len(notices) == 1, resumed.records()["warnings"]
    assert "IterableDataset without state_dict" in notices[0]


@pytest.mark.timeout(300)
def test_an_unsized_stateful_stream_is_restored_with_the_notice(runner: Runner) -> None:
    """Read ahead by Lightning, its batch after the save drew noise a resume cannot replay: it says so, once."""
    reference, crashed, resumed = _kill_and_resume(runner, {**_OPTS, "data": "unsized_stream"})
    assert resumed.returncode == 0, resumed.output[-3000:]
    notices = [w for w in resumed.records()["warnings"] if NOT_EXACT in w]
    assert len(notices) == 1 and "has no __len__" in notices[0], resumed.records()["warnings"]
    # The position is restored: the resumed run trains the batches the reference trained after the save.
    assert sorted(resumed.records()["losses"], key=int) == [str(n) for n in range(15, 25)]


@pytest.mark.timeout(60)
def test_dropping_a_stateful_loaders_iterator_stops_its_workers() -> None:
    """Guard for ``drop_persistent_iterator`` on torchdata's iterator (a private class and method)."""
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lightning_ckpt.lightning.internals.dataloader import drop_persistent_iterator

    loader = StatefulDataLoader(torch.utils.data.TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=1,
                                persistent_workers=True)
    next(iter(loader))
    workers = list(loader._iterator._workers)
    assert workers and all(w.is_alive() for w in workers)
    drop_persistent_iterator(loader)
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
