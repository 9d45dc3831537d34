"""Byte coding of top-k and sampled teacher records, for their real statistics.

Top-k (:func:`encode_top_k`), one block of positions, K entries each:

- **ids**: mapped to their rank in the shard's vocabulary order (most often kept first), **sorted by rank within each
  position**, and stored as ``rank_0, rank_1 - rank_0 - 1, ...``: a set of K ranks, not a list. Which of the K
  tokens is the most likely is carried by the values. A list in likelihood order costs about log2(K!) bits more per
  position than the set (benchmarks/topk.py: 73 against 16 B/token at K = 64 on a contextual teacher).
- **values**, in the same rank order, by the preset's domain:
  - ``log`` presets: fixed point ``q_i = round(-logp_i / s)``; the stream holds each position's top code (its
    smallest) and then each entry's offset from it, ``q_i - q_top >= 0``. Each decoded log-prob is within ``s/2``.
  - ``sqrt`` presets: fixed point in the square root of the probability, ``u_i = round(sqrt(p_i) / d)``, in
    ``0 .. 1/d``; decoded ``p = (u d)^2`` (``u = 0``: ``(d/4)^2``). Each decoded sqrt(p) is within ``d/2``, so the
    rounding costs about ``d^2 / 6`` nats of KL per entry whatever its probability: deep entries get few levels.
  - ``exact``: float32, byte-shuffled.
- **tail** (the log of the mass outside the K): ``log`` presets its zigzagged offset from the decoded top log-prob
  plus 1; ``sqrt`` presets ``round(sqrt(mass) / d) + 1``; 0 means no tail (-inf). ``exact``: float32.

Decoding returns each position's entries most likely first (by decoded value, ties by smaller id).

Sampled (:func:`encode_sampled`), per position: the counts of the distinct drawn tokens (they sum to K, which marks
where a position ends) and their ranks, ascending, as gaps.

The per-shard context (:class:`ShardContext`, from :func:`vocab_order`, bytes by :func:`encode_order`) holds the
vocabulary order and, when the build passes the teacher's tail mass, a prior over the vocabulary (log-weights in
steps of ``PRIOR_STEP`` nats) that :func:`logitstore.teacher.reconstruct` spreads a record's tail mass by.

Every integer stream is written as LEB128 varints and compressed with zstd. Decoding checks every count and range
(a stream from elsewhere is hostile input): damage is a :class:`~logitstore.errors.FormatError`, never a number.
docs/FORMAT.md, "Teacher record blocks", specifies the bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numcodecs import Zstd

from .errors import FormatError
from .shards import zstd_content_size, zstd_frame_size
from .teacher import Sampled, TeacherError, TopK

ZSTD_LEVEL = 19  # records are written once and read many times
MAX_CODE = 1 << 26  # largest log-domain value code: log-probs below -2^26 * step are clipped (counted)
PRIOR_STEP = 0.5  # nats per prior code (benchmarks/topk.py: 0.5 costs 0.005 nats of KL at K = 32 against exact)
PRIOR_MAX = 48  # prior codes 0..48: down to 24 nats below the most likely tail token
MAX_VOCAB = 1 << 22  # vocabulary a reader accepts for teacher records (bounds the context's allocations)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    step: float  # fixed-point step: nats (log domain) or of sqrt(p) (sqrt domain); 0: float32 values, exact
    domain: str = "log"
    code: int = 0  # the preset's byte in a block header


PRESETS = {p.name: p for p in (
    Preset("exact", 0.0, "log", 1),  # float32 values as given, byte-shuffled
    Preset("fine", 2.0 ** -10, "log", 2),  # log-prob within 0.00049 nats
    Preset("standard", 2.0 ** -6, "log", 3),  # within 0.0078 nats
    Preset("compact", 2.0 ** -3, "log", 4),  # within 0.0625 nats
    Preset("sqrt", 2.0 ** -6, "sqrt", 5),  # sqrt(p) within 2^-7
    Preset("sqrt-compact", 2.0 ** -5, "sqrt", 6),  # sqrt(p) within 2^-6
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
    """Exactly `count` varints (each < 2^63, in its shortest form) from `data`, which must hold nothing else."""
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or (count and ends[-1] != b.size - 1) or (not count and b.size):
        raise FormatError(f"{what}: the stream does not hold {count} values")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.size and lengths.max() > 9:
        raise FormatError(f"{what}: a value is out of range")
    if np.any((lengths > 1) & (b[ends] == 0)):  # a last byte of 0 adds nothing: one value, one spelling
        raise FormatError(f"{what}: a value is not in its shortest form (an overlong varint)")
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


def _zstd(raw: bytes) -> bytes:
    """One zstd frame that declares its decoded size and carries a content checksum (damage is then an error)."""
    return Zstd(level=ZSTD_LEVEL, checksum=True).encode(raw)


def _pack(values: np.ndarray) -> bytes:
    return _zstd(varint_encode(values))


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
    if not blob[4] & 0x04 or blob[4] & 0x03:
        raise FormatError(f"{what}: the zstd frame carries no checksum or names a dictionary")
    if declared > limit:
        raise FormatError(f"{what}: the stream is larger than {limit} bytes")
    try:
        end = zstd_frame_size(blob)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    if end != len(blob):
        raise FormatError(f"{what}: {len(blob) - end} bytes after the zstd frame (a stream is exactly one frame)")
    out = bytearray(declared)
    try:
        zstd.decompress(bytes(blob), out)
    except Exception as e:  # numcodecs raises RuntimeError on a damaged frame
        raise FormatError(f"{what}: undecodable zstd frame ({e})") from None
    return bytes(out)


def _unpack(blob: bytes, count: int, what: str, limit: int) -> np.ndarray:
    """`count` varints from a zstd frame that may not expand past `limit` bytes (9 per value at most)."""
    return varint_decode(_inflate(blob, what, limit), count, what)


# --- per-shard context: vocabulary order and prior ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardContext:
    """What the blocks of one shard share: the vocabulary order ids are ranked by, and optionally a prior.

    ``order``: int64 [V], a permutation of the vocabulary, most often kept first. ``prior_codes``: uint8 [V] or
    None, token t's prior weight is ``exp(-prior_codes[t] * PRIOR_STEP)`` (relative to the largest)."""

    order: np.ndarray
    prior_codes: np.ndarray | None = None

    @property
    def vocab(self) -> int:
        return int(self.order.size)

    @property
    def nbytes(self) -> int:
        """Memory held (a reader's accounting)."""
        return int(self.order.nbytes + (0 if self.prior_codes is None else self.prior_codes.nbytes))

    @property
    def log_prior(self) -> np.ndarray | None:
        """float64 [V] log-weights for :func:`logitstore.teacher.reconstruct`, or None (spread evenly)."""
        return None if self.prior_codes is None else -self.prior_codes.astype(np.float64) * PRIOR_STEP


