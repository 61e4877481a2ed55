"""A resume on another world size: the rest of the interrupted epoch, dealt over the new ranks.

Each rank saves, with every mid-epoch checkpoint, the batches of the current epoch it has not trained
yet: its *remaining* samples (:func:`remaining_state`). A resume on the same world size has each rank
start where it stopped, as before. A resume on another world size cannot: the saving ranks' orders
(e.g. each ``DistributedSampler``'s share) do not exist there. Instead (:func:`split_remaining`):

1. the *union* is the saving ranks' remaining samples, rank 0's first, each rank's in its order;
2. sample ``i`` of the union goes to new rank ``i % world_size`` (dealt round robin, as
   ``DistributedSampler`` deals an epoch), so the shares differ by at most one sample;
3. every new rank trains the same number of batches, ``ceil(largest share / batch_size)``, so no rank
   waits in a collective for a batch another rank never trains: each share is cut into that many
   batches whose sizes differ by at most one, larger first;
4. only where a share has fewer samples than batches (fewer samples left than ranks, or
   ``batch_size=1`` with a share one short) is it padded, with samples repeated from the start of the
   union as ``DistributedSampler`` pads an epoch; the split counts them (``padded``) and the resume says so;
5. where that is more batches than the new epoch has left (its length as Lightning trains it,
   ``limit_train_batches`` applied), only the union's first ``batches left x batch_size x world_size``
   samples are dealt: a batch never holds more than ``batch_size`` samples (no surprise in memory or
   in the optimisation), and the epoch ends where its limit ends it, as a limit ends every epoch before
   its last samples. The split counts the samples not dealt (``skipped``), the audit's report and a
   warning say so.

The rest of the epoch is then trained as batches ``epoch_len - n .. epoch_len - 1`` of the new ranks'
epoch (Lightning's batch counter is renumbered to match), and the next epochs are the new world size's own.
So within the interrupted epoch every sample is trained exactly once, as in an uninterrupted epoch.

A new rank numbered as a saving rank gets that rank's random streams; one numbered past the saving
ranks gets streams derived from the order seed, the step and the rank (:func:`derived_rng`). Nothing
here imports Lightning.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader

from lightning_ckpt.lightning.exact.data_position import DataPosition, ResumableBatchSampler
from lightning_ckpt.lightning.exact.resume_audit import RESIZED, AuditReport
from lightning_ckpt.lightning.exact.rng import RNGSnapshot, derive_seed, seed_cpu_rngs

K_REMAINING = "remaining"  # a rank state's entry: what it has left of the epoch (None at an epoch's start)
K_INDICES = "indices"  # the remaining samples of a rank, in order (int32, or int64 for a larger index)
K_SIZES = "sizes"  # the sizes of its remaining batches, in order (int64)
K_DEALT = "dealt"  # whether its epoch was itself dealt by a resume on another world size
_RNG_SALT = 0x5E5A
# Per tracked sampler: (epoch, its samples in order, each batch's size, where each batch starts in them).
_cache: weakref.WeakKeyDictionary[ResumableBatchSampler, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = \
    weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Split:
    """The rest of an epoch dealt over ``len(batches)`` ranks: each rank's batches, all equally many."""

    batches: list[list[list[int]]]
    padded: int  # samples repeated to give every rank its batches (0 unless fewer samples than batches)
    skipped: int = 0  # samples left out: past the batches the epoch has left (under a limit_train_batches)

    @property
    def samples(self) -> int:
        """The samples dealt (each once; the padding not counted)."""
        return sum(len(batch) for rank in self.batches for batch in rank) - self.padded


