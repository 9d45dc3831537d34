"""Teacher records in a store: the header entry, one file per shard and side, and reading rows from them.

A store built with ``--top-k K`` or ``--sample-k K`` holds, at every scored completion position of each side, a
record of the reference's next-token distribution (:mod:`logitstore.teacher`), coded in blocks
(:mod:`logitstore.teacher_blocks`). Per shard and side there is one file, ``teacher/SIDE/c/k``, listed in the
header's ``shard_files`` (so the commit row holds its size and SHA-256 and the reader checks it on first touch)::

    magic      b"LTS1"
    vocab      uint32      V, the width of the teacher's distribution (the header's teacher.vocab)
    positions  uint64      scored positions of the side in the shard (the sum of its rows' *_tokens)
    blocks     uint32      ceil(positions / block_positions)
    order      uint32      byte size of the vocabulary order
    sizes      blocks x uint32, each block's byte size
    the vocabulary order (``topk_codec.encode_order``), then the blocks in order

all little-endian. The positions of the shard's rows follow one another in row order; a row's positions are
``teacher_blocks.row_spans`` of the rows' scored-token counts. Everything in a file is checked against what the
header and the row counts imply before it is used, and every decode is bounded by ``teacher_blocks``' limits.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import teacher_blocks as TB
from . import topk_codec as C
from .errors import FormatError, LogitstoreError
from .teacher import Sampled, TeacherError, TopK

FILE_MAGIC = b"LTS1"
_FILE_HEAD = struct.Struct("<4sIQII")
MAX_VOCAB = 1 << 22  # teacher vocabulary a reader accepts (the order's decode allocates a few arrays of V)
MAX_SEED = (1 << 63) - 1
KINDS = ("top_k", "sampled")
ENTRY_KEYS = {"kind", "k", "codec", "seed", "block_positions", "vocab"}


class NoTeacherError(LogitstoreError, KeyError):
    """Teacher records asked of a store built without them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def array_name(side: str) -> str:
    """The shard-file array of one side's records: ``teacher/chosen``."""
    return f"teacher/{side}"


def side_names(kind: Any) -> list[str]:
    """The sides of a store kind as `top_k` names them: "chosen", "rejected" for pairs."""
    return [s.ids[:-len("_ids")] for s in kind.sides]


def teacher_arrays(header: dict[str, Any]) -> list[str]:
    """The teacher shard-file arrays a header implies (none without a teacher entry)."""
    from .kinds import kind_of

    return [array_name(side) for side in side_names(kind_of(header))] if "teacher" in header else []