def context(order) -> ShardContext:
    """A ShardContext from one, or from a bare vocabulary order (no prior)."""
    if isinstance(order, ShardContext):
        return order
    return ShardContext(np.asarray(order, np.int64))


def prior_codes(tail_mass: np.ndarray) -> np.ndarray:
    """Quantized log-weights of a prior over the vocabulary from each token's summed mass where it was left out."""
    mass = np.asarray(tail_mass, np.float64)
    if mass.ndim != 1 or not np.isfinite(mass).all() or (mass < 0).any():
        raise TeacherError("tail mass must be a finite, non-negative [V] array")
    top = mass.max(initial=0.0)
    if top <= 0:
        return np.zeros(mass.size, np.uint8)
    with np.errstate(divide="ignore"):
        codes = np.rint(-np.log(mass / top) / PRIOR_STEP)
    return np.minimum(codes, PRIOR_MAX).astype(np.uint8)


def vocab_order(ids: np.ndarray, vocab: int, *, tail_mass: np.ndarray | None = None) -> ShardContext:
    """The shard's context: the vocabulary, most often seen in `ids` first (ties: smaller id first), and with
    `tail_mass` ([V], each token's teacher probability summed over the positions where it is outside the record's
    K: :func:`logitstore.teacher.tail_mass`) the prior a reconstruction spreads the tail by."""
    seen = np.bincount(np.asarray(ids, np.int64).ravel(), minlength=vocab)[:vocab]
    order = np.argsort(-seen, kind="stable").astype(np.int64)
    if tail_mass is not None and np.asarray(tail_mass).shape != (vocab,):
        raise TeacherError(f"tail mass must have one entry per vocabulary token ({vocab})")
    return ShardContext(order, None if tail_mass is None else prior_codes(tail_mass))


def max_context_bytes(vocab: int) -> int:
    """The most bytes a context blob of a `vocab`-token vocabulary can take (m + order + flag + V prior codes as
    varints, within zstd's compress bound): what a store's size check may allow for it."""
    from .shards import zstd_bound

    return zstd_bound(9 * (2 * vocab + 2))


def encode_order(order) -> bytes:
    """The context's bytes: one zstd frame of varints: m, the order's first m ids (the order continues with the
    other ids ascending), then 0 (no prior) or 1 followed by V prior codes in token id order."""
    ctx = context(order)
    o = ctx.order
    falls = np.flatnonzero(np.diff(o) < 0)
    m = int(falls[-1]) + 1 if falls.size else 0
    parts = [[m], o[:m]]
    parts += [[0]] if ctx.prior_codes is None else [[1], ctx.prior_codes.astype(np.int64)]
    return _pack(np.concatenate(parts).astype(np.uint64))


