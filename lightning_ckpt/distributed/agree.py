"""How the ranks of a job agree: rank 0 decides, every rank learns it; a failure on one rank reaches all.

Every outcome here is collective and symmetric: each helper calls the same collectives on every rank,
on success and on failure, so an error on one rank becomes an error on all of them, never a hang.
Knows no Lightning and no storage; the Lightning adapter builds an :class:`Agree` from the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lightning_ckpt.errors import (CheckpointError, CorruptCheckpointError, IncompleteCheckpointError,
                                   NotACheckpointError, StorageError, UnsupportedFormatError)

T = TypeVar("T")


class Agree(Protocol):
    """How the ranks of a job agree: rank 0 decides, every rank learns it."""

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process decides (and writes the ledger)."""
        ...

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank (a collective: every rank must call it)."""
        ...

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, by rank, on every rank (a collective)."""
        ...


class GroupAgree:
    """``Agree`` over one ``torch.distributed`` process group, every rank of the job in it: for a background
    save, a group of the checkpoint's own (``new_group(backend="gloo")``, made once by every rank), so that
    its collectives never interleave with training's on another thread (as torch's ``dcp.async_save`` does).

    Args:
        group: the process group (its rank 0 decides).
    """

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self._dist, self._group = dist, group
        self._source = dist.get_global_rank(group, 0)

    @property
    def is_rank_zero(self) -> bool:
        return self._dist.get_rank(self._group) == 0

    def broadcast(self, value: T) -> T:
        box = [value]
        self._dist.broadcast_object_list(box, src=self._source, group=self._group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        out: list[Any] = [None] * self._dist.get_world_size(self._group)
        self._dist.all_gather_object(out, value, group=self._group)
        return out


class SingleProcess:
    """``Agree`` for one process: it decides, and there is nobody to tell."""

    is_rank_zero = True

    def broadcast(self, value: T) -> T:
        return value

    def gather(self, value: T) -> list[T]:
        return [value]


@dataclass(frozen=True)
class Failure:
    """A step that failed on one rank, in a form that crosses process boundaries."""

    rank: int
    kind: str
    message: str
    storage: bool  # the storage refused (disk full, ...): on_error="warn" may train on

    def error(self) -> CheckpointError:
        """The error other ranks raise for it: of the same class when it says what is wrong with a checkpoint
        (a damaged or missing file: every rank raises a CorruptCheckpointError, say), else a StorageError
        or a CheckpointError."""
        text = f"rank {self.rank}: {self.kind}: {self.message}"
        same = _SHARED_KINDS.get(self.kind)
        if same is not None:
            return same(text)
        return StorageError(text) if self.storage else CheckpointError(text)


# What a rank finds wrong with a checkpoint's files, raised as such on every rank (each takes one message).
_SHARED_KINDS: dict[str, type[CheckpointError]] = {cls.__name__: cls for cls in (
    CorruptCheckpointError, IncompleteCheckpointError, NotACheckpointError, UnsupportedFormatError)}


def decided_on_rank_zero(agree: Agree, decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide``; every rank returns its result, or raises its error: never a hang."""
    result: tuple[Any, Failure | None] | None = None
    local: BaseException | None = None
    if agree.is_rank_zero:
        try:
            result = (decide(), None)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it
            local, result = err, (None, with_rank(failure_of(err), 0))
    value, failure = agree.broadcast(result)
    if failure is None:
        return value
    if local is not None:
        raise local
    raise failure.error()


def all_ranks(agree: Agree, work: Callable[[], T]) -> list[T]:
    """Every rank runs ``work``; every rank returns all results by rank, or raises if any rank failed
    (its own error on the rank it happened on, a CheckpointError naming it on the others): never a hang."""
    local: BaseException | None = None
    try:
        mine: tuple[Any, Failure | None] = (work(), None)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it
        local, mine = err, (None, failure_of(err))
    reports = agree.gather(mine)
    failures = [with_rank(f, rank) for rank, (_, f) in enumerate(reports) if f is not None]
    if local is not None:
        raise local
    if failures:
        raise failures[0].error()
    return [value for value, _ in reports]


def failure_of(err: BaseException) -> Failure:
    """``err`` as a Failure another rank can raise (its rank is set by the gather that carries it)."""
    return Failure(rank=-1, kind=type(err).__name__, message=str(err), storage=isinstance(err, StorageError))


def with_rank(failure: Failure, rank: int) -> Failure:
    """``failure`` as reported by ``rank``."""
    return Failure(rank=rank, kind=failure.kind, message=failure.message, storage=failure.storage)
