"""The private members of Lightning's base classes that ours override or call (docs/INTERNALS.md): each
test fails loudly when a Lightning release renames one or stops calling it."""

from __future__ import annotations

import inspect

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from lightning_ckpt import Checkpointer


def test_ckpt_path_last_still_asks_the_checkpoint_callback_for_its_last_checkpoints():
    # Checkpointer answers through ModelCheckpointView._find_last_checkpoints, which replaces ModelCheckpoint's.
    assert callable(ModelCheckpoint._find_last_checkpoints)
    assert "_find_last_checkpoints" in inspect.getsource(_CheckpointConnector._parse_ckpt_path)
    assert Checkpointer._find_last_checkpoints is not ModelCheckpoint._find_last_checkpoints


def test_callbacks_still_build_their_state_key_with_generate_state_key():
    # Checkpointer.state_key calls it so that two Checkpointers of one Trainer keep apart as ModelCheckpoints do.
    assert "**kwargs" in str(inspect.signature(Callback._generate_state_key))
    key = Checkpointer(dirpath="/tmp/a", every_n_steps=1).state_key
    assert key.startswith("Checkpointer{") and "'/tmp/a'" in key