def split_remaining(remaining: Sequence[Sequence[int]], world_size: int, batch_size: int,
                    max_batches: int | None = None) -> Split:
    """Deal the saving ranks' ``remaining`` samples over ``world_size`` new ranks (see the module's rules)."""
    if world_size < 1 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"cannot deal samples over world_size={world_size} in batches of {batch_size} "
                         f"(max_batches={max_batches}): each must be at least 1")
    union = [int(i) for rank in remaining for i in rank]
    if not union:
        return Split([[] for _ in range(world_size)], 0)
    fit = len(union) if max_batches is None else min(len(union), max_batches * batch_size * world_size)
    skipped, union = len(union) - fit, union[:fit]
    shares = [union[r::world_size] for r in range(world_size)]
    count = -(-len(shares[0]) // batch_size)  # the first share is a largest one (at most max_batches batches)
    padded = 0
    for share in shares:
        while len(share) < count:
            share.append(union[padded % len(union)])
            padded += 1
    return Split([cut(share, count) for share in shares], padded, skipped)


def cut(share: Sequence[int], count: int) -> list[list[int]]:
    """``share`` in ``count`` consecutive batches whose sizes differ by at most one, larger first."""
    size, larger = divmod(len(share), count)
    out, start = [], 0
    for b in range(count):
        end = start + size + (b < larger)
        out.append(list(share[start:end]))
        start = end
    return out


def remaining_state(sampler: ResumableBatchSampler | None, position: DataPosition,
                    epoch_len: float) -> dict[str, Any] | None:
    """What this rank has left of ``position``'s epoch (None at an epoch's start, or without a tracked sampler).

    ``epoch_len``: the batches Lightning trains per epoch (``num_training_batches``, may be a limit). The
    epoch's batches are computed once per epoch (a pass over the sampler), then each save slices them."""
    if sampler is None or position.batch == 0:
        return None
    dealt = sampler.dealt_epoch == position.epoch
    cached = _cache.get(sampler)
    if cached is None or cached[0] != position.epoch or dealt:
        batches = sampler.epoch_batches(position.epoch)
        sizes = torch.tensor([len(batch) for batch in batches], dtype=torch.int64)
        flat = [i for batch in batches for i in batch]
        cached = (position.epoch, torch.tensor(flat, dtype=torch.int32 if max(flat, default=0) < 2**31 else torch.int64),
                  sizes, torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]))
        _cache[sampler] = cached
    _, flat, sizes, offsets = cached
    stop = len(sizes) if epoch_len == float("inf") else min(int(epoch_len), len(sizes))
    start = min(position.batch, stop)
    keep = [index for index in range(start, stop) if DataPosition(position.epoch, index) not in sampler.skip]
    if len(keep) == stop - start:  # no batch a rollback skips: one slice
        indices, kept = flat[int(offsets[start]):int(offsets[stop])].clone(), sizes[start:stop].clone()
    else:
        indices = torch.cat([flat[int(offsets[i]):int(offsets[i + 1])] for i in keep] or [flat[:0]])
        kept = sizes[keep]
    return {K_INDICES: indices, K_SIZES: kept, K_DEALT: dealt}


def saved_batches(state: Any, where: str) -> list[list[int]]:
    """A rank's remaining batches from its saved state, checked (it was read from disk).

    Each saved batch holds at least one sample (a batch sampler's batches do; :func:`remaining_state`
    leaves out the empty positions of a rollback's skips), so there are at most as many batches as
    samples; the indices themselves are checked against the dataset by :func:`check_indices`."""
    if not isinstance(state, Mapping):
        _malformed(where, K_REMAINING, f"a mapping, got {type(state).__name__}")
    indices, sizes = _index_tensor(state, K_INDICES, where), _index_tensor(state, K_SIZES, where)
    if indices.numel() and int(indices.min()) < 0:
        _malformed(where, K_INDICES, f"sample indices of at least 0, got {int(indices.min())}")
    if sizes.numel() and int(sizes.min()) < 1:
        _malformed(where, K_SIZES, f"batch sizes of at least 1, got {int(sizes.min())}")
    if sizes.numel() > indices.numel() or int(sizes.sum()) != indices.numel():
        _malformed(where, K_SIZES, f"batch sizes summing to the {indices.numel()} saved indices, got "
                                   f"{sizes.numel()} summing to {int(sizes.sum())}")
    flat, out, start = indices.tolist(), [], 0
    for size in sizes.tolist():
        out.append(flat[start:start + size])
        start += size
    return out


