"""Top-k and sampled teacher records (logitstore.teacher) and their byte coding (logitstore.topk_codec)."""

from __future__ import annotations

import numpy as np
import pytest
from numcodecs import Zstd

from logitstore import teacher as T
from logitstore import topk_codec as C
from logitstore.errors import FormatError


def logits(n=40, vocab=300, seed=0, scale=3.0):
    return np.random.default_rng(seed).standard_normal((n, vocab)) * scale


def test_top_k_at_vocabulary_size_reconstructs_the_distribution():
    x = logits()
    full = T.log_softmax(x)
    rec = T.top_k(x, 300)
    assert np.isneginf(rec.tail_logp).all()
    assert np.array_equal(rec.logps, np.take_along_axis(full, rec.ids.astype(np.int64), 1).astype(np.float32))
    assert np.array_equal(np.sort(rec.ids, axis=1), np.tile(np.arange(300), (40, 1)))
    assert np.abs(T.reconstruct(rec, 300) - full).max() < 2e-6  # float32 storage of each value
    assert np.abs(T.kl(full, T.reconstruct(rec, 300))).max() < 1e-6


def test_top_k_keeps_the_most_likely_tokens_in_order_with_ties_by_id():
    x = np.array([[1.0, 3.0, 3.0, 0.0, 2.0]])
    rec = T.top_k(x, 3)
    assert rec.ids.tolist() == [[1, 2, 4]]
    full = T.log_softmax(x)[0]
    assert rec.logps[0].tolist() == full[[1, 2, 4]].astype(np.float32).tolist()
    assert rec.tail_logp[0] == np.float32(np.logaddexp(full[0], full[3]))


def test_tail_is_a_logsumexp_over_the_rest_not_one_minus_the_kept_mass():
    # one token holds all but e^-30 of the mass: 1 - p_top is 0 in float32, the tail is still exact
    x = np.zeros((1, 1000))
    x[0, 7] = 30.0
    rec = T.top_k(x, 1)
    exact = np.log(999.0) - np.logaddexp(30.0, np.log(999.0))
    assert rec.ids[0, 0] == 7
    assert abs(float(rec.tail_logp[0]) - exact) < 1e-5
    assert np.float32(1.0) - np.exp(rec.logps.astype(np.float32)).sum() == 0.0  # what 1 - sum(p) would have given


@pytest.mark.parametrize("k, message", [
    (301, "--top-k 301 is larger than the vocabulary (300 tokens)"),
    (0, "--top-k must be a positive integer, got 0"),
])
def test_top_k_refuses_k_out_of_range(k, message):
    with pytest.raises(T.TeacherError) as e:
        T.top_k(logits(), k)
    assert str(e.value) == message


def test_logits_must_be_finite():
    x = logits()
    x[3, 4] = np.nan
    with pytest.raises(T.TeacherError, match="^logits hold a NaN or infinite value$"):
        T.top_k(x, 4)


def test_sampling_is_seeded_per_stream_and_counts_add_up():
    x = logits()
    a, b = T.sample(x, 12, seed=5, stream=3), T.sample(x, 12, seed=5, stream=3)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.counts, b.counts)
    c = T.sample(x, 12, seed=5, stream=4)
    assert not np.array_equal(a.ids, c.ids)
    assert (a.counts.sum(axis=1) == 12).all()
    live = a.counts > 0
    assert (np.diff(a.ids, axis=1)[live[:, 1:]] > 0).all()  # distinct and ascending
    assert not (~live[:, :-1] & live[:, 1:]).any()  # padding last
    assert (a.ids[~live] == 0).all()


def test_sampled_counts_estimate_the_teacher_without_bias():
    x = logits(n=1, vocab=6, scale=1.0)
    p = np.exp(T.log_softmax(x))[0]
    total = np.zeros(6)
    for stream in range(400):
        s = T.sample(x, 12, seed=0, stream=stream)
        np.add.at(total, s.ids[0][s.counts[0] > 0], s.counts[0][s.counts[0] > 0])
    estimate = total / (400 * 12)
    # 4800 draws: the standard error of each frequency is at most 0.0073; 4 of them is 0.029
    assert np.abs(estimate - p).max() < 0.029


