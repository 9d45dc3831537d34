"""Teacher records from a hostile or damaged store: the header entry checked against the reader's limits, each file
committed and checksummed per shard, its head checked against the header and the rows, every block checked against
its kind, K and positions before it is decoded, and decoding bounded.

Same setting as tests/test_hostile.py: each case runs in this process and asserts the exact refusal; `recommit`
gives a changed file a matching commit row, so that only the reader's own checks stand in the way.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import header as H
from logitstore import teacher as T
from logitstore import teacher_blocks as TB
from logitstore import teacher_store as TS
from logitstore import topk_codec as C

from forge import header, recommit, refusal, store, write_header  # noqa: F401 (store: a copy of this pristine)
from test_teacher_store import VOCAB, _logits, build

KEY = "teacher/chosen/c/1"
SHARD_1 = "shard 1, 8 examples (ex-8, ex-9, ex-10 and 5 more)"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """23 rows in 3 shards of 8, top-6 records of a 50-token teacher, exact values."""
    path = tmp_path_factory.mktemp("pristine") / "s"
    build(path, TS.entry("top_k", 6, VOCAB, codec="exact"))
    return path


def read_shard(store: Path) -> object:
    return lambda: logitstore.open(store).top_k("chosen", range(8, 16))


def block_start(data: bytes) -> int:
    _, _, _, blocks, order = TS._FILE_HEAD.unpack_from(data)
    return TS._FILE_HEAD.size + 4 * blocks + order


# ---- the header entry ------------------------------------------------------------------------------------------

def test_a_reader_without_teacher_records_refuses_the_store_on_its_header(store, monkeypatch):
    """No version bump: a reader that does not know the key refuses the store before it reads a file."""
    monkeypatch.setattr(H, "HEADER_KEYS", H.HEADER_KEYS - {"teacher"})
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: unknown header key 'teacher' (format version 2 has no such key)")


@pytest.mark.parametrize("change, message", [
    ({"k": 0}, "header teacher.k must be an integer in [1, 50] for a top_k store"),
    ({"k": 51}, "header teacher.k must be an integer in [1, 50] for a top_k store"),
    ({"k": True}, "header teacher.k must be an integer in [1, 50] for a top_k store"),
    ({"vocab": 1 << 23}, "header teacher.vocab must be an integer in [1, 4194304]"),
    ({"block_positions": 1 << 22}, "header teacher.block_positions must be a positive integer with "
                                   "block_positions * k at most 4194304"),
    ({"kind": "full"}, "header teacher.kind must be top_k or sampled, got 'full'"),
    ({"codec": "zip"}, "header teacher: a top_k store has a codec (exact, fine, standard, compact, sqrt, "
                       "sqrt-compact) and seed null"),
    ({"kind": "sampled"}, "header teacher: a sampled store has codec null and an integer seed from 0"),
    ({"extra": 1}, "header teacher must be an object with exactly block_positions, codec, k, kind, seed, vocab"),
])
def test_bad_header_entries_are_refused_on_open(store, change, message):
    h = header(store)
    h["teacher"].update(change)
    write_header(store, h)
    assert refusal(lambda: logitstore.open(store)) == f"{store}: {message}"


def test_a_teacher_entry_without_its_files_is_refused(store):
    h = header(store)
    h["shard_files"] = h["shard_files"][:-2]
    write_header(store, h)
    assert refusal(lambda: logitstore.open(store)).startswith(f"{store}: header shard_files must be [")


def test_wrong_k_in_the_header_is_refused_at_the_block(store):
    h = header(store)
    h["teacher"]["k"] = 5
    write_header(store, h)
    assert refusal(read_shard(store)) == (f"{store}: {KEY}: block 0: teacher block: holds 20 positions of K = 6, "
                                          "expected 20 of K = 5")


# ---- the files -------------------------------------------------------------------------------------------------

def test_a_damaged_file_fails_its_checksum(store):
    data = bytearray((store / KEY).read_bytes())
    data[-5] ^= 0xFF
    (store / KEY).write_bytes(bytes(data))
    assert refusal(read_shard(store)) == (f"{store}: damaged file {KEY} (its SHA-256 differs from the commit "
                                          f"record): {SHARD_1}")
    assert logitstore.verify(store).problems == [f"damaged file {KEY}: {SHARD_1}"]


def test_a_block_of_another_kind_is_refused_though_its_record_matches(store):
    data = bytearray((store / KEY).read_bytes())
    data[block_start(data) + 4] = 2  # the block says sampled
    (store / KEY).write_bytes(bytes(data))
    recommit(store, KEY)
    message = f"{store}: {KEY}: block 0: teacher block: not a top_k block"
    assert refusal(read_shard(store)) == message
    assert logitstore.verify(store).problems == [message]


@pytest.mark.parametrize("edit, message", [
    (lambda d: b"XXXX" + d[4:], "not a teacher file"),
    (lambda d: d[:4] + struct.pack("<I", 60) + d[8:], "holds a vocabulary of 60, the header says 50"),
    (lambda d: d[:8] + struct.pack("<Q", 21) + d[16:], "holds 21 positions, the shard's rows have 20 scored tokens"),
    (lambda d: d[:16] + struct.pack("<I", 2) + d[20:], "holds 2 blocks, 20 positions take 1"),
    (lambda d: d[:20] + struct.pack("<I", 1 << 30) + d[24:],
     "its block table and context run past the end of the file"),
    (lambda d: d + b"\0", "the block sizes do not add up to the file's size"),
    (lambda d: d[:10], "shorter than its header"),
])
def test_a_file_head_that_disagrees_with_the_header_or_the_rows_is_refused(store, edit, message):
    (store / KEY).write_bytes(edit((store / KEY).read_bytes()))
    recommit(store, KEY)
    assert refusal(read_shard(store)) == f"{store}: {KEY}: {message}"


def test_a_context_whose_order_is_not_a_permutation_is_refused(store):
    data = (store / KEY).read_bytes()
    _, _, _, blocks, order = TS._FILE_HEAD.unpack_from(data)
    bad = C._pack(np.array([2, 7, 7, 0], np.uint64))  # a token twice, no prior
    at = TS._FILE_HEAD.size + 4 * blocks
    data = data[:20] + struct.pack("<I", len(bad)) + data[24:at] + bad + data[at + order:]
    (store / KEY).write_bytes(data)
    recommit(store, KEY)
    assert refusal(read_shard(store)) == (f"{store}: {KEY}: teacher context: the order is "
                                          "not a permutation of the vocabulary")


def test_a_recorded_size_past_the_limit_is_refused_before_reading(store):
    h = header(store)
    limit = TS.file_limit(h["teacher"], h["rows_per_shard"] * h["max_length"])
    (store / KEY).write_bytes(b"\0" * (limit + 1))
    recommit(store, KEY)
    assert refusal(read_shard(store)) == (f"{store}: the commit record of shard 1 gives {KEY} {limit + 1} bytes, "
                                          f"more than a file of its kind can have ({limit})")


def test_a_symlinked_teacher_file_is_refused(store):
    outside = store.parent / "outside"
    outside.write_bytes((store / KEY).read_bytes())
    (store / KEY).unlink()
    os.symlink(outside, store / KEY)
    assert refusal(read_shard(store)) == (f"{store}: refusing {KEY}: a symbolic link or not a regular file inside "
                                          "the store")
    assert f"symbolic link in the store: {KEY}" in logitstore.verify(store).problems


def test_a_missing_teacher_file_is_damage(store):
    (store / KEY).unlink()
    assert refusal(read_shard(store)) == f"{store}: missing file {KEY} of committed shard 1, {SHARD_1[9:]}"


def test_a_teacher_file_recorded_absent_is_refused(store):
    (store / KEY).unlink()
    recommit(store, KEY)  # size 0: absent
    assert refusal(read_shard(store)) == (f"{store}: {KEY}: the commit record says absent, but a teacher store has "
                                          "a file for every shard and side")


def test_token_counts_past_max_length_are_refused(store):
    import numcodecs

    key = "chosen_tokens/c/1"
    counts = np.full(8, 10_000, "<i4")
    (store / key).write_bytes(numcodecs.Zstd(level=3).encode(counts))
    recommit(store, key)
    assert refusal(read_shard(store)) == f"{store}: chosen_tokens of shard 1 are not token counts"


# ---- blocks ----------------------------------------------------------------------------------------------------

def test_oversized_counts_are_refused():
    """A sampled block whose counts pass K (rewritten with matching stream sizes) is damage, not data."""
    entry = TS.entry("sampled", 4, VOCAB, seed=0)
    rec = T.sample(_logits(np.random.default_rng(1), 6), 4, seed=0)
    data = TS.encode_file(rec, entry)
    start = block_start(data)
    block = data[start:]
    head = TB._HEAD
    sizes = struct.unpack_from("<2I", block, head.size)
    ids = block[head.size + 8 + sizes[0]:]
    counts = C._pack(np.full(6, 9, np.uint64))  # 9 draws where K = 4
    bad_block = block[:head.size] + struct.pack("<2I", len(counts), len(ids)) + counts + ids
    bad = data[:TS._FILE_HEAD.size] + struct.pack("<I", len(bad_block)) + data[TS._FILE_HEAD.size + 4:start] + bad_block
    assert refusal(lambda: TS.SideFile(bad, entry, 6, "f").block(0)) == (
        "f: block 0: sampled counts: a count is outside 1..K")


def test_a_block_declaring_more_than_it_may_expand_to_is_refused():
    entry = TS.entry("top_k", 3, VOCAB, codec="standard")
    rec = T.top_k(_logits(np.random.default_rng(1), 7), 3)
    data = TS.encode_file(rec, entry)
    start = block_start(data)
    head = TB._HEAD
    sizes = struct.unpack_from("<3I", data, start + head.size)
    big = C._pack(np.zeros(10_000, np.uint64))  # 10,000 varints where the block holds 21
    first = start + head.size + 12
    bad_block = data[start:start + head.size] + struct.pack("<3I", len(big), *sizes[1:]) + big + \
        data[first + sizes[0]:]
    bad = data[:TS._FILE_HEAD.size] + struct.pack("<I", len(bad_block)) + data[TS._FILE_HEAD.size + 4:start] + bad_block
    assert refusal(lambda: TS.SideFile(bad, entry, 7, "f").block(0)) == (
        "f: block 0: top-k ids: the stream is larger than 189 bytes")


def test_stores_without_records_say_so_in_one_line(tmp_path):
    from synthetic import fill

    fill(tmp_path / "plain", n=8, rows_per_shard=8)
    assert refusal(lambda: logitstore.open(tmp_path / "plain").top_k("chosen", [0])) == (
        f"{tmp_path / 'plain'} holds no top-k teacher records; rebuild with --top-k K (or --sample-k K)")
    assert json.loads((tmp_path / "plain" / "zarr.json").read_text())["attributes"]["logitstore"].get(
        "teacher") is None
