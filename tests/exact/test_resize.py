"""``resize``: the rest of an interrupted epoch dealt over another number of ranks, each sample once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DistributedSampler

from lightning_ckpt.lightning.exact import resize
from lightning_ckpt.lightning.exact.data_position import DataPosition, ResumableBatchSampler
from lightning_ckpt.lightning.exact.rng import RNGSnapshot

remaining_lists = st.lists(st.lists(st.integers(0, 10_000), max_size=40), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(remaining=remaining_lists, world_size=st.integers(1, 5), batch_size=st.integers(1, 9),
       cap=st.one_of(st.none(), st.integers(1, 12)))
def test_any_split_trains_every_remaining_sample_once_in_equally_many_batches_per_rank(
        remaining: list[list[int]], world_size: int, batch_size: int, cap: int | None) -> None:
    split = resize.split_remaining(remaining, world_size, batch_size, cap)
    union = [i for rank in remaining for i in rank]
    dealt = [i for rank in split.batches for batch in rank for i in batch]
    assert len(split.batches) == world_size
    counts = {len(rank) for rank in split.batches}
    assert len(counts) == 1  # every rank the same number of batches: no rank waits for another in a collective
    if not union:
        assert counts == {0} and split.padded == 0
        return
    (count,) = counts
    assert count >= 1 and (cap is None or count <= cap)
    assert all(batch for rank in split.batches for batch in rank)  # no empty batch: each rank trains each one
    # The multiset of the dealt samples is the union's first ones (all but the last `skipped`, which do not fit
    # the capped batches), plus only the repeats the split counts.
    kept = union[:len(union) - split.skipped]
    extra = Counter(dealt) - Counter(kept)
    assert Counter(dealt) - extra == Counter(kept) and sum(extra.values()) == split.padded
    assert split.samples == len(kept)
    if split.skipped:  # only when the cap bites, and then every batch is full
        assert cap is not None and count == cap and split.padded == 0
        assert len(kept) == cap * batch_size * world_size < len(union)
    else:
        assert len(union) <= (count if cap is None else cap) * batch_size * world_size
    if len(union) >= world_size * count:
        assert split.padded == 0  # repeats only where fewer samples than batches
    for rank in split.batches:
        sizes = [len(batch) for batch in rank]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert max(sizes) <= batch_size  # never a batch larger than the loader's (no surprise in GPU memory)


def test_two_ranks_to_one_keeps_each_ranks_order_rank_0_first() -> None:
    split = resize.split_remaining([[5, 1, 7, 3], [2, 8, 0, 6]], 1, 4)
    assert split.batches == [[[5, 1, 7, 3], [2, 8, 0, 6]]] and split.padded == 0


def test_one_rank_to_two_deals_round_robin_in_batches_whose_sizes_differ_by_one_at_most() -> None:
    split = resize.split_remaining([list(range(14))], 2, 4)
    # 7 samples per rank in ceil(7 / 4) = 2 batches: 4 and 3
    assert split.batches == [[[0, 2, 4, 6], [8, 10, 12]], [[1, 3, 5, 7], [9, 11, 13]]]


def test_fewer_samples_than_ranks_pad_from_the_start_and_say_how_many() -> None:
    split = resize.split_remaining([[9], [4]], 3, 4)
    assert split.batches == [[[9]], [[4]], [[9]]] and split.padded == 1 and split.samples == 2


def test_a_split_capped_at_the_epoch_length_deals_full_batches_and_counts_the_samples_that_do_not_fit() -> None:
    split = resize.split_remaining([list(range(6)), list(range(6, 10))], 1, 2, max_batches=3)
    assert split.batches == [[[0, 1], [2, 3], [4, 5]]] and (split.samples, split.skipped, split.padded) == (6, 4, 0)
    split = resize.split_remaining([list(range(10))], 2, 2, max_batches=2)  # the union's first 2 x 2 x 2 samples
    assert split.batches == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]] and split.skipped == 2


@pytest.mark.parametrize("bad", [(0, 4, None), (2, 0, None), (2, 4, 0)])
def test_a_split_over_no_rank_or_batch_is_refused(bad: tuple[int, int, int | None]) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        resize.split_remaining([[1, 2]], *bad)


def _sampler(rank: int, world: int, n: int = 40, batch_size: int = 4) -> ResumableBatchSampler:
    inner = BatchSampler(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3),
                         batch_size, drop_last=False)
    return ResumableBatchSampler(inner, order_seed=7, rank=rank, epoch_fn=lambda: 1)


def test_the_saved_remaining_is_what_the_rank_has_not_trained_of_the_epoch() -> None:
    sampler = _sampler(0, 2)
    batches = sampler.epoch_batches(1)
    state = resize.remaining_state(sampler, DataPosition(1, 2), float("inf"))
    assert state is not None and state[resize.K_DEALT] is False
    assert resize.saved_batches(state, "x") == batches[2:]
    assert resize.remaining_state(sampler, DataPosition(2, 0), float("inf")) is None  # an epoch's start
    limited = resize.remaining_state(sampler, DataPosition(1, 2), 4)  # limit_train_batches=4
    assert resize.saved_batches(limited, "x") == batches[2:4]


def test_batches_a_rollback_skips_are_not_remaining() -> None:
    inner = BatchSampler(DistributedSampler(range(40), num_replicas=2, rank=0, shuffle=True, seed=3), 4, False)
    sampler = ResumableBatchSampler(inner, order_seed=7, rank=0, epoch_fn=lambda: 1, skip=[DataPosition(1, 3)])
    batches = sampler.epoch_batches(1)
    state = resize.remaining_state(sampler, DataPosition(1, 2), float("inf"))
    assert resize.saved_batches(state, "x") == [batches[2]] + batches[4:]
    assert state[resize.K_INDICES].dtype == torch.int32


def test_a_dealt_epoch_is_the_samplers_order_until_its_end_and_saved_as_dealt() -> None:
    sampler = _sampler(0, 1)
    sampler.resume_at(DataPosition(1, 7), [[3, 4], [5]])
    assert sampler.epoch_batches(1) == [[]] * 7 + [[3, 4], [5]]
    assert [list(b) for b in sampler] == [[3, 4], [5]]
    state = resize.remaining_state(sampler, DataPosition(1, 8), float("inf"))
    assert resize.saved_batches(state, "x") == [[5]] and state[resize.K_DEALT] is True
    assert sampler.epoch_batches(2) == _sampler(0, 1).epoch_batches(2)  # the next epochs are the sampler's own


def test_two_ranks_saves_resumed_on_one_rank_train_the_rest_of_the_epoch_once() -> None:
    old = [_sampler(r, 2) for r in range(2)]
    done = 2
    states = [{resize.K_REMAINING: resize.remaining_state(s, DataPosition(1, done), float("inf"))} for s in old]
    plan = resize.Reposition.of(1, done, 10, states, "ckpt", same_world=False)
    assert plan is not None
    new = _sampler(0, 1)
    loader = torch.utils.data.DataLoader(range(40), batch_sampler=new)
    position, mine, reports = plan.place(0, 1, new, loader, len(new))
    trained = [i for s in old for b in s.epoch_batches(1)[:done] for i in b] + [i for b in mine for i in b]
    assert sorted(trained) == list(range(40))  # the epoch's multiset: each sample once
    assert position == DataPosition(1, len(new) - len(mine)) and len(mine) == 6
    (report,) = reports
    assert report.status == "resized" and report.message == (
        "world size 2 -> 1: data position carried over (the 24 samples left of epoch 1 dealt over 1 rank, 6 batches "
        "each: no sample repeated or skipped); per-rank RNG of rank 0 carried over, of rank 1 dropped; the interrupted "
        "epoch's per-rank metric, logged and accumulated-gradient states are not carried over; bit-exactness not "
        "expected")


def test_the_saving_world_size_resumes_at_its_position_unless_the_epoch_was_dealt() -> None:
    sampler = _sampler(0, 1)
    state = {resize.K_REMAINING: resize.remaining_state(sampler, DataPosition(1, 3), float("inf"))}
    assert resize.Reposition.of(1, 3, 3, [state], "ckpt", same_world=True) is None
    assert resize.Reposition.of(1, 0, 3, [state], "ckpt", same_world=False) is None  # an epoch's start
    assert resize.Reposition.of(1, 3, 3, [{}], "ckpt", same_world=False) is None  # saved without it
    sampler.resume_at(DataPosition(1, 7), [[3, 4], [5]])
    dealt = {resize.K_REMAINING: resize.remaining_state(sampler, DataPosition(1, 8), float("inf"))}
    plan = resize.Reposition.of(1, 8, 3, [dealt], "ckpt", same_world=True)
    assert plan is not None
    position, mine, reports = plan.place(0, 1, sampler, torch.utils.data.DataLoader(range(40)), 10)
    assert (position, mine, reports) == (DataPosition(1, 9), [[5]], [])


def test_a_dealt_epoch_resumed_under_a_smaller_limit_trains_what_fits_and_warns_of_the_rest() -> None:
    sampler = _sampler(0, 1)
    sampler.resume_at(DataPosition(1, 6), [[3, 4], [5, 6], [7]])
    dealt = {resize.K_REMAINING: resize.remaining_state(sampler, DataPosition(1, 7), float("inf"))}
    plan = resize.Reposition.of(1, 7, 3, [dealt], "ckpt", same_world=True)
    assert plan is not None
    # Its 2 batches left are the last 2 of any epoch at least that long (the count is renumbered to match).
    assert plan.place(0, 1, sampler, torch.utils.data.DataLoader(range(40)), 8) == (DataPosition(1, 6), [[5, 6], [7]], [])
    with pytest.warns(UserWarning, match="1 sample left of epoch 1 in ckpt is not trained: the epoch has 1 batch left"):
        placed = plan.place(0, 1, sampler, torch.utils.data.DataLoader(range(40)), 1)  # limit_train_batches=1
    assert placed == (DataPosition(1, 0), [[5, 6]], [])


def test_a_resume_on_another_world_size_under_a_limit_deals_full_batches_up_to_it_and_says_what_it_skips() -> None:
    old = [_sampler(r, 2) for r in range(2)]  # 5 batches of 4 per rank; 3 left on each after batch 2
    states = [{resize.K_REMAINING: resize.remaining_state(s, DataPosition(1, 2), float("inf"))} for s in old]
    plan = resize.Reposition.of(1, 2, 4, states, "ckpt", same_world=False)
    assert plan is not None
    new = _sampler(0, 1)
    with pytest.warns(UserWarning, match="8 samples left of epoch 1 in ckpt are not trained: the epoch has 4 batches"):
        position, mine, reports = plan.place(0, 1, new, torch.utils.data.DataLoader(range(40)), 4)
    left = [b for s in old for b in s.epoch_batches(1)[2:]]
    assert position == DataPosition(1, 0) and mine == left[:4]  # 4 batches of batch_size, in the saved order
    (report,) = reports
    assert report.message.startswith(
        "world size 2 -> 1: data position carried over (of the 24 samples left of epoch 1, 16 dealt over 1 rank, 4 "
        "batches each, and 8 skipped: the epoch has no more batches left (limit_train_batches applied), of at most "
        "batch_size samples; none repeated); ")


def test_a_dealt_epoch_saved_with_unequal_batch_counts_is_refused_on_every_rank() -> None:
    plan = resize.Reposition(1, 3, [[[0, 1], [2]], [[3, 4]]], "ckpt")
    for rank in range(2):
        with pytest.raises(ValueError, match=r"the ranks of ckpt saved \[2, 1\] dealt batches"):
            plan.place(rank, 2, _sampler(rank, 2), torch.utils.data.DataLoader(range(40)), 5)


@pytest.mark.parametrize(("state", "key"), [
    ({"indices": torch.tensor([1, 2, 3]), "sizes": torch.tensor([2])}, "sizes"),
    ({"indices": torch.tensor([1.0, 2.0]), "sizes": torch.tensor([2])}, "indices"),
    ({"indices": torch.tensor([1 + 0j, 2 + 0j]), "sizes": torch.tensor([2])}, "indices"),
    ({"indices": torch.tensor([1, 2], dtype=torch.int16), "sizes": torch.tensor([2])}, "indices"),
    ({"indices": torch.tensor([[1, 2]]), "sizes": torch.tensor([2])}, "indices"),
    ({"indices": torch.tensor([1]), "sizes": torch.tensor([True])}, "sizes"),
    ({"indices": torch.tensor([-1, 2]), "sizes": torch.tensor([2])}, "indices"),
    ({"indices": torch.tensor([], dtype=torch.int32), "sizes": torch.zeros(10**6, dtype=torch.int64)}, "sizes"),
    ({"indices": torch.tensor([1, 2]), "sizes": torch.tensor([3, -1])}, "sizes"),
    ({"indices": [1, 2], "sizes": [2]}, "indices"),
])
def test_a_malformed_saved_remaining_is_refused_naming_the_checkpoint_and_its_key(state: object, key: str) -> None:
    with pytest.raises(ValueError, match=f"the remaining samples saved in ckpt/step=3 .rank 1. are malformed: "
                                         f"'remaining.{key}' must be"):
        resize.saved_batches(state, "ckpt/step=3 (rank 1)")
    with pytest.raises(ValueError, match="'remaining' must be a mapping, got str"):
        resize.saved_batches("not a mapping", "ckpt")


def test_a_saved_index_past_the_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="holds sample index 40, but the train dataset has 40 samples"):
        resize.check_indices([[1, 40]], 40, "ckpt")
    resize.check_indices([[1, 39]], 40, "ckpt")


def test_every_new_rank_refuses_an_index_past_the_dataset_even_one_dealt_to_another_rank() -> None:
    """A dataset that shrank: the index past it is dealt to rank 1 only; rank 0 must not go on alone (a hang)."""
    plan = resize.Reposition(1, 3, [[[0, 1], [2, 39]]], "ckpt")  # dealt over 2 ranks: [0, 2] and [1, 39]
    for rank in range(2):
        sampler = _sampler(rank, 2, n=39, batch_size=2)
        with pytest.raises(ValueError, match="ckpt holds sample index 39, but the train dataset has 39 samples"):
            plan.place(rank, 2, sampler, torch.utils.data.DataLoader(range(39)), len(sampler))


def test_a_new_ranks_streams_are_derived_from_the_order_seed_the_step_and_the_rank() -> None:
    before = RNGSnapshot.capture()
    try:
        a, b = resize.derived_rng(7, 10, 1), resize.derived_rng(7, 10, 1)
        c = resize.derived_rng(7, 10, 2)
    finally:
        before.restore()
    assert torch.equal(a.torch_state, b.torch_state) and not torch.equal(a.torch_state, c.torch_state)
    saved = [before.to_state_dict()]
    assert torch.equal(resize.rank_rng(saved, 0, 7, 10).torch_state, before.torch_state)  # a saving rank's own


def test_the_text_says_which_streams_carry_over() -> None:
    assert resize.rng_text(1, 2) == ("per-rank RNG of rank 0 carried over, of rank 1 re-derived (from the order seed, "
                                     "the step and the rank)")
    assert resize.rng_text(4, 2) == "per-rank RNG of ranks 0-1 carried over, of ranks 2-3 dropped"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), old=st.integers(1, 3), new=st.integers(1, 3), batch_size=st.integers(1, 5),
       done=st.integers(1, 20))
def test_any_resize_of_a_distributed_epoch_trains_the_uninterrupted_epochs_samples(
        n: int, old: int, new: int, batch_size: int, done: int) -> None:
    """Saving ranks ``old`` (DistributedSampler shares) stopped ``done`` batches in; ``new`` ranks train the rest."""
    saving = [_sampler(r, old, n, batch_size) for r in range(old)]
    length = len(saving[0])
    done = min(done, length - 1)
    if done < 1:
        return  # a one-batch epoch has no middle
    uninterrupted = Counter(i for s in saving for b in s.epoch_batches(1) for i in b)
    states = [{resize.K_REMAINING: resize.remaining_state(s, DataPosition(1, done), float("inf"))} for s in saving]
    plan = resize.Reposition.of(1, done, 5, states, "ckpt", same_world=old == new)
    resuming = [_sampler(r, new, n, batch_size) for r in range(new)]
    if plan is None:  # the saving world size: each rank goes on from its position in its own order
        assert old == new
        return
    placed = [plan.place(r, new, s, torch.utils.data.DataLoader(range(n)), len(s)) for r, s in enumerate(resuming)]
    before = Counter(i for s in saving for b in s.epoch_batches(1)[:done] for i in b)
    after = Counter(i for _, mine, _ in placed for b in mine for i in b)
    padded = {report.message for _, _, reports in placed for report in reports if "repeated to give" in report.message}
    assert not uninterrupted - (before + after)  # no sample skipped
    if not padded:
        assert before + after == uninterrupted  # and none repeated
    assert len({len(mine) for _, mine, _ in placed}) == 1  # equally many batches on every new rank
    assert all(0 <= position.batch == len(s) - len(mine) for (position, mine, _), s in zip(placed, resuming))
