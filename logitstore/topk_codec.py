"""Byte coding of top-k and sampled teacher records, for their real statistics.

Top-k (:func:`encode_top_k`), per position, K entries most likely first:

- **values**: fixed point with step ``s`` (the preset's). Code ``q_i = round(-logp_i / s)``; since the log-probs are
  sorted, the codes are non-decreasing, and what is stored is the top code (the position's top log-prob) followed
  by the gaps ``q_i - q_{i-1} >= 0``: small integers, most of them 0 or 1 past the first few entries. Each decoded
  log-prob is within ``s/2`` of the stored float32 one (the bound FORMAT.md states per preset). The tail log-mass is
  coded as its zigzagged offset from the decoded top log-prob, ``round((top - tail) / s)``, plus 1 (0 means no
  tail: K = V), so it too is within ``s/2``.
- **ids**: mapped through a vocabulary order (most often seen first, built from the records themselves and stored
  once), then coded as zigzag differences from the previous entry of the same position: a teacher's likely tokens
  are mostly frequent tokens, so ranks are small and, down the list, close to one another.

Sampled (:func:`encode_sampled`), per position: the counts of the distinct drawn tokens (they sum to K, which marks
where a position ends) and their ids mapped the same way, smaller rank first, as gaps.

Every integer stream is written as LEB128 varints and compressed with zstd. Decoding checks every count and range
(a stream from elsewhere is hostile input): damage is a :class:`~logitstore.errors.FormatError`, never a number.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numcodecs import Zstd

from .errors import FormatError
from .shards import zstd_content_size
from .teacher import Sampled, TeacherError, TopK

ZSTD_LEVEL = 19  # records are written once and read many times
MAX_CODE = 1 << 26  # largest value code: log-probs below -2^26 * step are clipped (counted)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    step: float  # fixed-point step of log-probs, nats; error bound step/2 (0: float32 values, exact)


PRESETS = {p.name: p for p in (
    Preset("exact", 0.0),  # float32 values as given, byte-shuffled
    Preset("fine", 2.0 ** -10),  # within 0.00049 nats
    Preset("standard", 2.0 ** -6),  # within 0.0078 nats
    Preset("compact", 2.0 ** -3),  # within 0.0625 nats
)}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise TeacherError(f"unknown top-k codec {name!r}; choose from {', '.join(PRESETS)}") from None


# --- integer streams ------------------------------------------------------------------------------------------


def varint_encode(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.uint64).ravel()
    nbytes = np.ones(v.size, np.int64)
    for shift in (7, 14, 21, 28, 35, 42, 49, 56, 63):
        nbytes += v >= (np.uint64(1) << np.uint64(shift))
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    out = np.zeros(int(nbytes.sum()), np.uint8)
    for j in range(int(nbytes.max(initial=0))):
        live = nbytes > j
        chunk = (v[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, count: int, what: str) -> np.ndarray:
    """Exactly `count` varints (each < 2^63) from `data`, which must hold nothing else."""
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or (count and ends[-1] != b.size - 1) or (not count and b.size):
        raise FormatError(f"{what}: the stream does not hold {count} values")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.size and lengths.max() > 9:
        raise FormatError(f"{what}: a value is out of range")
    out = np.zeros(count, np.uint64)
    for j in range(int(lengths.max(initial=0))):
        live = lengths > j
        out[live] |= (b[starts[live] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def _zigzag(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    return ((x << 1) ^ (x >> 63)).astype(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    return ((z >> np.uint64(1)).astype(np.int64)) ^ -((z & np.uint64(1)).astype(np.int64))


def _pack(values: np.ndarray) -> bytes:
    return Zstd(level=ZSTD_LEVEL).encode(varint_encode(values))


def _inflate(blob: bytes, what: str, limit: int) -> bytes:
    """A zstd frame's bytes; the frame must declare its decoded size, at most `limit`, before anything is
    allocated (the reader's rule for every chunk)."""
    from numcodecs import zstd

    try:
        declared = zstd_content_size(blob)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    if declared is None:
        raise FormatError(f"{what}: the zstd frame declares no decoded size")
    if declared > limit:
        raise FormatError(f"{what}: the stream is larger than {limit} bytes")
    out = bytearray(declared)
    try:
        zstd.decompress(bytes(blob), out)
    except Exception as e:  # numcodecs raises RuntimeError on a damaged frame
        raise FormatError(f"{what}: undecodable zstd frame ({e})") from None
    return bytes(out)


def _unpack(blob: bytes, count: int, what: str, limit: int) -> np.ndarray:
    """`count` varints from a zstd frame that may not expand past `limit` bytes (9 per value at most)."""
    return varint_decode(_inflate(blob, what, limit), count, what)


# --- vocabulary order -----------------------------------------------------------------------------------------


def vocab_order(ids: np.ndarray, vocab: int) -> np.ndarray:
    """The vocabulary, most often seen in `ids` first (ties: smaller id first), as uint32 [V]."""
    seen = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=vocab)[:vocab]
    return np.argsort(-seen, kind="stable").astype(np.uint32)


