"""The resumable batch sampler: same batches, fixed order per epoch, index-level skip, seeded workers."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset

from lightning_ckpt.lightning.exact.data_position import (
    DataPosition,
    ResumableBatchSampler,
    SeededBatch,
    install,
    is_stateful,
    uninstall,
    unsupported_reason,
)


class CountingNoisyDataset(Dataset):
    """Counts its loads; each item gets noise from torch's global RNG (an augmentation)."""

    def __init__(self, n: int = 20) -> None:
        self.loads = 0
        self.base = torch.arange(n, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loads += 1
        return self.base[i] + torch.rand(())


def _loader(dataset: Dataset, epoch: list[int], num_workers: int = 0, **kwargs: object) -> DataLoader:
    loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=num_workers, **kwargs)
    install(loader, order_seed=11, rank=0, epoch_fn=lambda: epoch[0])
    return loader


def test_resume_skips_indices_without_loading_them() -> None:
    epoch = [1]
    full = list(_loader(CountingNoisyDataset(), epoch).batch_sampler)
    dataset = CountingNoisyDataset()
    loader = _loader(dataset, epoch)
    loader.batch_sampler.resume_at(DataPosition(epoch=1, batch=4))
    assert list(loader.batch_sampler) == full[4:]
    assert dataset.loads == 0  # computing the order loaded nothing
    loader.batch_sampler.resume_at(DataPosition(epoch=1, batch=4))
    assert sum(len(b) for b in loader) == 20 - 4 * 3
    assert dataset.loads == 20 - 4 * 3  # the skipped samples were never loaded
    assert len(list(loader)) == len(full)  # the next iteration starts an epoch from its first batch


def test_order_is_a_function_of_seed_and_epoch_and_leaves_the_global_rng_alone() -> None:
    epoch = [0]
    sampler = _loader(CountingNoisyDataset(), epoch).batch_sampler
    state = torch.get_rng_state()
    e0, e0_again = list(sampler), list(sampler)
    epoch[0] = 1
    e1 = list(sampler)
    assert torch.equal(torch.get_rng_state(), state)
    assert e0 == e0_again != e1
    assert sorted(i for b in e0 for i in b) == list(range(20))


def test_a_user_generator_is_neither_used_nor_advanced() -> None:
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    sampler = _loader(CountingNoisyDataset(), [0], generator=generator).batch_sampler
    list(sampler)
    assert torch.equal(generator.get_state(), state)


def test_distributed_sampler_keeps_its_own_order() -> None:
    dataset = CountingNoisyDataset()
    plain = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3)
    plain.set_epoch(2)
    expected = list(BatchSampler(plain, batch_size=3, drop_last=False))
    wrapped = ResumableBatchSampler(BatchSampler(DistributedSampler(dataset, num_replicas=2, rank=1, seed=3),
                                                 batch_size=3, drop_last=False),
                                    order_seed=0, rank=1, epoch_fn=lambda: 2)
    assert list(wrapped) == expected


@pytest.mark.timeout(60)
def test_worker_augmentations_do_not_depend_on_the_worker_or_its_history() -> None:
    """With 2 workers, a resumed epoch gets the very same augmented batches as the uninterrupted one."""
    full = list(_loader(CountingNoisyDataset(), [0], num_workers=2))
    loader = _loader(CountingNoisyDataset(), [0], num_workers=2)
    loader.batch_sampler.resume_at(DataPosition(0, 3))
    resumed = list(loader)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))


def test_seeded_batch_pickles_without_reseeding() -> None:
    batch = SeededBatch([3, 1, 2], seed=9)
    state = torch.get_rng_state()
    copy = pickle.loads(pickle.dumps(batch))
    assert copy == [3, 1, 2] and copy.seed == 9 and type(copy) is SeededBatch
    assert torch.equal(torch.get_rng_state(), state)


def test_install_is_idempotent_keeps_the_length_and_can_be_undone() -> None:
    loader = _loader(CountingNoisyDataset(), [0])
    inner = loader.batch_sampler.inner
    install(loader, order_seed=1, rank=0, epoch_fn=lambda: 0)
    assert loader.batch_sampler.inner is inner
    assert len(loader) == 7
    uninstall(loader)
    assert loader.batch_sampler is inner


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize(("loader", "reason"), [
    (DataLoader(_Stream(), batch_size=2), "IterableDataset"),
    (DataLoader(TensorDataset(torch.zeros(4)), batch_size=None), "no batch sampler"),
    ([torch.zeros(2)], "is not a torch.utils.data.DataLoader"),
])
def test_unsupported_loaders_are_named(loader: object, reason: str) -> None:
    assert reason in unsupported_reason(loader)


def test_stateful_loaders_are_recognized() -> None:
    class Stateful(DataLoader):
        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    assert is_stateful(Stateful(TensorDataset(torch.zeros(4))))
    assert not is_stateful(DataLoader(TensorDataset(torch.zeros(4))))
    assert unsupported_reason(DataLoader(TensorDataset(torch.zeros(4)), batch_size=2)) is None


def test_a_second_install_keeps_a_pending_resume() -> None:
    epoch = [0]
    loader = _loader(CountingNoisyDataset(), epoch)
    full = list(loader.batch_sampler)
    loader.batch_sampler.resume_at(DataPosition(0, 5))
    install(loader, order_seed=11, rank=0, epoch_fn=lambda: epoch[0])
    assert list(loader.batch_sampler) == full[5:]
