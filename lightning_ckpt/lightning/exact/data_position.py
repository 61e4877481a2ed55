"""Where a plain ``torch.utils.data.DataLoader`` is within an epoch, and how to start there again.

The batch sampler of the train loader is wrapped by :class:`ResumableBatchSampler`, which

- makes an epoch's batch order a function of ``(order seed, epoch)`` alone: the inner sampler is run
  on private random streams, so its shuffle neither depends on nor disturbs the training RNG;
- starts a resumed epoch ``k`` batches in by skipping indices, without loading the skipped samples;
- tags each batch with a seed that dataloader workers apply before loading it, so a batch's random
  augmentations do not depend on which worker loads it or on what that worker loaded before;
- yields nothing to train on at positions a rollback skips: an empty batch, which the loader's
  collate turns into None, a batch Lightning's training loop counts without training on it.

Nothing here imports Lightning; the callback decides when to install and where to resume.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence, Sized
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_ckpt.lightning.exact.rng import derive_seed, fork_cpu_rngs, seed_cpu_rngs
from lightning_ckpt.lightning.internals.dataloader import drop_persistent_iterator

_GENERATOR_ATTR = "generator"
# Salts keep the seeds of the epoch order and of the batches apart from each other.
_ORDER_SALT = 0x0D4E
_BATCH_SALT = 0xBA7C


@dataclass(frozen=True)
class DataPosition:
    """The next batch to train: batch ``batch`` (0-based) of epoch ``epoch``."""

    epoch: int
    batch: int


class SeededBatch(list):  # type: ignore[type-arg]
    """The indices of one batch, carrying the seed its worker applies before loading them.

    DataLoader workers read the indices by iterating them (``[dataset[i] for i in indices]``), which
    is the one moment a worker is known to start a batch; the main process iterates them unchanged,
    because its streams are restored by the callback before every fetch.
    """

    def __init__(self, indices: Iterable[int], seed: int, in_main_process: bool = False) -> None:
        super().__init__(indices)
        self.seed = seed
        self.in_main_process = in_main_process  # reseed in the main process too (a batch fetched ahead)

    def __iter__(self) -> Iterator[int]:
        if self.in_main_process or get_worker_info() is not None:
            seed_cpu_rngs(self.seed)
        return super().__iter__()

    def __reduce__(self) -> tuple[Any, ...]:
        # The default list pickling iterates the list, which would run the reseeding above.
        return (SeededBatch, (list.copy(self), self.seed, self.in_main_process))


class _WrapsBatchSampler:
    """What Lightning reads of a batch sampler, answered by the one it wraps (``inner``)."""

    inner: Any

    @property
    def sampler(self) -> object:
        """The inner index sampler, where Lightning looks for ``set_epoch``."""
        return getattr(self.inner, "sampler", None)

    @property
    def batch_size(self) -> int | None:
        return getattr(self.inner, "batch_size", None)

    @property
    def drop_last(self) -> bool:
        return bool(getattr(self.inner, "drop_last", False))


class ResumableBatchSampler(_WrapsBatchSampler):
    """Wraps a batch sampler: same batches, an order fixed per epoch, and a start point for resuming.

    Args:
        inner: the loader's batch sampler (e.g. a ``BatchSampler`` over a ``RandomSampler`` or a
            ``DistributedSampler``).
        order_seed: the seed every epoch's order is derived from.
        rank: this process's global rank, mixed into the batch seeds so ranks augment differently.
        epoch_fn: returns the epoch that an iteration starting now belongs to.
    """

    def __init__(self, inner: Iterable[list[int]], *, order_seed: int, rank: int,
                 epoch_fn: Callable[[], int], skip: Collection[DataPosition] = ()) -> None:
        self.inner = inner
        self.order_seed = order_seed
        self.skip = frozenset(skip)  # positions yielded empty: counted by the loop, never loaded nor trained
        self._rank = rank
        self._epoch_fn = epoch_fn
        self._resume_at: DataPosition | None = None
        self.dealt: tuple[int, list[list[int]]] | None = None  # (epoch, its batches) dealt by a resize

    def resume_at(self, position: DataPosition, batches: Sequence[list[int]] | None = None) -> None:
        """Make the next iteration start at ``position`` instead of the start of the current epoch; with
        ``batches``, those are the rest of that epoch (a resume on another world size, see :mod:`.resize`)."""
        self._resume_at = position
        if batches is not None:
            self.dealt = (position.epoch, [[] for _ in range(position.batch)] + [list(b) for b in batches])

    @property
    def dealt_epoch(self) -> int | None:
        """The epoch whose rest a resume on another world size dealt to this rank, if any."""
        return None if self.dealt is None else self.dealt[0]

    @property
    def pending_resume(self) -> DataPosition | None:
        """Where the next iteration starts, if not at the start of the current epoch."""
        return self._resume_at

    def __len__(self) -> int:
        assert isinstance(self.inner, Sized)
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the position is read when the first batch is asked for, not when iter() is called.
        position = self._resume_at or DataPosition(self._epoch_fn(), 0)
        self._resume_at = None
        batches = self.epoch_batches(position.epoch)
        for index in range(position.batch, len(batches)):
            indices = () if DataPosition(position.epoch, index) in self.skip else batches[index]
            yield SeededBatch(indices, derive_seed(_BATCH_SALT, self.order_seed, position.epoch, index, self._rank))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in order, computed without loading any data (a dealt epoch: empty until
        the first dealt batch)."""
        if self.dealt is not None and self.dealt[0] == epoch:
            return [list(batch) for batch in self.dealt[1]]
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        seed = derive_seed(_ORDER_SALT, self.order_seed, epoch)
        with fork_cpu_rngs(seed), _private_generators([self.inner, self.sampler], seed):
            return [list(batch) for batch in self.inner]


