"""The top-k codec's bytes (logitstore.topk_codec): exact stream contents, the per-shard context and its prior, the
prior reconstruction (logitstore.teacher), and hostile streams."""

from __future__ import annotations

import numpy as np
import pytest

from logitstore import teacher as T
from logitstore import topk_codec as C
from logitstore.errors import FormatError


def streams_of(enc, n, k, codec):
    """The varints each stream holds (what FORMAT.md specifies)."""
    count = {"ids": n * k, "values": n * k if C.PRESETS[codec].domain == "sqrt" else n + n * k, "tail": n}
    return {name: C._unpack(blob, count[name], name, 1 << 20).tolist() for name, blob in enc.streams.items()}


# one position, V = 10: tokens 7, 2, 5 at log-probs -1, -2, -3; the tail log(1 - e^-1 - e^-2 - e^-3) = -0.8051
RECORD = T.TopK(np.array([[7, 2, 5]], np.int32), np.array([[-1.0, -2.0, -3.0]], np.float32),
                np.array([np.log1p(-np.exp([-1.0, -2.0, -3.0]).sum())], np.float32))
CONTEXT = C.vocab_order(np.array([5, 5, 5, 2, 2, 7]), 10)  # order 5, 2, 7, then 0, 1, 3, 4, 6, 8, 9


def test_streams_hold_the_set_of_ranks_and_values_in_rank_order():
    assert CONTEXT.order.tolist() == [5, 2, 7, 0, 1, 3, 4, 6, 8, 9]
    # ranks 2, 1, 0 sorted: 0, 1, 2 stored as 0, then gaps minus one
    # standard (step 1/64): codes 64, 128, 192 for -1, -2, -3; in rank order (5, 2, 7) 192, 128, 64; top 64
    # tail: decoded top -1 minus -0.8051 is -12.48 steps: -12, zigzag 23, plus one
    enc = C.encode_top_k(RECORD, CONTEXT, "standard")
    assert streams_of(enc, 1, 3, "standard") == {"ids": [0, 0, 0], "values": [64, 128, 64, 0], "tail": [24]}
    # sqrt (d = 1/64): round(64 sqrt(p)) = 14 (e^-3), 24 (e^-2), 39 (e^-1); tail round(64 sqrt(0.447)) = 43, plus one
    enc = C.encode_top_k(RECORD, CONTEXT, "sqrt")
    assert streams_of(enc, 1, 3, "sqrt") == {"ids": [0, 0, 0], "values": [14, 24, 39], "tail": [44]}
    back = C.decode_top_k(enc.streams, 1, 3, CONTEXT, "sqrt")
    assert back.ids.tolist() == [[7, 2, 5]]  # most likely first
    assert np.allclose(back.logps, 2 * np.log(np.array([[39, 24, 14]]) / 64), atol=1e-6)
    assert np.isclose(back.tail_logp[0], 2 * np.log(43 / 64), atol=1e-6)


def test_ids_far_down_the_order_are_gaps():
    rec = T.TopK(np.array([[9, 0]], np.int32), np.array([[-0.5, -1.5]], np.float32), np.array([-2.0], np.float32))
    enc = C.encode_top_k(rec, CONTEXT, "compact")
    assert streams_of(enc, 1, 2, "compact")["ids"] == [3, 5]  # ranks 3 (token 0) and 9 (token 9)


def test_ties_decode_smaller_id_first():
    rec = T.TopK(np.array([[4, 1, 8]], np.int32), np.array([[-1.0, -1.01, -3.0]], np.float32),
                 np.array([-0.9], np.float32))
    back = C.decode_top_k(C.encode_top_k(rec, CONTEXT, "compact").streams, 1, 3, CONTEXT, "compact")
    assert back.ids.tolist() == [[1, 4, 8]] and back.logps.tolist() == [[-1.0, -1.0, -3.0]]


def test_sqrt_code_zero_decodes_to_a_quarter_step():
    rec = T.TopK(np.array([[3, 6]], np.int32), np.array([[-0.01, -12.0]], np.float32), np.array([-5.0], np.float32))
    enc = C.encode_top_k(rec, CONTEXT, "sqrt-compact")  # d = 1/32: sqrt(e^-12) = 0.0025 rounds to 0
    assert streams_of(enc, 1, 2, "sqrt-compact")["values"] == [32, 0]
    back = C.decode_top_k(enc.streams, 1, 2, CONTEXT, "sqrt-compact")
    assert back.logps[0, 1] == np.float32(2 * np.log(1 / 128))


def test_prior_codes_are_half_nats_below_the_largest_clipped_at_48():
    assert C.prior_codes(np.array([4.0, 1.0, 0.0, 4e-30, 4.0])).tolist() == [0, 3, 48, 48, 0]
    assert C.prior_codes(np.zeros(3)).tolist() == [0, 0, 0]
    with pytest.raises(T.TeacherError, match="^tail mass must be a finite, non-negative \\[V\\] array$"):
        C.prior_codes(np.array([1.0, -1.0]))


def test_context_with_a_prior_round_trips():
    mass = np.array([0.0, 5.0, 1.0, 2.0, 0.5, 0.0, 0.0, 3.0, 0.0, 1e-3])
    ctx = C.vocab_order(np.array([5, 5, 5, 2, 2, 7]), 10, tail_mass=mass)
    assert ctx.prior_codes.tolist() == [48, 0, 3, 2, 5, 48, 48, 1, 48, 17]
    blob = C.encode_order(ctx)
    assert C._unpack(blob, 15, "x", 1 << 10).tolist() == [3, 5, 2, 7, 1] + ctx.prior_codes.tolist()
    back = C.decode_order(blob, 10)
    assert np.array_equal(back.order, ctx.order) and np.array_equal(back.prior_codes, ctx.prior_codes)
    assert np.array_equal(back.log_prior, -0.5 * ctx.prior_codes)
    with pytest.raises(T.TeacherError, match=r"^tail mass must have one entry per vocabulary token \(10\)$"):
        C.vocab_order(np.array([1]), 10, tail_mass=np.ones(9))