@pytest.mark.parametrize("codec", list(C.PRESETS))
@pytest.mark.parametrize("k", [1, 8, 300])
def test_top_k_codec_round_trips_within_its_bound(codec, k):
    rec = T.top_k(logits(), k)
    order = C.vocab_order(rec.ids, 300)
    enc = C.encode_top_k(rec, order, codec)
    back = C.decode_top_k(enc.streams, 40, k, order, codec)
    assert np.array_equal(np.sort(back.ids, axis=1), np.sort(rec.ids, axis=1))  # the same K tokens
    p = C.PRESETS[codec]
    # each token's decoded value against the one it was given
    given = np.full((40, 300), np.nan, np.float64)
    np.put_along_axis(given, rec.ids.astype(np.int64), rec.logps.astype(np.float64), 1)
    got = back.logps.astype(np.float64)
    want = np.take_along_axis(given, back.ids.astype(np.int64), 1)
    finite = np.isfinite(rec.tail_logp)
    assert np.array_equal(np.isfinite(back.tail_logp), finite)
    if p.domain == "sqrt":  # sqrt(p) within step / 2
        bound = p.step / 2 + 1e-6
        assert np.abs(np.exp(got / 2) - np.exp(want / 2)).max() <= bound
        if finite.any():
            assert np.abs(np.exp(back.tail_logp[finite] / 2.0) - np.exp(rec.tail_logp[finite] / 2.0)).max() <= bound
    else:
        bound = p.step / 2 + 1e-6 * (p.step > 0)
        assert np.abs(got - want).max() <= bound
        if finite.any():
            assert np.abs(back.tail_logp[finite] - rec.tail_logp[finite]).max() <= bound
    # most likely first, ties by smaller id
    assert (np.diff(back.logps, axis=1) <= 0).all()
    tie = np.diff(back.logps, axis=1) == 0
    assert (np.diff(back.ids, axis=1)[tie] > 0).all()
    if codec == "exact":
        assert np.array_equal(back.ids, rec.ids) and np.array_equal(back.logps, rec.logps)


def test_tail_above_the_top_log_prob_round_trips():
    rec = T.top_k(np.zeros((1, 100)), 1)  # flat: top -4.6, tail log(0.99)
    order = C.vocab_order(rec.ids, 100)
    back = C.decode_top_k(C.encode_top_k(rec, order).streams, 1, 1, order)
    assert abs(float(back.tail_logp[0]) - np.log(0.99)) <= 2.0 ** -7


def test_sampled_codec_round_trips():
    s = T.sample(logits(), 12, seed=1)
    order = C.vocab_order(s.ids[s.counts > 0], 300)
    back = C.decode_sampled(C.encode_sampled(s, order).streams, 40, 12, order)
    assert np.array_equal(back.ids, s.ids) and np.array_equal(back.counts, s.counts)


def test_vocab_order_round_trips_and_refuses_a_non_permutation():
    ctx = C.vocab_order(np.array([5, 5, 2, 9, 2, 5]), 10)
    assert ctx.order[:3].tolist() == [5, 2, 9] and ctx.prior_codes is None and ctx.log_prior is None
    back = C.decode_order(C.encode_order(ctx), 10)
    assert np.array_equal(back.order, ctx.order) and back.prior_codes is None
    assert np.array_equal(C.decode_order(C.encode_order(np.arange(10)), 10).order, np.arange(10))
    with pytest.raises(FormatError, match="^teacher context: the order is not a permutation of the vocabulary$"):
        C.decode_order(C._pack(np.array([3, 1, 1, 2, 0], np.uint64)), 10)
    with pytest.raises(FormatError, match="^teacher context: the stream does not match its length$"):
        C.decode_order(C._pack(np.array([4, 1, 2], np.uint64)), 10)


def test_varints_round_trip_and_refuse_a_wrong_count():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2 ** 40, 2 ** 63 - 1], np.uint64)
    assert np.array_equal(C.varint_decode(C.varint_encode(values), 8, "x"), values)
    with pytest.raises(FormatError, match="^x: the stream does not hold 9 values$"):
        C.varint_decode(C.varint_encode(values), 9, "x")


