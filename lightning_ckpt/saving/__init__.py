"""The save path: one save = snapshot -> encode -> write -> commit -> record -> retain, sync or async.

Owns the order of a save's steps (``pipeline``), the single-checkpoint API outside Lightning
(``engine``: save, load, verify), saving on a background worker (``async_saves``, ``background``),
and copying a snapshot off the training thread's tensors (``staging``, ``overlap``).

It imports the layers below it (format, store, policy, history, tiers, distributed) and must not
import ``lightning/``, ``convert/``, ``inspection`` or ``cli/``: it knows no Trainer.
"""
