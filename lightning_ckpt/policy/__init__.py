"""Pure decisions over plain records: when to save, what to keep. No I/O, no clock, no Trainer.

It imports nothing of ours but other policies (and the standard library): no
store, no torch, no Lightning.
"""

from lightning_ckpt.policy.retention import (
    KeepAll,
    KeepEveryNSteps,
    KeepLast,
    KeepRule,
    KeepTopK,
    Record,
    RetentionConfig,
    RetentionPlan,
    best_record,
    checkpoints_to_delete,
    latest_record,
)
from lightning_ckpt.policy.triggers import (
    AT_STEPS,
    EVERY_N_EPOCHS,
    EVERY_N_STEPS,
    EVERY_SECONDS,
    MONITOR,
    AtSteps,
    EveryNEpochs,
    EveryNSteps,
    EverySeconds,
    SaveSchedule,
)

__all__ = [
    "AT_STEPS",
    "EVERY_N_EPOCHS",
    "EVERY_N_STEPS",
    "EVERY_SECONDS",
    "MONITOR",
    "AtSteps",
    "EveryNEpochs",
    "EveryNSteps",
    "EverySeconds",
    "KeepAll",
    "KeepEveryNSteps",
    "KeepLast",
    "KeepRule",
    "KeepTopK",
    "Record",
    "RetentionConfig",
    "RetentionPlan",
    "SaveSchedule",
    "best_record",
    "checkpoints_to_delete",
    "latest_record",
]
