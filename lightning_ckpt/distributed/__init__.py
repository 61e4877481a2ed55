"""What the ranks of a job agree on, and sharded state through torch.distributed.checkpoint.

Owns ``agree`` (rank 0 decides, every rank learns the outcome or the failure; every path calls the
same collectives; ``GroupAgree`` over a process group of a background save's own) and ``sharded`` (FSDP2 / tensor-parallel state written and read by DCP, listed in
our manifest and committed in two phases; ``shard_reader`` shows DCP only the files the manifest lists).

It imports format and store only; it must not import saving/, history/, ``lightning/`` or ``cli/``.
Importing this package does not load ``torch.distributed``: the names below load ``sharded`` on
first use, so a single-process save never pays for it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load on first use
    from lightning_ckpt.distributed.sharded import (  # noqa: F401
        SHARDS_DIR,
        checkpoint_is_sharded,
        collect_dtensors,
        is_sharded,
        load_consolidated,
        load_sharded,
        save_sharded,
    )

_SHARDED = ("SHARDS_DIR", "checkpoint_is_sharded", "collect_dtensors", "is_sharded", "load_consolidated",
            "load_sharded", "save_sharded")


def __getattr__(name: str) -> Any:
    if name in _SHARDED:
        from lightning_ckpt.distributed import sharded

        return getattr(sharded, name)
    raise AttributeError(f"module 'lightning_ckpt.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SHARDED])


__all__ = list(_SHARDED)
