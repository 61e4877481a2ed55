"""Exact resume: the RNG streams, the data position and the logged sums saved with every checkpoint,
put back so a resumed run continues bit for bit, and the audit that proves it did.

Owns the ExactResume callback, the data position of each dataloader (samplers, torchdata's
StatefulDataLoader; over another world size, ``resize``), the RNG state of every generator (``rng``)
and the resume audit.

It imports ``lightning.internals`` for every private Lightning touch and the layers below
``lightning/``; it must not import ``lightning.checkpointing``, ``lightning.rollback`` or ``cli/``.
"""