def encode_order(order: np.ndarray) -> bytes:
    """The order's prefix up to where the rest runs in ascending id order (the tokens never seen): the prefix's
    length, then its ids."""
    order = np.asarray(order, np.int64)
    falls = np.flatnonzero(np.diff(order) < 0)
    m = int(falls[-1]) + 1 if falls.size else 0
    return _pack(np.concatenate([[m], order[:m]]).astype(np.uint64))


def decode_order(blob: bytes, vocab: int) -> np.ndarray:
    raw = _inflate(blob, "vocabulary order", 9 * (vocab + 1))
    b = np.frombuffer(raw, np.uint8)
    values = varint_decode(bytes(raw), int(np.count_nonzero(b < 0x80)), "vocabulary order")
    if values.size == 0 or int(values[0]) != values.size - 1 or values.size - 1 > vocab:
        raise FormatError("vocabulary order: the stream does not match its length")
    prefix = values[1:]
    if prefix.size and (prefix.max() >= vocab or np.unique(prefix).size != prefix.size):
        raise FormatError("vocabulary order: not a permutation of the vocabulary")
    rest = np.setdiff1d(np.arange(vocab, dtype=np.uint64), prefix)
    return np.concatenate([prefix, rest]).astype(np.int64)


def _ranks(order: np.ndarray) -> np.ndarray:
    rank = np.empty(order.size, np.int64)
    rank[order.astype(np.int64)] = np.arange(order.size)
    return rank


# --- top-k ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Encoded:
    streams: dict[str, bytes]
    clipped: int = 0  # log-probs below the preset's floor, stored at the floor

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.streams.values())


def encode_top_k(record: TopK, order: np.ndarray, codec: str = "standard") -> Encoded:
    """Streams ``ids``, ``values``, ``tail`` of one block of positions; `order` from :func:`vocab_order`."""
    p = preset(codec)
    n, k = record.ids.shape
    rank = _ranks(order)
    r = rank[record.ids.astype(np.int64)]
    ids = _zigzag(np.diff(r, axis=1, prepend=0)).ravel()
    streams = {"ids": _pack(ids)}
    if p.step == 0.0:
        shuffled = record.logps.astype("<f4").view(np.uint8).reshape(-1, 4).T.copy()
        tails = record.tail_logp.astype("<f4").view(np.uint8).reshape(-1, 4).T.copy()
        streams["values"] = Zstd(level=ZSTD_LEVEL).encode(shuffled.tobytes())
        streams["tail"] = Zstd(level=ZSTD_LEVEL).encode(tails.tobytes())
        return Encoded(streams)
    if k > 1 and np.any(np.diff(record.logps, axis=1) > 0):
        raise TeacherError("top-k log-probs must be non-increasing along each position")
    x = np.minimum(record.logps.astype(np.float64), 0.0)
    codes = np.rint(-x / p.step)
    clipped = int(np.count_nonzero(codes > MAX_CODE - 1))
    codes = np.minimum(codes, MAX_CODE - 1).astype(np.int64)
    gaps = np.diff(codes, axis=1, prepend=0)  # first column: the top code itself
    streams["values"] = _pack(gaps.ravel().astype(np.uint64))
    tail = record.tail_logp.astype(np.float64)
    finite = np.isfinite(tail)
    offset = np.rint((-codes[:, 0] * p.step - np.where(finite, tail, 0.0)) / p.step)  # decoded top minus tail
    clipped += int(np.count_nonzero(finite & (np.abs(offset) > MAX_CODE)))
    offset = np.clip(offset, -MAX_CODE, MAX_CODE).astype(np.int64)
    tail_codes = np.where(finite, _zigzag(offset) + np.uint64(1), np.uint64(0))
    streams["tail"] = _pack(tail_codes.astype(np.uint64))
    return Encoded(streams, clipped)