UNSIZED_STREAM = ("its IterableDataset has no __len__, so Lightning fetches each batch one batch ahead, under random "
                  "streams a resume cannot replay (give the dataset __len__, or load it with torchdata's "
                  "StatefulDataLoader); its position is restored")


def unsupported_reason(loader: object) -> str | None:
    """Why ``loader``'s position cannot be tracked by index, or None if it can."""
    if not isinstance(loader, DataLoader):
        return f"{type(loader).__name__} is not a torch.utils.data.DataLoader"
    if isinstance(loader.dataset, IterableDataset):
        if is_stateful(loader.dataset) and loader.num_workers == 0:
            # Its position is its state_dict (see state_source); exact unless Lightning reads it ahead.
            return None if has_len(loader) else UNSIZED_STREAM
        if is_stateful(loader.dataset):
            return ("its dataset is an IterableDataset whose state lives in the DataLoader's worker processes, "
                    "where it cannot be read (use num_workers=0, or torchdata's StatefulDataLoader)")
        return ("its dataset is an IterableDataset without state_dict, so its position cannot be restored (give it "
                "state_dict/load_state_dict and load it with torchdata's StatefulDataLoader)")
    if loader.batch_sampler is None:
        return "it has no batch sampler (batch_size=None)"
    return None


def state_source(loaders: Sequence[object]) -> object | None:
    """What holds the one train loader's position as a ``state_dict``, where its position is not an index.

    A loader that keeps its own state (torchdata's ``StatefulDataLoader``), or the stateful
    ``IterableDataset`` of a plain ``DataLoader`` that reads it in this process (``num_workers=0``).
    ``ExactResume`` snapshots it before each fetch and loads the snapshot on resume, because the state
    Lightning saves is read after its fetcher prefetched the next batch: one batch ahead.
    """
    if len(loaders) != 1:
        return None
    loader = loaders[0]
    if is_stateful(loader):
        return loader
    if (isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset)
            and is_stateful(loader.dataset) and loader.num_workers == 0):
        return loader.dataset
    return None


def trackable(loaders: Sequence[object]) -> tuple[DataLoader | None, str | None]:
    """The one train loader whose position can be tracked by index, else why none can be.

    (None, None) when every loader keeps its own state (Lightning saves and restores those), or when
    the position is a ``state_dict`` (see :func:`state_source`).
    """
    plain = [loader for loader in loaders if not is_stateful(loader)]
    if not plain:
        return None, None
    if state_source(loaders) is not None:
        return None, unsupported_reason(plain[0])
    if len(loaders) > 1:
        return None, f"there are {len(loaders)} train dataloaders and only a single one's position is restored"
    loader, reason = plain[0], unsupported_reason(plain[0])
    return (loader, None) if reason is None and isinstance(loader, DataLoader) else (None, reason)


