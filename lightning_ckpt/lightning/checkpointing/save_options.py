"""The ``Checkpointer``'s options for failed and overlapping saves, checked when it is built."""

from __future__ import annotations

from lightning_ckpt.saving.background import WHEN_BUSY

STAGING = ("overlapped", "eager")


def check_save_options(on_save_error: str, when_busy: str, staging: str) -> None:
    """Raise ValueError naming the option and its choices unless each value is one of them."""
    if on_save_error not in ("raise", "warn"):
        raise ValueError(f"on_save_error={on_save_error!r}; use 'raise' (stop training) or 'warn' (train on)")
    if when_busy not in WHEN_BUSY or staging not in STAGING:
        raise ValueError(f"when_busy={when_busy!r}, staging={staging!r}; use when_busy='wait' or 'skip', "
                         "staging='overlapped' or 'eager'")