def decode_order(blob: bytes, vocab: int) -> ShardContext:
    if not 1 <= vocab <= MAX_VOCAB:
        raise FormatError(f"teacher context: vocabulary size {vocab} outside 1..{MAX_VOCAB}")
    raw = _inflate(blob, "teacher context", 9 * (2 * vocab + 2))
    b = np.frombuffer(raw, np.uint8)
    values = varint_decode(bytes(raw), int(np.count_nonzero(b < 0x80)), "teacher context")
    if values.size == 0 or values[0] > vocab or values.size < int(values[0]) + 2:
        raise FormatError("teacher context: the stream does not match its length")
    m = int(values[0])
    prefix, flag, rest = values[1:m + 1], int(values[m + 1]), values[m + 2:]
    if not (flag == 0 and rest.size == 0 or flag == 1 and rest.size == vocab):
        raise FormatError("teacher context: the stream does not match its length")
    if prefix.size and (prefix.max() >= vocab or np.unique(prefix).size != prefix.size):
        raise FormatError("teacher context: the order is not a permutation of the vocabulary")
    if rest.size and rest.max() > PRIOR_MAX:
        raise FormatError(f"teacher context: a prior code is above {PRIOR_MAX}")
    others = np.setdiff1d(np.arange(vocab, dtype=np.uint64), prefix)
    order = np.concatenate([prefix, others]).astype(np.int64)
    return ShardContext(order, rest.astype(np.uint8) if flag else None)


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


def _shuffled(values: np.ndarray) -> bytes:
    return _zstd(values.astype("<f4").view(np.uint8).reshape(-1, 4).T.copy().tobytes())


def encode_top_k(record: TopK, order, codec: str = "standard") -> Encoded:
    """Streams ``ids``, ``values``, ``tail`` of one block of positions; `order` a :class:`ShardContext` (or a bare
    vocabulary order)."""
    p = preset(codec)
    ctx = context(order)
    n, k = record.ids.shape
    if k > ctx.vocab:
        raise TeacherError(f"--top-k {k} is larger than the vocabulary ({ctx.vocab} tokens)")
    rank = _ranks(ctx.order)[record.ids.astype(np.int64)]
    perm = np.argsort(rank, axis=1, kind="stable")
    r = np.take_along_axis(rank, perm, 1)
    if k > 1 and (np.diff(r, axis=1) == 0).any():
        raise TeacherError("a top-k position holds the same token twice")
    streams = {"ids": _pack(np.diff(r, axis=1, prepend=-1).ravel() - 1)}
    logps = np.take_along_axis(record.logps.astype(np.float64), perm, 1)
    tail = record.tail_logp.astype(np.float64)
    finite = np.isfinite(tail)
    if p.step == 0.0:
        streams["values"] = _shuffled(np.take_along_axis(record.logps, perm, 1))
        streams["tail"] = _shuffled(record.tail_logp)
        return Encoded(streams)
    if p.domain == "sqrt":
        levels = int(round(1 / p.step))
        u = np.minimum(np.rint(np.exp(np.minimum(logps, 0.0) / 2) / p.step), levels).astype(np.int64)
        streams["values"] = _pack(u.ravel())
        t = np.rint(np.exp(np.minimum(np.where(finite, tail, 0.0), 0.0) / 2) / p.step)
        streams["tail"] = _pack(np.where(finite, np.minimum(t, levels) + 1, 0).astype(np.uint64))
        return Encoded(streams)
    x = np.minimum(logps, 0.0)
    codes = np.rint(-x / p.step)
    clipped = int(np.count_nonzero(codes > MAX_CODE - 1))
    codes = np.minimum(codes, MAX_CODE - 1).astype(np.int64)
    top = codes.min(axis=1)
    streams["values"] = _pack(np.concatenate([top, (codes - top[:, None]).ravel()]))
    offset = np.rint((-top * p.step - np.where(finite, tail, 0.0)) / p.step)  # decoded top minus tail
    clipped += int(np.count_nonzero(finite & (np.abs(offset) > MAX_CODE)))
    offset = np.clip(offset, -MAX_CODE, MAX_CODE).astype(np.int64)
    tail_codes = np.where(finite, _zigzag(offset) + np.uint64(1), np.uint64(0))
    streams["tail"] = _pack(tail_codes.astype(np.uint64))
    return Encoded(streams, clipped)