def test_damaged_streams_are_errors_not_numbers():
    rec = T.top_k(logits(), 8)
    order = C.vocab_order(rec.ids, 300)
    enc = C.encode_top_k(rec, order)
    with pytest.raises(FormatError, match="^top-k ids: inner chunk is not a zstd frame$"):
        C.decode_top_k({**enc.streams, "ids": b"\x00" * 12}, 40, 8, order)
    frame = bytearray(enc.streams["ids"])
    frame[-3] ^= 0xFF  # damage inside the frame, header intact
    with pytest.raises(FormatError, match="^top-k ids: undecodable zstd frame"):  # the frame's checksum
        C.decode_top_k({**enc.streams, "ids": bytes(frame)}, 40, 8, order)
    bomb = Zstd(level=1, checksum=True).encode(b"\x00" * (9 * 360 + 1))  # one byte past 40 top codes + 320 offsets
    with pytest.raises(FormatError, match="^top-k values: the stream is larger than 3240 bytes$"):
        C.decode_top_k({**enc.streams, "values": bomb}, 40, 8, order)
    unchecked = Zstd(level=1).encode(C.varint_encode(np.zeros(360, np.uint64)))
    with pytest.raises(FormatError, match="^top-k values: the zstd frame carries no checksum or names a dictionary$"):
        C.decode_top_k({**enc.streams, "values": unchecked}, 40, 8, order)
    with pytest.raises(FormatError, match="^top-k values: the stream does not hold 360 values$"):
        C.decode_top_k({**enc.streams, "values": C._pack(np.zeros(359, np.uint64))}, 40, 8, order)
    with pytest.raises(FormatError, match="^top-k ids: a token id is outside the vocabulary$"):
        C.decode_top_k({**enc.streams, "ids": C._pack(np.full(320, 600, np.uint64))}, 40, 8, order)
    wrap = np.zeros((40, 8), np.uint64)
    wrap[0, :4] = 2 ** 63 - 2  # zigzag of 2^62 - 1 four times: wraps int64 back near 0 without the gap check
    with pytest.raises(FormatError, match="^top-k ids: a token id is outside the vocabulary$"):
        C.decode_top_k({**enc.streams, "ids": C._pack(wrap.ravel())}, 40, 8, order)
    with pytest.raises(FormatError, match="^top-k: the tail stream is missing$"):
        C.decode_top_k({"ids": enc.streams["ids"], "values": enc.streams["values"]}, 40, 8, order)
    s = T.sample(logits(), 12, seed=1)
    senc = C.encode_sampled(s, order)
    with pytest.raises(FormatError, match="^sampled counts: the stream does not hold 40 positions of 12 draws$"):
        C.decode_sampled({**senc.streams, "counts": C._pack(np.full(39, 12, np.uint64))}, 40, 12, order)
    with pytest.raises(FormatError, match="^sampled counts: a count is outside 1..K$"):
        C.decode_sampled({**senc.streams, "counts": C._pack(np.full(40, 13, np.uint64))}, 40, 12, order)


def test_unknown_preset():
    with pytest.raises(T.TeacherError) as e:
        C.preset("tiny")
    assert str(e.value) == "unknown top-k codec 'tiny'; choose from exact, fine, standard, compact, sqrt, sqrt-compact"


@pytest.mark.parametrize("k", [1, 8, 300])
def test_reconstruction_kl_without_the_full_reconstruction(k):
    x = logits()
    full = T.log_softmax(x)
    rec = T.top_k(x, k)
    order = C.vocab_order(rec.ids, 300)
    back = C.decode_top_k(C.encode_top_k(rec, order, "compact").streams, 40, k, order, "compact")
    assert np.abs(T.reconstruction_kl(full, back) - T.kl(full, T.reconstruct(back, 300))).max() < 1e-12
    prior = np.random.default_rng(3).uniform(-6, 0, 300)  # any log-weights
    assert np.abs(T.reconstruction_kl(full, back, prior) - T.kl(full, T.reconstruct(back, 300, prior))).max() < 1e-12