def has_len(loader: object) -> bool:
    """Whether ``len(loader)`` works (Lightning's fetcher prefetches a batch from a loader without one)."""
    try:
        len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return False
    return True


def is_stateful(loader: object) -> bool:
    """Loaders with their own ``state_dict``/``load_state_dict`` (torchdata's StatefulDataLoader) keep their state."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def default_order_seed(loader: DataLoader) -> int:
    """The user's seed for the loader's order: its sampler's generator's seed, else torch's global seed."""
    for owner in (loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None), loader):
        generator = getattr(owner, _GENERATOR_ATTR, None)
        if isinstance(generator, torch.Generator):
            return generator.initial_seed()
    return torch.initial_seed()


class NoneForEmpty:
    """A ``collate_fn`` that gives None for an empty batch (a skipped position), else the loader's own collate.

    A class, not a closure, so that dataloader workers started with ``spawn`` can unpickle it.
    """

    def __init__(self, inner: Callable[[Any], Any]) -> None:
        self.inner = inner

    def __call__(self, items: Sequence[Any]) -> Any:
        return None if len(items) == 0 else self.inner(items)


def install(loader: DataLoader, *, order_seed: int, rank: int, epoch_fn: Callable[[], int],
            skip: Collection[DataPosition] = ()) -> ResumableBatchSampler:
    """Replace ``loader``'s batch sampler by a :class:`ResumableBatchSampler` (idempotent).

    Must run before the loader's next ``iter()``; an iterator that exists already keeps the old sampler.
    Positions in ``skip`` come as None batches (the loader's collate is wrapped while there are any).
    """
    current = loader.batch_sampler
    inner = current.inner if isinstance(current, ResumableBatchSampler) else current
    assert inner is not None
    wrapper = ResumableBatchSampler(inner, order_seed=order_seed, rank=rank, epoch_fn=epoch_fn, skip=skip)
    _wrap_collate(loader, bool(skip))
    if isinstance(current, ResumableBatchSampler):  # a second install must not lose a pending resume or a dealt epoch
        wrapper.dealt = current.dealt
        if current.pending_resume is not None:
            wrapper.resume_at(current.pending_resume)
    # DataLoader refuses to swap the batch sampler after __init__ because a live iterator would keep
    # the old one; here no iterator exists yet, and a persistent one is shut down first.
    drop_persistent_iterator(loader)
    object.__setattr__(loader, "batch_sampler", wrapper)
    return wrapper


def uninstall(loader: DataLoader) -> None:
    """Give ``loader`` its own batch sampler back (after ``fit``, so later uses see the loader unchanged)."""
    current = loader.batch_sampler
    if isinstance(current, ResumableBatchSampler):
        drop_persistent_iterator(loader)
        object.__setattr__(loader, "batch_sampler", current.inner)
        _wrap_collate(loader, False)


def skipped_indices(sampler: ResumableBatchSampler, positions: Iterable[DataPosition]) -> list[int]:
    """The sample indices this rank's loader has at ``positions``, in order (computed, never loaded)."""
    epochs: dict[int, list[list[int]]] = {}
    out: list[int] = []
    for position in positions:
        if position.epoch not in epochs:
            epochs[position.epoch] = sampler.epoch_batches(position.epoch)
        batches = epochs[position.epoch]
        out += batches[position.batch] if position.batch < len(batches) else []
    return out


def _wrap_collate(loader: DataLoader, wrap: bool) -> None:
    collate = loader.collate_fn
    inner = collate.inner if isinstance(collate, NoneForEmpty) else collate
    loader.collate_fn = NoneForEmpty(inner) if wrap else inner


@contextmanager
def _private_generators(owners: Iterable[object], seed: int) -> Iterator[None]:
    """Give samplers that hold their own ``torch.Generator`` a fresh one seeded with ``seed`` for a while."""
    with ExitStack() as stack:
        for owner in owners:
            if isinstance(getattr(owner, _GENERATOR_ATTR, None), torch.Generator):
                stack.enter_context(_swapped_generator(owner, torch.Generator().manual_seed(seed)))
        yield