def decode_top_k(streams: dict[str, bytes], n: int, k: int, order: np.ndarray, codec: str = "standard") -> TopK:
    p = preset(codec)
    vocab = order.size
    if not 1 <= k <= vocab:
        raise FormatError(f"top-k: K = {k} outside 1..{vocab}")
    for name in ("ids", "values", "tail"):
        if name not in streams:
            raise FormatError(f"top-k: the {name} stream is missing")
    zz = _unpack(streams["ids"], n * k, "top-k ids", 9 * n * k)
    if zz.size and zz.max() >= np.uint64(2 * vocab):  # a gap between two ranks is less than V either way
        raise FormatError("top-k ids: a token id is outside the vocabulary")
    rank = _unzigzag(zz).reshape(n, k).cumsum(axis=1)
    if rank.size and (rank.min() < 0 or rank.max() >= vocab):
        raise FormatError("top-k ids: a token id is outside the vocabulary")
    ids = order[rank].astype(np.int32)
    if p.step == 0.0:
        logps = _floats(streams["values"], n * k, "top-k values").reshape(n, k)
        tail = _floats(streams["tail"], n, "top-k tail")
        return TopK(ids, logps, tail)
    codes = _unpack(streams["values"], n * k, "top-k values", 9 * n * k).reshape(n, k)
    if codes.size and codes.max() >= MAX_CODE:
        raise FormatError("top-k values: a code is out of range")
    q = codes.astype(np.int64).cumsum(axis=1)
    if q.size and q.max() >= MAX_CODE:
        raise FormatError("top-k values: a code is out of range")
    logps = (-q * p.step).astype(np.float32)
    tail_codes = _unpack(streams["tail"], n, "top-k tail", 9 * n)
    if tail_codes.size and tail_codes.max() > 2 * MAX_CODE + 1:
        raise FormatError("top-k tail: a code is out of range")
    offset = _unzigzag(np.maximum(tail_codes, np.uint64(1)) - np.uint64(1))
    tail = np.where(tail_codes > 0, -q[:, 0] * p.step - offset * p.step, -np.inf)
    if (tail > 0).any():
        raise FormatError("top-k tail: a value is not a log-probability")
    tail = tail.astype(np.float32)
    return TopK(ids, logps, tail)


def _floats(blob: bytes, count: int, what: str) -> np.ndarray:
    raw = _inflate(blob, what, 4 * count)
    if len(raw) != 4 * count:
        raise FormatError(f"{what}: the stream does not hold {count} values")
    values = np.frombuffer(bytes(raw), np.uint8).reshape(4, count).T.copy().view("<f4").ravel()
    if np.isnan(values).any() or (values > 0).any():
        raise FormatError(f"{what}: a value is not a log-probability")
    return values.astype(np.float32)


# --- sampled --------------------------------------------------------------------------------------------------


def encode_sampled(record: Sampled, order: np.ndarray) -> Encoded:
    """Streams ``counts`` (the distinct tokens' counts, each position's summing to K) and ``ids`` (their ranks in
    `order`, ascending, as gaps)."""
    rank = _ranks(order)
    live = record.counts > 0
    per_row = live.sum(axis=1)
    r = np.where(live, rank[record.ids.astype(np.int64)], np.iinfo(np.int64).max)
    perm = np.argsort(r, axis=1, kind="stable")
    r = np.take_along_axis(r, perm, 1)
    counts = np.take_along_axis(record.counts, perm, 1)
    cols = np.arange(record.k)[None, :]
    keep = cols < per_row[:, None]
    gaps = np.diff(np.where(keep, r, 0), axis=1, prepend=0)
    return Encoded({"counts": _pack(counts[keep].astype(np.uint64)), "ids": _pack(gaps[keep].astype(np.uint64))})


def decode_sampled(streams: dict[str, bytes], n: int, k: int, order: np.ndarray) -> Sampled:
    vocab = order.size
    for name in ("counts", "ids"):
        if name not in streams:
            raise FormatError(f"sampled: the {name} stream is missing")
    raw = _inflate(streams["counts"], "sampled counts", 9 * n * k)
    b = np.frombuffer(raw, np.uint8)
    counts = varint_decode(raw, int(np.count_nonzero(b < 0x80)), "sampled counts").astype(np.int64)
    if counts.size and (counts.min() < 1 or counts.max() > k):
        raise FormatError("sampled counts: a count is outside 1..K")
    total = np.cumsum(counts)
    ends = np.flatnonzero(total % k == 0)
    if counts.size > n * k or ends.size != n or (n and ends[-1] != counts.size - 1) or (total[ends] != k * np.arange(
            1, n + 1)).any():
        raise FormatError(f"sampled counts: the stream does not hold {n} positions of {k} draws")
    raw_gaps = _unpack(streams["ids"], counts.size, "sampled ids", 9 * n * k)
    if raw_gaps.size and raw_gaps.max() >= np.uint64(vocab):
        raise FormatError("sampled ids: a token id is outside the vocabulary")
    gaps = raw_gaps.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    per_row = ends - starts + 1
    row = np.repeat(np.arange(n), per_row)
    col = np.arange(counts.size) - np.repeat(starts, per_row)
    dense = np.zeros((n, k), np.int64)
    dense[row, col] = gaps
    ranks = dense.cumsum(axis=1)
    if (col > 0).any() and (gaps[col > 0] == 0).any():
        raise FormatError("sampled ids: a token appears twice at one position")
    if counts.size and ranks[row, col].max() >= vocab:
        raise FormatError("sampled ids: a token id is outside the vocabulary")
    ids = np.zeros((n, k), np.int32)
    out_counts = np.zeros((n, k), np.uint16)
    ids[row, col] = order[ranks[row, col]]
    out_counts[row, col] = counts
    perm = np.argsort(np.where(out_counts > 0, ids, np.iinfo(np.int32).max), axis=1, kind="stable")
    return Sampled(np.take_along_axis(ids, perm, 1) * (np.take_along_axis(out_counts, perm, 1) > 0),
                   np.take_along_axis(out_counts, perm, 1), int(k))
