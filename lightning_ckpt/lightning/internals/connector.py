"""Lightning's checkpoint connector: the full state a save writes, the lookup ``ckpt_path="last"``
asks about each candidate, and where every rank turns ``ckpt_path="best"`` into a path.

Checked with Lightning 2.6.6; ``tests/lightning/test_lineage.py`` (the state) and
``tests/lightning/test_dirpath_urls.py`` (the lookup) and ``tests/lightning/test_shared_load_internals.py`` (the
resolution of "best") fail loudly when a release moves one.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import lightning as L

from lightning_ckpt.errors import CheckpointError

_LOOKUP_ATTR = "get_filesystem"
_PARSE_WRAPPED = "_lightning_ckpt_parse_wrapped"  # marks a connector whose _parse_ckpt_path is wrapped


def dump_checkpoint(trainer: L.Trainer) -> dict[str, Any]:
    """The full training state, as ``trainer.save_checkpoint`` would write it, without its closing barrier."""
    # Lightning 2.6.6: Trainer._checkpoint_connector.dump_checkpoint is what save_checkpoint writes; it has
    # no public form that leaves out the barrier.
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def last_lookup() -> Callable[..., Any]:
    """The function ``_CheckpointConnector._parse_ckpt_path`` asks about each "last" candidate, now."""
    return getattr(_connector_module(), _LOOKUP_ATTR)


def set_last_lookup(lookup: Callable[..., Any]) -> None:
    """Put ``lookup`` in the place of the function ``last_lookup`` returns (for every Trainer)."""
    setattr(_connector_module(), _LOOKUP_ATTR, lookup)


def _connector_module() -> ModuleType:
    """The module whose ``get_filesystem`` global ``_CheckpointConnector._parse_ckpt_path`` calls on each
    "last" candidate, then ``.exists(path)`` and ``.modified(path)`` on what it returns. Lightning
    internal, checked with Lightning 2.6.6."""
    from lightning.pytorch.trainer.connectors import checkpoint_connector

    if not callable(getattr(checkpoint_connector, _LOOKUP_ATTR, None)):
        raise CheckpointError(
            f"lightning.pytorch.trainer.connectors.checkpoint_connector.{_LOOKUP_ATTR} is gone in Lightning "
            f"{L.__version__}: ckpt_path='last' cannot find checkpoints at a URL dirpath on this release. Pass "
            "ckpt_path=lightning_ckpt.latest_checkpoint(url, storage_options=...) instead, and report it to lightning-ckpt."
        )
    return checkpoint_connector


def wrap_ckpt_path_parse(trainer: L.Trainer, around: Callable[[Callable[[], Any], Any], Any]) -> None:
    """Make ``trainer`` resolve every ``ckpt_path=`` as ``around(parse, ckpt_path)``, ``parse()`` being Lightning's
    own resolution of it (once per Trainer; a second call does nothing)."""
    # Lightning 2.6.6: every rank's fit/validate/test/predict turns ckpt_path ("best", "last", None: "best" after
    # a fit) into a path in _CheckpointConnector._parse_ckpt_path (from _select_ckpt_path, on the instance),
    # reading trainer.checkpoint_callback.best_model_path for "best"; no public seam runs before it.
    connector = trainer._checkpoint_connector
    if getattr(connector, _PARSE_WRAPPED, False):
        return
    own = connector._parse_ckpt_path

    def parse(state_fn: Any, ckpt_path: Any, *args: Any, **kwargs: Any) -> Any:
        return around(lambda: own(state_fn, ckpt_path, *args, **kwargs), ckpt_path)

    connector._parse_ckpt_path = parse  # type: ignore[method-assign]
    setattr(connector, _PARSE_WRAPPED, True)
