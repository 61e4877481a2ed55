"""Tiers: copies of local checkpoints on another store (object storage), and resuming from either.

Owns the mirror: which committed checkpoints are uploaded, in what order, what the ledger records of
each copy, and which tier holds the newest good checkpoint. Uploads go through the store's fsspec
layer; "last" is asked of history/, never decided here.

It imports format, store, policy and history; it must not import saving/, distributed/,
``lightning/`` or ``cli/``.
"""