@contextmanager
def _swapped_generator(owner: object, generator: torch.Generator) -> Iterator[None]:
    original = getattr(owner, _GENERATOR_ATTR)
    setattr(owner, _GENERATOR_ATTR, generator)
    try:
        yield
    finally:
        setattr(owner, _GENERATOR_ATTR, original)


class SeededBatches(_WrapsBatchSampler):
    """Wraps the batch sampler of a loader that keeps its own position (torchdata's ``StatefulDataLoader``)
    and reads batches in worker processes: the same batches, each tagged with a seed its worker applies
    before loading it (see :class:`SeededBatch`), or that Lightning reads one batch ahead.

    The loader's state restores its workers' position and base seed, not the random streams a worker
    has drawn from since it started; with the seeds, a batch's random augmentations depend only on the
    batch's place in the run (order seed, epoch, batch index, rank), so a resumed worker draws what the
    uninterrupted one drew. The iterator's state wraps the inner one's and adds the epoch and the count.

    A loader without ``len()`` is read one batch ahead by Lightning's fetcher: the batch after a save
    was fetched before it, under random streams that a resume cannot replay (they had moved on when
    the batch trained). With ``in_main_process``, the main process reseeds before each fetch too, so
    that the prefetched batch draws the same numbers in the resumed run.
    """

    def __init__(self, inner: Iterable[list[int]], *, order_seed: int, rank: int, epoch_fn: Callable[[], int],
                 in_main_process: bool = False) -> None:
        self.inner = inner
        self.order_seed = order_seed
        self.rank = rank
        self.epoch_fn = epoch_fn
        self.in_main_process = in_main_process

    def __len__(self) -> int:
        assert isinstance(self.inner, Sized)
        return len(self.inner)

    def __iter__(self) -> _SeededBatchIterator:
        return _SeededBatchIterator(self, iter(self.inner))


class _SeededBatchIterator:
    """One epoch of :class:`SeededBatches`; its ``state_dict`` is what the loader saves of its sampler."""

    def __init__(self, owner: SeededBatches, inner: Iterator[list[int]]) -> None:
        self._owner, self._inner = owner, inner
        self._epoch: int | None = None  # read at the first batch, when the epoch has begun
        self._batches = 0

    def __iter__(self) -> _SeededBatchIterator:
        return self

    def __next__(self) -> SeededBatch:
        if self._epoch is None:
            self._epoch = self._owner.epoch_fn()
        indices = next(self._inner)
        owner, index = self._owner, self._batches
        self._batches += 1
        return SeededBatch(indices, derive_seed(_BATCH_SALT, owner.order_seed, self._epoch, index, owner.rank),
                           owner.in_main_process)

    def state_dict(self) -> dict[str, Any]:
        inner = self._inner.state_dict() if is_stateful(self._inner) else None  # type: ignore[attr-defined]
        return {"inner": inner, "epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not (isinstance(state, dict) and set(state) == {"inner", "epoch", "batches"}):
            state = {"inner": state, "epoch": None, "batches": 0}  # saved before the wrapper: the inner's own
        if state["inner"] is not None and is_stateful(self._inner):
            self._inner.load_state_dict(state["inner"])  # type: ignore[attr-defined]
        else:
            for _ in range(state["batches"]):
                next(self._inner, None)
        self._epoch, self._batches = state["epoch"], int(state["batches"])


def install_seeds(loader: DataLoader, *, order_seed: int, rank: int, epoch_fn: Callable[[], int],
                  prefetched: bool) -> None:
    """Give a stateful loader with workers, or one Lightning reads ahead (``prefetched``),
    :class:`SeededBatches` (idempotent); before its next ``iter()``."""
    current = loader.batch_sampler
    if current is None or (loader.num_workers == 0 and not prefetched):
        return  # the callback restores the process's streams before every fetch
    inner = current.inner if isinstance(current, SeededBatches) else current
    drop_persistent_iterator(loader)
    object.__setattr__(loader, "batch_sampler", SeededBatches(inner, order_seed=order_seed, rank=rank,
                                                               epoch_fn=epoch_fn, in_main_process=prefetched))


def uninstall_seeds(loader: DataLoader) -> None:
    """Give the loader its own batch sampler back (after ``fit``)."""
    current = loader.batch_sampler
    if isinstance(current, SeededBatches):
        drop_persistent_iterator(loader)
        object.__setattr__(loader, "batch_sampler", current.inner)