def _index_tensor(state: Mapping[str, Any], key: str, where: str) -> torch.Tensor:
    value = state.get(key)
    if not (isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype in (torch.int32, torch.int64)):
        got = (f"a {value.dim()}-d {value.dtype} tensor" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        _malformed(where, key, f"a 1-d int32 or int64 tensor, got {got}")
    return value


def _malformed(where: str, key: str, expected: str) -> NoReturn:
    name = key if key == K_REMAINING else f"{K_REMAINING}.{key}"
    raise ValueError(f"ExactResume: the remaining samples saved in {where} are malformed: '{name}' must be "
                     f"{expected}; the checkpoint is damaged or not written by lightning-ckpt: resume from another one")


def check_indices(batches: Iterable[Sequence[int]], dataset_len: int | None, where: str) -> None:
    """Refuse a saved sample index the dataset does not have (a resume with another dataset)."""
    top = max((max(batch) for batch in batches if batch), default=-1)
    if dataset_len is not None and top >= dataset_len:
        raise ValueError(f"ExactResume: {where} holds sample index {top}, but the train dataset has {dataset_len} "
                         "samples; resume with the dataset the checkpoint was trained on")


@dataclass(frozen=True)
class Reposition:
    """The rest of a resumed epoch as the saving ranks left it, placed on this rank once its loader exists."""

    epoch: int
    global_step: int
    remaining: list[list[list[int]]]  # per saving rank, its batches
    where: str  # the checkpoint, for errors

    @classmethod
    def of(cls, epoch: int, batch: int, global_step: int, ranks: Sequence[Mapping[str, Any]], where: str,
           same_world: bool) -> Reposition | None:
        """The rest of the epoch to deal, or None: at an epoch's start, saved without it (an older checkpoint,
        an untracked loader), or on the saving world size where each rank resumes at its batch as usual."""
        states = [rank.get(K_REMAINING) for rank in ranks]
        if batch == 0 or any(state is None for state in states):
            return None
        if same_world and not all(isinstance(state, Mapping) and state.get(K_DEALT) is True for state in states):
            return None  # an epoch of the sampler's own order: the position says it all
        return cls(epoch, global_step, [saved_batches(state, f"{where} (rank {r})") for r, state in enumerate(states)],
                   where)

    def place(self, rank: int, world_size: int, sampler: ResumableBatchSampler, loader: DataLoader,
              epoch_len: float) -> tuple[DataPosition, list[list[int]], list[AuditReport]]:
        """Where this rank resumes, the batches it trains there to the epoch's end, and the audit's report.

        ``epoch_len``: the batches Lightning trains per epoch on this rank (``limit_train_batches`` applied;
        from the train-loader seam, where ``num_training_batches`` is not known yet). Every rank checks
        the saved samples of all saving ranks (the same on every rank), so all raise or none does."""
        length = len(sampler) if epoch_len == float("inf") else int(epoch_len)
        check_indices((batch for batches in self.remaining for batch in batches), _dataset_len(loader), self.where)
        split = None
        if world_size == len(self.remaining):  # a dealt epoch, resumed on the world size it was dealt on
            counts = [len(batches) for batches in self.remaining]
            if len(set(counts)) > 1:  # a dealt epoch gives every rank as many batches: else a rank would wait
                raise ValueError(f"ExactResume: the ranks of {self.where} saved {counts} dealt batches, where a dealt "
                                 "epoch has as many on every rank; the checkpoint is damaged: resume from another one")
            mine = self.remaining[rank][:length]
            skipped = sum(len(b) for batches in self.remaining for b in batches[length:])
        else:
            union = [[i for batch in batches for i in batch] for batches in self.remaining]
            batch_size = sampler.batch_size or max((len(b) for r in self.remaining for b in r), default=1)
            split = split_remaining(union, world_size, batch_size, max(length, 1))
            mine, skipped = split.batches[rank], split.skipped
        if skipped and rank == 0:
            warnings.warn(f"ExactResume: {skipped} sample{'' if skipped == 1 else 's'} left of epoch {self.epoch} in "
                          f"{self.where} {'is' if skipped == 1 else 'are'} not trained: "
                          f"the epoch has {len(mine)} batch{'' if len(mine) == 1 else 'es'} left (limit_train_batches "
                          "applied), which they do not "
                          "fit in; batches hold at most their batch_size samples", stacklevel=3)
        reports = [] if split is None else [AuditReport(RESIZED, self.global_step, 0, describe(
            len(self.remaining), world_size, self.epoch, split, True))]
        return DataPosition(self.epoch, length - len(mine)), mine, reports


def _dataset_len(loader: DataLoader) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def rank_rng(saved: Sequence[Mapping[str, Any]], rank: int, order_seed: int | None, global_step: int) -> RNGSnapshot:
    """This rank's random streams after a resume on another world size: those the saving rank of the same
    number saved (``saved``: each saving rank's) where there was one, else derived (:func:`derived_rng`)."""
    if rank < len(saved):
        return RNGSnapshot.from_state_dict(saved[rank])
    return derived_rng(order_seed or 0, global_step, rank)


def derived_rng(order_seed: int, global_step: int, rank: int) -> RNGSnapshot:
    """The random streams of ``rank`` after a resume at ``global_step`` on another world size, where no
    saved stream is that rank's: seeded with ``derive_seed(order seed, step, rank)`` (CUDA too, where used)."""
    seed = derive_seed(_RNG_SALT, order_seed, global_step, rank)
    seed_cpu_rngs(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    return RNGSnapshot.capture()


def rng_text(old: int, new: int) -> str:
    """What happens to the per-rank random streams when ``old`` ranks' checkpoint resumes on ``new`` ranks."""
    kept = f"per-rank RNG of {_ranks(0, min(old, new))} carried over"
    if new < old:
        return f"{kept}, of {_ranks(new, old)} dropped"
    return f"{kept}, of {_ranks(old, new)} re-derived (from the order seed, the step and the rank)"


def _ranks(start: int, stop: int) -> str:
    return f"rank {start}" if stop - start == 1 else f"ranks {start}-{stop - 1}"


def limit_text(old: int, new: int) -> str:
    """Why a resume from ``old`` ranks on ``new`` ranks is not bit-exact (the notice's part)."""
    return (f"the world size changed from {old} to {new} ranks ({rng_text(old, new)}; the interrupted epoch's "
            "per-rank metric, logged and gradient states are not restored)")


def describe(old: int, new: int, epoch: int, split: Split | None, mid_epoch: bool) -> str:
    """Precisely what a resume from ``old`` ranks on ``new`` ranks changes against an uninterrupted run."""
    if split is None and mid_epoch:
        data = (f"data position NOT carried over (the checkpoint holds no remaining samples of epoch {epoch}: saved "
                "by an older lightning-ckpt or without a tracked train loader), samples of it may repeat or be skipped")
    elif split is None:
        data = f"data position carried over (saved at an epoch's end: epoch {epoch} starts as on any world size)"
    else:
        per_rank, ranks = len(split.batches[0]), f"{new} rank{'' if new == 1 else 's'}"
        batches = f"{per_rank} batch{'' if per_rank == 1 else 'es'} each"
        repeated = (f"no sample skipped, {split.padded} repeated to give every rank {per_rank} batches" if split.padded
                    else "no sample repeated or skipped")
        data = (f"data position carried over (the {split.samples} samples left of epoch {epoch} dealt over {ranks}, "
                f"{batches}: {repeated})")
        if split.skipped:  # no padding then: every share fills its batches
            data = (f"data position carried over (of the {split.samples + split.skipped} samples left of epoch "
                    f"{epoch}, {split.samples} dealt over {ranks}, {batches}, and {split.skipped} skipped: the epoch "
                    "has no more batches left (limit_train_batches applied), of at most batch_size samples; none "
                    "repeated)")
    return (f"world size {old} -> {new}: {data}; {rng_text(old, new)}; the interrupted epoch's per-rank metric, "
            "logged and accumulated-gradient states are not carried over; bit-exactness not expected")