def decode_top_k(streams: dict[str, bytes], n: int, k: int, order, codec: str = "standard") -> TopK:
    p = preset(codec)
    ctx = context(order)
    vocab = ctx.vocab
    if not 1 <= k <= vocab:
        raise FormatError(f"top-k: K = {k} outside 1..{vocab}")
    for name in ("ids", "values", "tail"):
        if name not in streams:
            raise FormatError(f"top-k: the {name} stream is missing")
    gaps = _unpack(streams["ids"], n * k, "top-k ids", 9 * n * k)
    if gaps.size and gaps.max() >= np.uint64(vocab):  # a gap between two ranks is less than V
        raise FormatError("top-k ids: a token id is outside the vocabulary")
    rank = (gaps.astype(np.int64).reshape(n, k) + 1).cumsum(axis=1) - 1  # at most K V < 2^63
    if rank.size and rank[:, -1].max() >= vocab:
        raise FormatError("top-k ids: a token id is outside the vocabulary")
    ids = ctx.order[rank]
    if p.step == 0.0:
        logps = _floats(streams["values"], n * k, "top-k values").reshape(n, k)
        tail = _floats(streams["tail"], n, "top-k tail")
        return _most_likely_first(ids, logps, tail, -logps)
    if p.domain == "sqrt":
        levels = int(round(1 / p.step))
        u = _unpack(streams["values"], n * k, "top-k values", 9 * n * k).reshape(n, k)
        if u.size and u.max() > np.uint64(levels):
            raise FormatError("top-k values: a code is out of range")
        t = _unpack(streams["tail"], n, "top-k tail", 9 * n)
        if t.size and t.max() > np.uint64(levels + 1):
            raise FormatError("top-k tail: a code is out of range")
        logps = _sqrt_logp(u.astype(np.int64), p.step)
        tail = np.where(t > 0, _sqrt_logp(np.maximum(t.astype(np.int64), 1) - 1, p.step), -np.inf)
        return _most_likely_first(ids, logps.astype(np.float32), tail.astype(np.float32), -u.astype(np.int64))
    raw = _unpack(streams["values"], n + n * k, "top-k values", 9 * (n + n * k))
    if raw.size and raw.max() >= np.uint64(MAX_CODE):
        raise FormatError("top-k values: a code is out of range")
    top = raw[:n].astype(np.int64)
    off = raw[n:].astype(np.int64).reshape(n, k)
    if n and off.min(axis=1).max() != 0:
        raise FormatError("top-k values: a position has no entry at its top code")
    q = top[:, None] + off
    if q.size and q.max() >= MAX_CODE:
        raise FormatError("top-k values: a code is out of range")
    logps = (-q * p.step).astype(np.float32)
    tail_codes = _unpack(streams["tail"], n, "top-k tail", 9 * n)
    if tail_codes.size and tail_codes.max() > 2 * MAX_CODE + 1:
        raise FormatError("top-k tail: a code is out of range")
    offset = _unzigzag(np.maximum(tail_codes, np.uint64(1)) - np.uint64(1))
    tail = np.where(tail_codes > 0, -top * p.step - offset * p.step, -np.inf)
    if (tail > 0).any():
        raise FormatError("top-k tail: a value is not a log-probability")
    return _most_likely_first(ids, logps, tail.astype(np.float32), q)


def _sqrt_logp(u: np.ndarray, step: float) -> np.ndarray:
    """log p of sqrt-domain codes: p = (u step)^2, code 0 as (step / 4)^2."""
    return 2 * np.log(np.where(u > 0, u * step, step / 4))


def _most_likely_first(ids: np.ndarray, logps: np.ndarray, tail: np.ndarray, key: np.ndarray) -> TopK:
    """Entries by ascending `key` (the negated value code), ties by smaller id: the record's own order."""
    if not ids.size:
        perm = np.zeros(ids.shape, np.int64)
    elif key.dtype.kind == "i":  # codes below 2^26 and ids below 2^22: one int64 key, distinct within a position
        perm = np.argsort(((key - key.min()) << 32) | ids, axis=1)
    else:
        perm = np.lexsort((ids, key), axis=-1)
    return TopK(np.take_along_axis(ids, perm, 1).astype(np.int32), np.take_along_axis(logps, perm, 1),
                tail.astype(np.float32))


def _floats(blob: bytes, count: int, what: str) -> np.ndarray:
    raw = _inflate(blob, what, 4 * count)
    if len(raw) != 4 * count:
        raise FormatError(f"{what}: the stream does not hold {count} values")
    values = np.frombuffer(bytes(raw), np.uint8).reshape(4, count).T.copy().view("<f4").ravel()
    if np.isnan(values).any() or (values > 0).any():
        raise FormatError(f"{what}: a value is not a log-probability")
    return values.astype(np.float32)


# --- sampled --------------------------------------------------------------------------------------------------


def encode_sampled(record: Sampled, order) -> Encoded:
    """Streams ``counts`` (the distinct tokens' counts, each position's summing to K) and ``ids`` (their ranks in
    `order`, ascending, as gaps)."""
    rank = _ranks(context(order).order)
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


def decode_sampled(streams: dict[str, bytes], n: int, k: int, order) -> Sampled:
    order = context(order).order
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
