"""The training loader: TRL's batch layout, deterministic rank-aware order, resumable position, workers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from logitstore.loader import PairBatchSampler, PairDataset, Prefetcher, collate, make_loader

from synthetic import fill


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "s"
    fill(path, n=100, per_token=False)
    return str(path)


def test_collate_matches_trl_data_collator(store_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ds = PairDataset(store_path)
    raw = ds.__getitems__([3, 17, 42])
    ours = collate(raw, pad_token_id=0)
    examples = [{"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()}
                for p, c, r in zip(raw["prompt_ids"], raw["chosen_ids"], raw["rejected_ids"])]
    theirs = DataCollatorForPreference(pad_token_id=0)(examples)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["ref_chosen_logps"].dtype == torch.float32
    assert torch.equal(ours["ref_chosen_logps"], torch.from_numpy(raw["chosen_logps"]))


def test_order_is_a_function_of_seed_and_epoch():
    a = PairBatchSampler(100, 8, seed=3)
    b = PairBatchSampler(100, 8, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(0)
    assert list(a) != list(b)
    assert sorted(r for batch in PairBatchSampler(100, 10, seed=1, drop_last=False) for r in batch) == list(range(100))


def test_ranks_split_each_global_batch():
    whole = list(PairBatchSampler(100, 8, seed=5))
    parts = [list(PairBatchSampler(100, 8, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    for batch, p0, p1 in zip(whole, *parts):
        assert sorted(batch) == sorted(p0 + p1) and not set(p0) & set(p1) and len(p0) == len(p1) == 4


def test_saved_position_resumes_mid_epoch():
    sampler = PairBatchSampler(100, 8, seed=2)
    sampler.set_epoch(4)
    it = iter(sampler)
    first = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    rest = list(it)
    again = PairBatchSampler(100, 8, seed=0)
    again.load_state_dict(state)
    assert list(again) == rest and len(first + rest) == len(sampler)


def test_saved_position_is_what_was_consumed_when_the_loader_fetches_ahead(store_path):
    loader, sampler = make_loader(store_path, 4, seed=1)
    batches = iter(Prefetcher(loader, depth=3))
    used = [next(batches)["rows"].tolist() for _ in range(2)]
    deadline = time.monotonic() + 60
    while sampler.position < 2 + 3 + 1 and time.monotonic() < deadline:  # the prefetch thread fills its queue
        time.sleep(0.01)
    assert sampler.position == 2 + 3 + 1  # three batches queued, one waiting to be queued
    state = sampler.state_dict(batches_consumed=2)
    assert state == {"epoch": 0, "position": 2, "seed": 1}
    again = PairBatchSampler(len(sampler.rows), 4, seed=0)
    again.load_state_dict(state)
    assert next(iter(again)) == sampler.global_batches(0)[2].tolist()
    assert used == [b.tolist() for b in sampler.global_batches(0)[:2]]


def test_grouping_by_length_cuts_padding(store_path):
    ds = PairDataset(store_path)
    lengths = ds.lengths()

    def padding(sampler):
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in sampler)

    plain = PairBatchSampler(len(ds), 8, seed=0)
    grouped = PairBatchSampler(len(ds), 8, seed=0, lengths=lengths, group_size=50)
    assert padding(grouped) < padding(plain) / 2
    assert sorted(r for b in grouped for r in b) == sorted(r for b in plain for r in b)


def test_worker_processes_and_prefetch_give_the_same_batches(store_path):
    loader0, _ = make_loader(store_path, 8, seed=1)
    loader2, _ = make_loader(store_path, 8, seed=1, num_workers=2)
    for a, b, c in zip(loader0, loader2, Prefetcher(make_loader(store_path, 8, seed=1)[0])):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_ids"], c["input_ids"])
        assert torch.equal(a["ref_rejected_logps"], b["ref_rejected_logps"])


def test_prefetcher_passes_errors_through():
    def broken():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(Prefetcher(broken()))


def test_dataset_pickles_without_its_maps(store_path):
    import pickle

    ds = PairDataset(store_path)
    ds.__getitems__([0, 1])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None
    assert np.array_equal(clone.__getitems__([5])["chosen_ids"][0], ds.__getitems__([5])["chosen_ids"][0])
