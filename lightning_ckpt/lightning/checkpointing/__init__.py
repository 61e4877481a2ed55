"""The Checkpointer callback and the SafetensorsCheckpointIO plugin: Lightning's saves made ours.

Owns the callback's hooks (when to save, the run's lineage on resume, "last" for ``ckpt_path``),
the plugin that turns ``Trainer.save_checkpoint`` / ``ckpt_path`` into our format, URL dirpaths,
sharded saves routed from ModelParallelStrategy, and migrating from a ModelCheckpoint directory.
The hooks ask saving/ and history/ and repeat none of their decisions.

It imports the layers below ``lightning/``, ``lightning.internals`` and ``lightning.preemption``; it
must not import ``lightning.rollback``, ``convert/`` or ``cli/`` (``companions`` finds ExactResume
among the Trainer's callbacks, so it imports ``lightning.exact``, which sits below it).
"""
