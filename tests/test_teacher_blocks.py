"""Teacher records in blocks (logitstore.teacher_blocks): round trips, rows across blocks, hostile blocks."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from logitstore import teacher as T
from logitstore import teacher_blocks as B
from logitstore import topk_codec as C
from logitstore.errors import FormatError


def record(n=50, vocab=300, k=8):
    return T.top_k(np.random.default_rng(1).standard_normal((n, vocab)) * 3, k)


def test_top_k_blocks_round_trip_and_rows_straddle_blocks():
    rec = record()
    order = C.vocab_order(rec.ids, 300)
    blocks = B.encode_blocks(rec, order, "fine", positions=16)
    assert len(blocks) == 4
    back = [B.decode_block(b, kind="top_k", k=8, positions=min(16, 50 - 16 * i), order=order, codec="fine")
            for i, b in enumerate(blocks)]
    ids = np.concatenate([b.ids for b in back])
    # quantized values may tie where the float32 ones did not: then the smaller id comes first
    assert np.array_equal(np.sort(ids, axis=1), np.sort(rec.ids, axis=1))
    exact = [B.decode_block(b, kind="top_k", k=8, positions=min(16, 50 - 16 * i), order=order, codec="exact")
             for i, b in enumerate(B.encode_blocks(rec, order, "exact", positions=16))]
    assert np.array_equal(np.concatenate([b.ids for b in exact]), rec.ids)
    lengths = np.array([10, 20, 0, 20])  # row 1 spans blocks 0 and 1; row 3 blocks 1 to 3
    assert B.row_spans(lengths, np.array([1, 2, 3]), 16) == [[(0, 10, 16), (1, 0, 14)], [], [(1, 14, 16),
                                                                                            (2, 0, 16), (3, 0, 2)]]


def test_sampled_blocks_round_trip():
    s = T.sample(np.random.default_rng(2).standard_normal((40, 300)), 12, seed=0)
    order = C.vocab_order(s.ids[s.counts > 0], 300)
    (block,) = B.encode_blocks(s, order)
    back = B.decode_block(block, kind="sampled", k=12, positions=40, order=order)
    assert np.array_equal(back.ids, s.ids) and np.array_equal(back.counts, s.counts)


def test_block_size_keeps_under_the_entry_limit():
    assert B.block_positions(128) == 1024
    assert B.block_positions(32000) == (1 << 22) // 32000


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:5], "teacher block: shorter than its header"),
    (lambda b: b"XXXX" + b[4:], "teacher block: not a top_k block"),
    (lambda b: b[:4] + b"\x02" + b[5:], "teacher block: not a top_k block"),
    (lambda b: b[:6] + struct.pack("<I", 17) + b[10:],
     "teacher block: holds 17 positions of K = 8, expected 16 of K = 8"),
    (lambda b: b[:5] + b"\x04" + b[6:], "teacher block: codec byte 4, expected 3 (standard)"),
    (lambda b: b"LTB1" + b[4:], "teacher block: not a top_k block"),
    (lambda b: b + b"\x00", "teacher block: stream sizes do not add up to the block's size"),
    (lambda b: b[:-1], "teacher block: stream sizes do not add up to the block's size"),
])
def test_damaged_blocks_are_errors(damage, message):
    rec = record()
    order = C.vocab_order(rec.ids, 300)
    block = B.encode_blocks(rec, order, positions=16)[0]
    with pytest.raises(FormatError) as e:
        B.decode_block(damage(block), kind="top_k", k=8, positions=16, order=order)
    assert str(e.value) == message


def test_a_block_past_the_reader_limits_is_refused_before_decoding():
    with pytest.raises(FormatError, match=r"^teacher block: K = 70000 with 1 positions is past the reader's limits$"):
        B.decode_block(b"", kind="top_k", k=70000, positions=1, order=np.arange(10))
    with pytest.raises(FormatError, match=r"^teacher block: K = 65536 with 1 positions is past the reader's limits$"):
        B.decode_block(b"", kind="sampled", k=65536, positions=1, order=np.arange(10))  # counts are uint16
    with pytest.raises(FormatError, match=r"^teacher block: K = 128 with 40000 positions is past the reader's"):
        B.decode_block(b"", kind="top_k", k=128, positions=40000, order=np.arange(10))


@pytest.mark.parametrize("kw, message", [
    ({"top_k": 33000}, "--top-k 33000 is larger than the vocabulary (32000 tokens)"),
    ({"top_k": 70000, "vocab": 100000}, "--top-k 70000 is more than the standard codec holds (at most 65536)"),
    ({"top_k": 0}, "--top-k must be a positive integer, got 0"),
    ({"sample_k": 70000}, "--sample-k 70000 is more than the codec holds (at most 65535 draws)"),
    ({"top_k": 8, "codec": "tiny"},
     "unknown top-k codec 'tiny'; choose from exact, fine, standard, compact, sqrt, sqrt-compact"),
])
def test_requests_a_store_cannot_hold_are_one_line(kw, message):
    from logitstore.teacher import TeacherError

    args = {"top_k": None, "sample_k": None, "vocab": 32000, **kw}
    with pytest.raises(TeacherError) as e:
        B.check_request(**args)
    assert str(e.value) == message


def test_requests_a_store_can_hold_pass():
    B.check_request(top_k=128, sample_k=12, vocab=32000, codec="compact")


@pytest.mark.parametrize("codec", ["exact", "standard", "sqrt"])
def test_blocks_and_contexts_keep_within_their_stated_bounds(codec):
    rec = record(n=64, k=16)
    ctx = C.vocab_order(rec.ids, 300, tail_mass=np.random.default_rng(0).uniform(0, 1, 300))
    assert len(C.encode_order(ctx)) <= C.max_context_bytes(300)
    assert C.decode_order(C.encode_order(ctx), 300).nbytes == 300 * 8 + 300
    (block,) = B.encode_blocks(rec, ctx, codec, positions=64)
    assert len(block) <= B.max_block_bytes("top_k", 16, 64)
    assert B.max_block_bytes("top_k", 16, 64) > B.max_block_bytes("sampled", 16, 64)
