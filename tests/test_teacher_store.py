"""Teacher records in a store: writing them per shard and side, reading rows back, and refusing damage."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

import logitstore
from logitstore import teacher as T
from logitstore import teacher_store as TS
from logitstore.errors import DamagedFileError, FormatError

VOCAB = 50


def _logits(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.standard_normal((n, VOCAB)) * 3).astype(np.float32)


def teacher_rows(writer, shard: int, entry: dict, seed: int = 0) -> dict:
    """Synthetic shard data plus one teacher record per row and side, from logits kept for the checks."""
    rows = writer.shard_rows(shard)
    rng = np.random.default_rng([seed, shard])
    data: dict = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    logits: dict = {"chosen": [], "rejected": []}
    for row in rows:
        data["prompt_ids"].append(rng.integers(0, VOCAB, int(rng.integers(1, 5))))
        for side in ("chosen", "rejected"):
            n = int(rng.integers(0, 9)) if row % 5 else 0  # some rows have no scored tokens
            data[f"{side}_ids"].append(rng.integers(0, VOCAB, n))
            logits[side].append(_logits(rng, n))
    for side in ("chosen", "rejected"):
        values = [np.zeros(len(c), np.float32) - 1 for c in data[f"{side}_ids"]]
        data[f"{side}_logps"] = np.array([v.sum() for v in values])
        data[f"{side}_tokens"] = np.array([len(v) for v in values])
        records = []
        for row, lg in zip(rows, logits[side]):
            if entry["kind"] == "top_k":
                k = entry["k"]
                records.append(T.top_k(lg, k) if len(lg) else T.TopK(
                    np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)))
            else:
                records.append(T.sample(lg, entry["k"], seed=entry["seed"], stream=row) if len(lg) else T.Sampled(
                    np.zeros((0, entry["k"]), np.int32), np.zeros((0, entry["k"]), np.uint16), entry["k"]))
        data[f"teacher/{side}"] = records
    return data, logits


def build(path, entry, n=23, rows_per_shard=8):
    writer = logitstore.create(path, [f"ex-{i}" for i in range(n)], fingerprint={"test": "teacher"},
                               vocab_size=VOCAB, max_length=16, rows_per_shard=rows_per_shard, inner_chunk=64,
                               teacher=entry)
    kept = {}
    for shard in writer.missing_shards:
        data, logits = teacher_rows(writer, shard, entry)
        writer.write_shard(shard, data)
        for side in logits:
            for row, lg in zip(writer.shard_rows(shard), logits[side]):
                kept[(side, row)] = lg
    writer.finalize()
    return kept


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "topk.lstore"
    entry = TS.entry("top_k", 6, VOCAB, codec="exact")
    logits = build(path, entry)
    return path, logits


def test_top_k_reads_back_every_row(topk_store):
    path, logits = topk_store
    store = logitstore.open(path)
    assert store.teacher == {"kind": "top_k", "k": 6, "codec": "exact", "seed": None, "block_positions": 1024,
                             "vocab": VOCAB}
    assert store.header["shard_files"][-2:] == ["teacher/chosen", "teacher/rejected"]
    for side in ("chosen", "rejected"):
        rows = np.arange(len(store))[::-1]  # any order, across shards
        got = store.top_k(side, rows)
        assert set(got) == {"ids", "logps", "tail_logp"}
        for i, row in enumerate(rows.tolist()):
            want = T.top_k(logits[(side, row)], 6) if len(logits[(side, row)]) else None
            t = int(store.row_values([row])[f"{side}_tokens"][0])
            assert got["ids"][i].shape == (t, 6) and got["ids"][i].dtype == np.int32
            assert got["logps"][i].shape == (t, 6) and got["logps"][i].dtype == np.float32
            assert got["tail_logp"][i].shape == (t,) and got["tail_logp"][i].dtype == np.float32
            if want is not None:  # the exact codec gives back the float32 record bit for bit
                np.testing.assert_array_equal(got["ids"][i], want.ids)
                np.testing.assert_array_equal(got["logps"][i], want.logps)
                np.testing.assert_array_equal(got["tail_logp"][i], want.tail_logp)


def test_sampled_store_reads_counts(tmp_path):
    entry = TS.entry("sampled", 5, VOCAB, seed=3)
    logits = build(tmp_path / "s.lstore", entry, n=10)
    store = logitstore.open(tmp_path / "s.lstore")
    got = store.top_k("rejected", [0, 9, 4])
    assert set(got) == {"ids", "counts"}
    for i, row in enumerate([0, 9, 4]):
        lg = logits[("rejected", row)]
        want = T.sample(lg, 5, seed=3, stream=row)
        np.testing.assert_array_equal(got["ids"][i], want.ids)
        np.testing.assert_array_equal(got["counts"][i], want.counts)
        assert (got["counts"][i].sum(axis=1) == 5).all()


def test_store_without_teacher_is_one_line(tmp_path):
    from tests.synthetic import fill

    fill(tmp_path / "plain.lstore", n=8, rows_per_shard=8)
    store = logitstore.open(tmp_path / "plain.lstore")
    assert store.teacher is None
    with pytest.raises(TS.NoTeacherError) as err:
        store.top_k("chosen", [0])
    assert str(err.value) == (f"{store.location.url} holds no top-k teacher records; rebuild with --top-k K "
                              "(or --sample-k K)")


def test_unknown_side_and_rows(topk_store):
    store = logitstore.open(topk_store[0])
    with pytest.raises(ValueError, match="side must be one of chosen, rejected, got 'completion'"):
        store.top_k("completion", [0])
    with pytest.raises(logitstore.LogitstoreError, match="out of range"):
        store.top_k("chosen", [len(store)])


def test_teacher_files_are_byte_identical_when_rewritten(tmp_path):
    entry = TS.entry("top_k", 4, VOCAB, codec="standard")
    build(tmp_path / "a.lstore", entry)
    build(tmp_path / "b.lstore", entry)
    for key in ("teacher/chosen/c/0", "teacher/rejected/c/2"):
        a, b = (open(tmp_path / name / key, "rb").read() for name in ("a.lstore", "b.lstore"))
        assert a == b


def test_a_resumed_plan_must_ask_for_the_same_teacher(tmp_path):
    entry = TS.entry("top_k", 4, VOCAB, codec="standard")
    build(tmp_path / "a.lstore", entry, n=8)
    with pytest.raises(logitstore.FingerprintMismatchError, match="was planned with teacher records"):
        logitstore.create(tmp_path / "a.lstore", [f"ex-{i}" for i in range(8)], fingerprint={"test": "teacher"},
                          vocab_size=VOCAB, max_length=16, rows_per_shard=8, inner_chunk=64,
                          teacher=TS.entry("top_k", 5, VOCAB, codec="standard"))


def test_writer_refuses_records_that_do_not_match_the_counts(tmp_path):
    entry = TS.entry("top_k", 4, VOCAB, codec="standard")
    writer = logitstore.create(tmp_path / "w.lstore", ["a", "b"], fingerprint={"t": 1}, vocab_size=VOCAB,
                               max_length=16, rows_per_shard=2, inner_chunk=64, teacher=entry)
    data, _ = teacher_rows(writer, 0, entry)
    data["teacher/chosen"] = data["teacher/chosen"][:1] + [T.top_k(_logits(np.random.default_rng(0), 3), 4)]
    data["chosen_tokens"] = np.array([len(data["teacher/chosen"][0].ids), 2])
    with pytest.raises(ValueError, match=r"teacher/chosen: row 1 has 3 records for 2 scored tokens"):
        writer.write_shard(0, data)


# ---- the torch loader -----------------------------------------------------------------------------------------


def test_loader_pads_teacher_records_in_pad_pairs_layout(topk_store):
    import torch

    from logitstore.loader import make_loader

    path, logits = topk_store
    loader, _ = make_loader(str(path), 4, shuffle=False, drop_last=False, pin_memory=False, teacher=True)
    store = logitstore.open(path)
    batches = list(loader)
    assert len(batches) == 6
    for batch in batches:
        rows = batch["rows"].tolist()
        b = len(rows)
        comp = batch["completion_mask"]
        width = int(max(comp.sum(dim=1)))
        assert batch["teacher_ids"].shape == (2 * b, width, 6) and batch["teacher_ids"].dtype == torch.int64
        assert batch["teacher_logps"].shape == (2 * b, width, 6) and batch["teacher_logps"].dtype == torch.float32
        assert batch["teacher_tail_logp"].shape == (2 * b, width)
        assert "teacher_counts" not in batch
        for j in range(2 * b):
            side, row = ("chosen", "rejected")[j // b], rows[j % b]
            lg = logits[(side, row)]
            n = len(lg)
            assert int(comp[j].sum()) == n  # the synthetic prompts are never empty: every token is scored
            if n:
                want = T.top_k(lg, 6)
                np.testing.assert_array_equal(batch["teacher_ids"][j, :n].numpy(), want.ids)
                np.testing.assert_array_equal(batch["teacher_logps"][j, :n].numpy(), want.logps)
                np.testing.assert_array_equal(batch["teacher_tail_logp"][j, :n].numpy(), want.tail_logp)
                # entry t is the distribution over the token at input position prompt_len + t
                start = int(comp[j].argmax())
                assert start == len(store.ragged("prompt_ids", [row])[0])
            assert (batch["teacher_ids"][j, n:] == 0).all()
            assert torch.isneginf(batch["teacher_logps"][j, n:]).all()
            assert torch.isneginf(batch["teacher_tail_logp"][j, n:]).all()


def test_loader_pads_sampled_counts(tmp_path):
    from logitstore.loader import make_loader

    entry = TS.entry("sampled", 5, VOCAB, seed=3)
    logits = build(tmp_path / "s.lstore", entry, n=10)
    loader, _ = make_loader(str(tmp_path / "s.lstore"), 5, shuffle=False, pin_memory=False, teacher=True)
    batch = next(iter(loader))
    assert set(k for k in batch if k.startswith("teacher_")) == {"teacher_ids", "teacher_counts"}
    for j in range(10):
        side, row = ("chosen", "rejected")[j // 5], j % 5
        want = T.sample(logits[(side, row)], 5, seed=3, stream=row)
        n = len(want.ids)
        np.testing.assert_array_equal(batch["teacher_ids"][j, :n].numpy(), want.ids)
        np.testing.assert_array_equal(batch["teacher_counts"][j, :n].numpy(), want.counts)
        assert (batch["teacher_counts"][j, n:] == 0).all()
        assert (batch["teacher_counts"][j, :n].sum(dim=1) == 5).all()


def test_teacher_row_with_an_empty_prompt_starts_at_one():
    from logitstore.loader import pad_teacher

    rec = T.top_k(_logits(np.random.default_rng(2), 2), 3)
    records = {"ids": [rec.ids], "logps": [rec.logps], "tail_logp": [rec.tail_logp]}
    empty = {"ids": [np.zeros((0, 3), np.int32)], "logps": [np.zeros((0, 3), np.float32)],
             "tail_logp": [np.zeros(0, np.float32)]}
    out = pad_teacher([records, empty], [np.zeros(0)], [[np.arange(3)], [np.arange(1)]])
    assert out["teacher_ids"].shape == (2, 3, 3)
    assert (out["teacher_ids"][0, 0] == 0).all() and np.isneginf(out["teacher_logps"][0, 0].numpy()).all()
    np.testing.assert_array_equal(out["teacher_ids"][0, 1:].numpy(), rec.ids)
    assert np.isneginf(out["teacher_tail_logp"][1].numpy()).all()
    with pytest.raises(ValueError, match=r"^teacher records of batch row 0 do not match its completion \(2 records "
                                         r"for 3 tokens\)$"):
        pad_teacher([records, empty], [np.arange(2)], [[np.arange(3)], [np.arange(1)]])


def test_loader_refuses_a_store_without_teacher_records(tmp_path):
    from logitstore.loader import make_loader
    from tests.synthetic import fill

    fill(tmp_path / "plain.lstore", n=8, rows_per_shard=8)
    with pytest.raises(TS.NoTeacherError, match=r"holds no top-k teacher records; rebuild with --top-k K"):
        make_loader(str(tmp_path / "plain.lstore"), 4, teacher=True)


# ---- info, subset, merge ----------------------------------------------------------------------------------------


def test_info_shows_the_teacher_entry(topk_store):
    from logitstore.describe import describe, render

    store = logitstore.open(topk_store[0])
    s = describe(store)
    t = s["teacher"]
    positions = sum(int(store.row_values(range(len(store)))[f"{side}_tokens"].sum()) for side in ("chosen",
                                                                                                 "rejected"))
    sizes = sum((topk_store[0] / f"teacher/{side}/c/{k}").stat().st_size for side in ("chosen", "rejected")
                for k in range(3))
    assert (t["kind"], t["k"], t["positions"], t["bytes"]) == ("top_k", 6, positions, sizes)
    line = [x for x in render(s).splitlines() if x.startswith("  teacher")][0]
    assert line == (f"  teacher       top-6 (exact) of 50 tokens at {positions} positions: "
                    f"{logitstore.describe.human_bytes(sizes)} ({sizes / positions:.1f} B per position)")


def test_subset_and_merge_carry_teacher_records(topk_store, tmp_path):
    path, _ = topk_store
    store = logitstore.open(path)
    keep = [store.id_of(r) for r in (1, 4, 9, 17, 22)]
    logitstore.subset(path, tmp_path / "sub", ids=keep, rows_per_shard=2)
    sub = logitstore.open(tmp_path / "sub")
    assert sub.teacher == store.teacher and logitstore.verify(tmp_path / "sub").ok
    for side in ("chosen", "rejected"):
        a, b = store.top_k(side, [1, 4, 9, 17, 22]), sub.top_k(side, range(5))
        for name in a:
            for x, y in zip(a[name], b[name]):
                np.testing.assert_array_equal(x, y)
    rest = [i for i in store.ids if i not in keep]
    logitstore.subset(path, tmp_path / "rest", ids=rest)
    logitstore.merge([tmp_path / "sub", tmp_path / "rest"], tmp_path / "merged")
    merged = logitstore.open(tmp_path / "merged")
    for side in ("chosen", "rejected"):
        a = store.top_k(side, store.rows(merged.ids))
        b = merged.top_k(side, range(len(merged)))
        for name in a:
            for x, y in zip(a[name], b[name]):
                np.testing.assert_array_equal(x, y)


def test_merge_refuses_stores_with_other_teacher_records(topk_store, tmp_path):
    build(tmp_path / "k4.lstore", TS.entry("top_k", 4, VOCAB, codec="exact"), n=8)
    with pytest.raises(logitstore.FingerprintMismatchError, match=r"they differ in teacher records \(one lacks "):
        logitstore.merge([topk_store[0], tmp_path / "k4.lstore"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
