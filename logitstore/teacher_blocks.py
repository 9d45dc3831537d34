"""Teacher records in self-contained blocks of positions: the unit a store writes, checks and decodes.

The positions of one side of a shard (its rows' scored tokens, in row order) are cut into blocks of
``block_positions`` positions (the last one shorter); rows may straddle blocks. A block is::

    magic  b"LTB2"
    kind   uint8       1 = top-k, 2 = sampled
    codec  uint8       top-k: the preset's code (topk_codec.PRESETS[...].code, 1..6); sampled: 0
    n      uint32      positions in the block
    k      uint32      K
    m      uint8       number of streams (3 for top-k: ids, values, tail; 2 for sampled: counts, ids)
    sizes  m x uint32  each stream's byte length
    the streams, in that order (``logitstore.topk_codec``)

all little-endian (docs/FORMAT.md, "Teacher record blocks", specifies every byte). Why blocks: much of the streams'
redundancy lies between positions, and a zstd window over ~1,024 positions catches it (docs/teacher.md). Reading a
row decodes the blocks it spans, never more than ``MAX_BLOCK_ENTRIES`` entries each. The per-shard context
(``topk_codec.ShardContext``: vocabulary order and prior) is passed as ``order``; a bare order array also works.
"""

from __future__ import annotations

import struct

import numpy as np

from . import topk_codec as C
from .errors import FormatError
from .teacher import Sampled, TopK

MAGIC = b"LTB2"
KINDS = {1: "top_k", 2: "sampled"}
STREAMS = {"top_k": ("ids", "values", "tail"), "sampled": ("counts", "ids")}
BLOCK_POSITIONS = 1024
MAX_TOP_K = 1 << 16  # K a reader accepts
MAX_DRAWS = (1 << 16) - 1  # sampled K: counts are uint16
MAX_BLOCK_ENTRIES = 1 << 22  # positions x K in one block: bounds every decode allocation
_HEAD = struct.Struct("<4sBBIIB")


def block_positions(k: int) -> int:
    """Positions per block for K: BLOCK_POSITIONS, fewer when K is so large that a block would pass the limit."""
    return max(1, min(BLOCK_POSITIONS, MAX_BLOCK_ENTRIES // k))


def max_block_bytes(kind: str, k: int, positions: int) -> int:
    """The most bytes a block of `positions` positions of K can take: its header and each stream at zstd's compress
    bound of the most its values can decode to (top-k values: a top code per position and K offsets)."""
    from .shards import zstd_bound

    n = positions
    streams = (9 * n * k, 9 * (n + n * k), 9 * n) if kind == "top_k" else (9 * n * k, 9 * n * k)
    return _HEAD.size + 4 * len(streams) + sum(zstd_bound(b) for b in streams)


def encode_blocks(record: TopK | Sampled, order, codec: str = "standard",
                  positions: int | None = None) -> list[bytes]:
    """The blocks of all positions of `record` (one side of a shard)."""
    kind = "top_k" if isinstance(record, TopK) else "sampled"
    k = record.ids.shape[1] if kind == "top_k" else record.k
    step = positions or block_positions(k)
    n = record.ids.shape[0]
    out = []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        if kind == "top_k":
            part = TopK(record.ids[lo:hi], record.logps[lo:hi], record.tail_logp[lo:hi])
            streams = C.encode_top_k(part, order, codec).streams
        else:
            part = Sampled(record.ids[lo:hi], record.counts[lo:hi], record.k)
            streams = C.encode_sampled(part, order).streams
        names = STREAMS[kind]
        code = C.preset(codec).code if kind == "top_k" else 0
        head = _HEAD.pack(MAGIC, 1 if kind == "top_k" else 2, code, hi - lo, k, len(names))
        sizes = struct.pack(f"<{len(names)}I", *(len(streams[s]) for s in names))
        out.append(head + sizes + b"".join(streams[s] for s in names))
    return out


def decode_block(data: bytes, *, kind: str, k: int, positions: int, order,
                 codec: str = "standard") -> TopK | Sampled:
    """One block, checked against what the store says it holds (kind, K, positions, codec)."""
    if not 1 <= k <= (MAX_TOP_K if kind == "top_k" else MAX_DRAWS) or positions * k > MAX_BLOCK_ENTRIES:
        raise FormatError(f"teacher block: K = {k} with {positions} positions is past the reader's limits")
    if len(data) < _HEAD.size:
        raise FormatError("teacher block: shorter than its header")
    magic, code, codec_code, n, block_k, m = _HEAD.unpack_from(data)
    if magic != MAGIC or KINDS.get(code) != kind:
        raise FormatError(f"teacher block: not a {kind} block")
    expected = C.preset(codec).code if kind == "top_k" else 0
    if codec_code != expected:
        raise FormatError(f"teacher block: codec byte {codec_code}, expected {expected}"
                          + (f" ({codec})" if kind == "top_k" else ""))
    if n != positions or block_k != k:
        raise FormatError(f"teacher block: holds {n} positions of K = {block_k}, expected {positions} of K = {k}")
    names = STREAMS[kind]
    if m != len(names) or len(data) < _HEAD.size + 4 * m:
        raise FormatError("teacher block: wrong stream table")
    sizes = struct.unpack_from(f"<{m}I", data, _HEAD.size)
    start = _HEAD.size + 4 * m
    if start + sum(sizes) != len(data):
        raise FormatError("teacher block: stream sizes do not add up to the block's size")
    streams = {}
    for name, size in zip(names, sizes):
        streams[name] = bytes(data[start:start + size])
        start += size
    if kind == "top_k":
        return C.decode_top_k(streams, n, k, order, codec)
    return C.decode_sampled(streams, n, k, order)


def row_spans(lengths: np.ndarray, rows: np.ndarray, step: int) -> list[list[tuple[int, int, int]]]:
    """For each of `rows` (positions per row: `lengths`), the (block, start, stop) slices that hold its positions."""
    ends = np.cumsum(np.asarray(lengths, np.int64))
    starts = ends - lengths
    out = []
    for r in np.asarray(rows, np.int64):
        lo, hi = int(starts[r]), int(ends[r])
        spans = []
        while lo < hi:
            block = lo // step
            stop = min(hi, (block + 1) * step)
            spans.append((block, lo - block * step, stop - block * step))
            lo = stop
        out.append(spans)
    return out


def check_request(*, top_k: int | None, sample_k: int | None, vocab: int, codec: str = "standard") -> None:
    """What a build checks before any model work: one line for each request it cannot store."""
    from .teacher import TeacherError

    C.preset(codec)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise TeacherError(f"--top-k must be a positive integer, got {top_k!r}")
        if top_k > vocab:
            raise TeacherError(f"--top-k {top_k} is larger than the vocabulary ({vocab} tokens)")
        if top_k > MAX_TOP_K:
            raise TeacherError(f"--top-k {top_k} is more than the {codec} codec holds (at most {MAX_TOP_K})")
    if sample_k is not None:
        if isinstance(sample_k, bool) or not isinstance(sample_k, int) or sample_k < 1:
            raise TeacherError(f"--sample-k must be a positive integer, got {sample_k!r}")
        if sample_k > MAX_DRAWS:
            raise TeacherError(f"--sample-k {sample_k} is more than the codec holds (at most {MAX_DRAWS} draws)")
