"""Callbacks the ``Checkpointer`` brings along when the Trainer lacks them."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


def ensure_exact_resume(trainer: L.Trainer) -> None:
    """Give the Trainer an ExactResume (unless it has one) that acts before every checkpoint callback."""
    from lightning_ckpt.lightning.exact.exact_resume import ExactResume

    exact = next((cb for cb in trainer.callbacks if isinstance(cb, ExactResume)), None)
    added, exact = exact is None, exact or ExactResume()
    others = [cb for cb in trainer.callbacks if cb is not exact]
    first_saver = next((i for i, cb in enumerate(others) if isinstance(cb, Checkpoint)), len(others))
    # It restores what a save on the first batch after a resume reads (the epoch's logged sums), so its
    # batch hooks must run before any saver's. A new list, not an insert: Lightning is running the setup
    # hooks over the old one, and an insert before this callback would run this setup a second time.
    trainer.callbacks = [*others[:first_saver], exact, *others[first_saver:]]
    if added:  # not in the list Lightning is iterating, so it is set up here
        exact.setup(trainer, trainer.lightning_module, "fit")