def entry(kind: str, k: int, vocab: int, *, codec: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """The header's teacher entry for a build (`codec` for top-k, `seed` for sampled)."""
    return {"kind": kind, "k": int(k), "codec": codec if kind == "top_k" else None,
            "seed": int(seed) if kind == "sampled" else None, "block_positions": TB.block_positions(int(k)),
            "vocab": int(vocab)}


def check_entry(value: Any) -> dict[str, Any]:
    """The header's teacher entry, checked against the reader's limits (raises FormatError)."""
    if not isinstance(value, dict) or set(value) != ENTRY_KEYS:
        raise FormatError(f"header teacher must be an object with exactly {', '.join(sorted(ENTRY_KEYS))}")
    kind, k, vocab, bp = value["kind"], value["k"], value["vocab"], value["block_positions"]
    if kind not in KINDS:
        raise FormatError(f"header teacher.kind must be top_k or sampled, got {kind!r}"[:120])
    if type(vocab) is not int or not 1 <= vocab <= MAX_VOCAB:
        raise FormatError(f"header teacher.vocab must be an integer in [1, {MAX_VOCAB}]")
    most = min(TB.MAX_TOP_K, vocab) if kind == "top_k" else TB.MAX_DRAWS
    if type(k) is not int or not 1 <= k <= most:
        raise FormatError(f"header teacher.k must be an integer in [1, {most}] for a {kind} store")
    if type(bp) is not int or bp < 1 or bp * k > TB.MAX_BLOCK_ENTRIES:
        raise FormatError(f"header teacher.block_positions must be a positive integer with block_positions * k at "
                          f"most {TB.MAX_BLOCK_ENTRIES}")
    if kind == "top_k":
        if value["codec"] not in C.PRESETS or value["seed"] is not None:
            raise FormatError(f"header teacher: a top_k store has a codec ({', '.join(C.PRESETS)}) and seed null")
    elif value["codec"] is not None or type(value["seed"]) is not int or not 0 <= value["seed"] <= MAX_SEED:
        raise FormatError("header teacher: a sampled store has codec null and an integer seed from 0")
    return value


def file_limit(teacher: dict[str, Any], positions: int) -> int:
    """The most bytes a file of `positions` positions can have: its head, order and blocks at their bounds."""
    from .shards import zstd_bound

    k, bp = teacher["k"], teacher["block_positions"]
    blocks = -(-positions // bp)
    per_block = 64 + 3 * zstd_bound(9 * bp * k)
    return _FILE_HEAD.size + 4 * blocks + zstd_bound(9 * (teacher["vocab"] + 1)) + blocks * per_block


# ---- writing -------------------------------------------------------------------------------------------------


def concat(records: Sequence[TopK | Sampled], teacher: dict[str, Any]) -> TopK | Sampled:
    """The records of a shard's rows, one after another (rows with no scored positions add nothing)."""
    k = teacher["k"]
    if teacher["kind"] == "top_k":
        parts = [r for r in records if isinstance(r, TopK)]
        if len(parts) != len(records) or any(r.ids.shape[1:] != (k,) for r in parts):
            raise ValueError(f"teacher records must be top-{k} records, one per row")
        return TopK(np.concatenate([r.ids for r in parts] or [np.zeros((0, k), np.int32)]).astype(np.int32),
                    np.concatenate([r.logps for r in parts] or [np.zeros((0, k), np.float32)]).astype(np.float32),
                    np.concatenate([r.tail_logp for r in parts] or [np.zeros(0, np.float32)]).astype(np.float32))
    parts = [r for r in records if isinstance(r, Sampled)]
    if len(parts) != len(records) or any(r.k != k or r.ids.shape[1:] != (k,) for r in parts):
        raise ValueError(f"teacher records must be sampled records of {k} draws, one per row")
    return Sampled(np.concatenate([r.ids for r in parts] or [np.zeros((0, k), np.int32)]).astype(np.int32),
                   np.concatenate([r.counts for r in parts] or [np.zeros((0, k), np.uint16)]).astype(np.uint16), k)


def encode_file(record: TopK | Sampled, teacher: dict[str, Any]) -> bytes:
    """One shard side's file. The vocabulary order is built from this file's records alone, so the bytes depend
    only on the rows of the shard (a resumed or re-sharded build writes the same file for the same rows)."""
    vocab = teacher["vocab"]
    ids = record.ids if isinstance(record, TopK) else record.ids[record.counts > 0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise TeacherError(f"teacher records hold a token id outside the vocabulary of {vocab}")
    order = C.vocab_order(ids, vocab)
    order_blob = C.encode_order(order)
    n = int(record.ids.shape[0])
    blocks = TB.encode_blocks(record, order, teacher["codec"] or "standard", teacher["block_positions"]) if n else []
    head = _FILE_HEAD.pack(FILE_MAGIC, vocab, n, len(blocks), len(order_blob))
    sizes = struct.pack(f"<{len(blocks)}I", *(len(b) for b in blocks))
    return head + sizes + order_blob + b"".join(blocks)


# ---- reading -------------------------------------------------------------------------------------------------


class SideFile:
    """One checked teacher file: its vocabulary order and where each block lies."""

    def __init__(self, data: Any, teacher: dict[str, Any], positions: int, name: str):
        self.data, self.teacher, self.positions, self.name = data, teacher, positions, name
        size = len(data)
        if size < _FILE_HEAD.size:
            raise FormatError(f"{name}: shorter than its header")
        magic, vocab, n, blocks, order_size = _FILE_HEAD.unpack_from(data, 0)
        if magic != FILE_MAGIC:
            raise FormatError(f"{name}: not a teacher file")
        if vocab != teacher["vocab"]:
            raise FormatError(f"{name}: holds a vocabulary of {vocab}, the header says {teacher['vocab']}")
        if n != positions:
            raise FormatError(f"{name}: holds {n} positions, the shard's rows have {positions} scored tokens")
        bp = teacher["block_positions"]
        if blocks != -(-positions // bp):
            raise FormatError(f"{name}: holds {blocks} blocks, {positions} positions take {-(-positions // bp)}")
        table_end = _FILE_HEAD.size + 4 * blocks
        if table_end + order_size > size:
            raise FormatError(f"{name}: its block table and order run past the end of the file")
        sizes = np.frombuffer(data, dtype="<u4", count=blocks, offset=_FILE_HEAD.size).astype(np.int64)
        start = table_end + order_size
        if start + int(sizes.sum()) != size:
            raise FormatError(f"{name}: the block sizes do not add up to the file's size")
        self.starts = start + np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        try:
            self.order = C.decode_order(bytes(data[table_end:table_end + order_size]), vocab)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None

    @property
    def nbytes(self) -> int:
        return int(self.order.nbytes + self.starts.nbytes)

    def block(self, j: int) -> TopK | Sampled:
        t = self.teacher
        n = min(t["block_positions"], self.positions - j * t["block_positions"])
        raw = bytes(self.data[int(self.starts[j]):int(self.starts[j + 1])])
        try:
            return TB.decode_block(raw, kind=t["kind"], k=t["k"], positions=n, order=self.order,
                                   codec=t["codec"] or "standard")
        except FormatError as exc:
            raise FormatError(f"{self.name}: block {j}: {exc}") from None


class _Decoded:
    """A decoded block in the chunk cache (which counts entries by `nbytes`)."""

    def __init__(self, record: TopK | Sampled):
        self.record = record
        arrays = (record.ids, record.logps, record.tail_logp) if isinstance(record, TopK) else (record.ids,
                                                                                                record.counts)
        self.nbytes = sum(a.nbytes for a in arrays)


def rows_records(store: Any, side: str, rows: np.ndarray) -> dict[str, list[np.ndarray]]:
    """`Store.top_k`'s work: the teacher's records on `side` of `rows`, read through the store's checked files and
    caches, one entry per row of T = the row's scored tokens on that side: ``ids`` [T, K] int32 (most likely
    first), ``logps`` [T, K] float32, ``tail_logp`` [T] float32 (log of the mass outside the K; -inf when K is the
    vocabulary). A sampled store gives ``ids`` [T, K] int32 and ``counts`` [T, K] uint16 instead (distinct drawn
    ids ascending, padding id 0 with count 0)."""
    teacher = store.header.get("teacher")
    if teacher is None:
        raise NoTeacherError(f"{store.location.url} holds no top-k teacher records; rebuild with --top-k K "
                             "(or --sample-k K)")
    sides = side_names(store.kind)
    if side not in sides:
        raise ValueError(f"side must be one of {', '.join(sides)}, got {side!r}")
    counts_field = store.kind.sides[sides.index(side)].tokens
    rps, bp = store.geometry.rows_per_shard, teacher["block_positions"]
    top = teacher["kind"] == "top_k"
    names = ("ids", "logps", "tail_logp") if top else ("ids", "counts")
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for row in rows.tolist():
        shard, local = divmod(row, rps)
        lengths, part = side_part(store, side, shard, counts_field)
        pieces = [(decoded_block(store, side, shard, block, part), lo, hi)
                  for block, lo, hi in TB.row_spans(lengths, [local], bp)[0]]
        k = teacher["k"]
        if top:
            out["ids"].append(_cat([r.ids[lo:hi] for r, lo, hi in pieces], (0, k), np.int32))
            out["logps"].append(_cat([r.logps[lo:hi] for r, lo, hi in pieces], (0, k), np.float32))
            out["tail_logp"].append(_cat([r.tail_logp[lo:hi] for r, lo, hi in pieces], (0,), np.float32))
        else:
            out["ids"].append(_cat([r.ids[lo:hi] for r, lo, hi in pieces], (0, k), np.int32))
            out["counts"].append(_cat([r.counts[lo:hi] for r, lo, hi in pieces], (0, k), np.uint16))
    return out


def _cat(pieces: list[np.ndarray], empty: tuple[int, ...], dtype: Any) -> np.ndarray:
    if not pieces:
        return np.zeros(empty, dtype)
    return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)


def side_part(store: Any, side: str, shard: int, counts_field: str) -> tuple[np.ndarray, SideFile]:
    """The shard's per-row scored-token counts on `side` and its checked teacher file (cached per shard)."""
    key = ("teacher", side, shard)
    part = store._parts.items.get(key)
    if part is None:
        with store._lock:
            part = store._parts.items.get(key)
            if part is None:
                count = len(store.geometry.shard_rows(shard))
                lengths = store._row_part(shard)[counts_field][:count].astype(np.int64)
                if lengths.size and (lengths.min() < 0 or lengths.max() > store.geometry.max_length):
                    raise FormatError(f"{store.location.url}: {counts_field} of shard {shard} are not token counts")
                array = array_name(side)
                data = store._shard_file(array, shard, mapped=True)
                from .format import chunk_key

                name = f"{store.location.url}: {chunk_key(array, shard)}"
                if data is None:
                    raise FormatError(f"{name}: the commit record says absent, but a teacher store has a file "
                                      "for every shard and side")
                part = (lengths, SideFile(data, store.header["teacher"], int(lengths.sum()), name))
                store._parts.put(key, part, part[1].nbytes + lengths.nbytes, 1)
    return part


def decoded_block(store: Any, side: str, shard: int, block: int, part: SideFile) -> Any:
    key = ("teacher", side, shard, block)
    hit = store._cache.get(key)
    if hit is None:
        hit = _Decoded(part.block(block))
        store._cache.put(key, hit)
    return hit.record
