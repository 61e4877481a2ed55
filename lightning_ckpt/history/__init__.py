"""A checkpoint directory over time: what was saved, by which run, which one is "last" and which "best".

Owns the ledger-backed manager that records and retires checkpoints (``manager``), the branches a
resume grows and the one choice of "last" and of "best" (``lineage``: ``last_of``, ``best_of``), which
the Trainer, the helpers, the CLI and the mirror all ask through ``manager`` and ``selection``, the
table the CLI lists (``catalog``) and the
metrics read back from a logger's CSV or TensorBoard files (``logs``).

It imports format, store and policy only; it must not import saving/, tiers/, distributed/,
``lightning/`` or ``cli/``.
"""