@pytest.mark.parametrize("values, message", [
    ([3, 5, 2, 7, 1] + [0] * 9, "teacher context: the stream does not match its length"),
    ([3, 5, 2, 7, 2] + [0] * 10, "teacher context: the stream does not match its length"),
    ([3, 5, 2, 7, 0, 0], "teacher context: the stream does not match its length"),
    ([11] + list(range(10)) + [0], "teacher context: the stream does not match its length"),
    ([3, 5, 2, 10, 0], "teacher context: the order is not a permutation of the vocabulary"),
    ([3, 5, 2, 7, 1] + [49] + [0] * 9, "teacher context: a prior code is above 48"),
])
def test_damaged_contexts_are_errors(values, message):
    with pytest.raises(FormatError) as e:
        C.decode_order(C._pack(np.array(values, np.uint64)), 10)
    assert str(e.value) == message


def test_context_vocabulary_is_bounded():
    with pytest.raises(FormatError, match=r"^teacher context: vocabulary size 4194305 outside 1..4194304$"):
        C.decode_order(C.encode_order(np.arange(4)), (1 << 22) + 1)


def test_hostile_value_and_id_streams():
    enc = C.encode_top_k(RECORD, CONTEXT, "sqrt")
    with pytest.raises(FormatError, match="^top-k values: a code is out of range$"):
        C.decode_top_k({**enc.streams, "values": C._pack(np.array([1, 2, 65], np.uint64))}, 1, 3, CONTEXT, "sqrt")
    with pytest.raises(FormatError, match="^top-k tail: a code is out of range$"):
        C.decode_top_k({**enc.streams, "tail": C._pack(np.array([66], np.uint64))}, 1, 3, CONTEXT, "sqrt")
    with pytest.raises(FormatError, match="^top-k ids: a token id is outside the vocabulary$"):
        C.decode_top_k({**enc.streams, "ids": C._pack(np.array([3, 3, 3], np.uint64))}, 1, 3, CONTEXT, "sqrt")
    enc = C.encode_top_k(RECORD, CONTEXT, "standard")
    with pytest.raises(FormatError, match="^top-k values: a position has no entry at its top code$"):
        C.decode_top_k({**enc.streams, "values": C._pack(np.array([64, 128, 64, 1], np.uint64))}, 1, 3, CONTEXT,
                       "standard")


def test_a_record_with_a_token_twice_is_refused():
    rec = T.TopK(np.array([[2, 2]], np.int32), np.array([[-1.0, -2.0]], np.float32), np.array([-1.0], np.float32))
    with pytest.raises(T.TeacherError, match="^a top-k position holds the same token twice$"):
        C.encode_top_k(rec, CONTEXT)


def test_tail_mass_adds_up_each_positions_left_out_probability():
    x = np.random.default_rng(0).standard_normal((30, 50)) * 2
    rec = T.top_k(x, 6)
    mass = T.tail_mass(x, rec.ids)
    assert mass.shape == (50,)
    assert np.isclose(mass.sum(), np.exp(rec.tail_logp.astype(np.float64)).sum(), rtol=1e-6)
    p = np.exp(T.log_softmax(x))
    np.put_along_axis(p, rec.ids.astype(np.int64), 0.0, 1)
    assert np.allclose(mass, p.sum(axis=0), atol=1e-12)


def test_prior_reconstruction_spreads_the_tail_by_the_prior():
    x = np.random.default_rng(1).standard_normal((1, 50)) * 2
    full = T.log_softmax(x)
    rec = T.top_k(x, 6)
    mass = T.tail_mass(x, rec.ids)
    prior = np.log(np.maximum(mass, 1e-300) / mass.max())  # this position's own tail shape: exact reconstruction
    assert np.abs(T.reconstruct(rec, 50, prior) - full).max() < 1e-6
    assert T.reconstruction_kl(full, rec, prior)[0] < 1e-10
    even = T.reconstruct(rec, 50)
    out = np.setdiff1d(np.arange(50), rec.ids[0])
    assert np.allclose(even[0, out], even[0, out[0]])  # without a prior: evenly
    assert T.reconstruction_kl(full, rec)[0] > 0.1
    with pytest.raises(T.TeacherError, match=r"^prior must be \[V\] finite log-weights <= 0, V = 50$"):
        T.reconstruct(rec, 50, np.zeros(49))


def test_prior_from_the_shard_lowers_the_kl_of_every_position_family():
    # positions that share a tail shape (a Zipf-like background) with different heads: the shard prior learns it
    rng = np.random.default_rng(2)
    background = -1.2 * np.log(np.arange(1, 201))
    x = background[None, :] + rng.standard_normal((64, 200)) * 0.3
    x[np.arange(64), rng.integers(0, 200, 64)] += 6.0
    full = T.log_softmax(x)
    rec = T.top_k(x, 4)
    ctx = C.vocab_order(rec.ids, 200, tail_mass=T.tail_mass(x, rec.ids))
    back = C.decode_order(C.encode_order(ctx), 200)
    even, prior = T.reconstruction_kl(full, rec).mean(), T.reconstruction_kl(full, rec, back.log_prior).mean()
    assert prior < 0.25 * even
