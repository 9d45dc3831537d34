"""Reading a store: :func:`open` returns a read-only :class:`Store`.

Opening reads only the metadata: the header, checked against the reader's limits, and every array's metadata,
checked to be exactly what the header implies. Everything else is read per shard on first touch, and every file is
checked against its record (size and SHA-256) the first time this process reads it: the commit row of the shard
for per-shard files, the header's ``plan_files`` for the IDs and ID index. Uncompressed files are memory-mapped;
compressed ones are decoded into buffers of the size the header implies. No store content is handed to zarr-python
or chooses a decoder. A ``Store`` pickles as its path, so each DataLoader worker reopens its own maps (pages of
mapped files are shared between processes through the page cache).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds, teacher_store
from .errors import (
    DamagedFileError,
    DigestMismatchError,
    FormatError,
    IncompleteStoreError,
    LogitstoreError,
    RowOutOfRangeError,
    UnknownIdError,
    printable,
)
from .header import StoreMeta, read_meta
from .quantize import decode_fixed
from .shards import ChunkCache, ShardValues, blosc_bound, decode_chunk, zstd_bound
from .storage import Location, location, require_store

# Chunk cache + decoded parts + one chunk being decoded stay under 256 MiB whatever a store declares.
DEFAULT_CACHE_BYTES = 128 << 20
PART_BYTES = 96 << 20  # decoded per-shard offsets and per-row values kept at once
DIGEST_PREFIX = b"logitstore digest 2\n"
_ID_CHECK_BLOCK = 1 << 20


def open(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
         cache_bytes: int = DEFAULT_CACHE_BYTES, digest: str | None = None) -> Store:
    """Open the store at `path` (a folder or an fsspec URL) for reading. Opening never runs code from the store.

    With `digest` (the SHA-256 that `Store.digest` and `logitstore info` print), the store must be exactly that
    store: its metadata and commit table are pinned, and every file read is checked against them.
    """
    loc = location(path, storage_options)
    require_store(loc)
    store = Store(loc, read_meta(loc), cache_bytes=cache_bytes, storage_options=storage_options)
    if digest is not None:
        store.pin(digest)
    return store


def _open_file_limit() -> int:
    """How many shard files may be mapped at once (each map holds a file descriptor)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
            if wanted > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
        return max(64, min(int(soft) // 2, 32768))
    except (ImportError, ValueError, OSError):
        return 256


class _Parts:
    """Per-shard pieces (decoded offsets, per-row values, mapped value files), first in first out within a byte
    and a file budget. A hit is one dict lookup; a miss loads under the store's lock."""

    def __init__(self, max_bytes: int, max_files: int):
        self.items: dict[tuple, Any] = {}
        self.sizes: dict[tuple, tuple[int, int]] = {}
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0

    def put(self, key: tuple, value: Any, nbytes: int, files: int) -> None:
        self.items[key] = value
        self.sizes[key] = (nbytes, files)
        self.bytes += nbytes
        self.files += files
        while (self.bytes > self.max_bytes or self.files > self.max_files) and len(self.items) > 1:
            old = next(iter(self.items))
            del self.items[old]
            b, f = self.sizes.pop(old)
            self.bytes -= b
            self.files -= f


class Store:
    """A read-only view of a logitstore store."""

    def __init__(self, loc: Location, meta: StoreMeta, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 storage_options: dict[str, Any] | None = None):
        self.location = loc
        self.header = meta.header
        self.geometry = meta.geometry
        self.fields = meta.fields
        self.kind = kinds.kind_of(meta.header)  # pairs or unpaired: which per-row and ragged fields it has
        self._meta = meta
        self._open_args = (loc.url, storage_options, cache_bytes, None)
        self._columns = {array: j for j, array in enumerate(meta.shard_files)}
        self._width = fmt.commit_width(len(meta.shard_files))
        self._commit_rows: dict[int, np.ndarray | None] = {}
        self._pinned: np.ndarray | None = None
        self._cache = ChunkCache(cache_bytes)
        self._parts = _Parts(PART_BYTES, _open_file_limit())
        self._plan: dict[str, np.ndarray] | None = None
        self._lock = threading.RLock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, self._open_args)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing_shards)} shards missing"
        return f"<logitstore.Store {self.location.url} examples={len(self)} {state}>"

    # ---- description ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.geometry.num_examples

    @property
    def committed(self) -> np.ndarray:
        """Boolean mask over shards: True where the shard's commit record is present and intact (reads them all)."""
        return self.commit_table()[:, 0] == 1

    @property
    def complete(self) -> bool:
        return bool(self.header.get("complete")) and bool(self.committed.all())

    @property
    def missing_shards(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.committed)]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.header["fingerprint"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.header.get("tokenizer", {}))

    @property
    def has_per_token(self) -> bool:
        return all(name in self.fields for name in self.kind.per_token_fields)

    @property
    def kl_batch_size(self) -> int | None:
        """An unpaired store's KL pairing chunk (TRL's per-device batch size it was built for); None for pairs."""
        pairing = self.header.get("kl_pairing")
        return None if pairing is None else int(pairing["batch_size"])

    # ---- commit records and the digest ----------------------------------------------------------------------

    def commit_row(self, shard: int) -> np.ndarray | None:
        """Shard `shard`'s commit row [1, clipped, then per file: size, SHA-256 words], None if not committed."""
        if self._pinned is not None:
            row = self._pinned[shard]
            return row if row[0] == 1 else None
        if shard not in self._commit_rows:
            self._commit_rows[shard] = read_commit_row(self.location, shard, self._width)
        return self._commit_rows[shard]

    def commit_table(self) -> np.ndarray:
        """The whole commit table (zeros for shards not committed); reads every record not read yet."""
        if self._pinned is not None:
            return self._pinned
        table = np.zeros((self.geometry.num_shards, self._width), dtype=np.uint64)
        for shard in range(self.geometry.num_shards):
            row = self.commit_row(shard)
            if row is not None:
                table[shard] = row
        return table

    @property
    def digest(self) -> str:
        """SHA-256 naming the exact contents: every metadata document as stored and the commit table (which holds
        every shard file's size and SHA-256; the header holds those of the ID files). docs/FORMAT.md defines it."""
        return store_digest(self._meta.documents, self.commit_table())

    def pin(self, digest: str) -> None:
        """Require the store to be the one `digest` names, and read every file against that state from now on."""
        table = self.commit_table()
        actual = store_digest(self._meta.documents, table)
        if actual != digest.strip().lower():
            raise DigestMismatchError(f"{self.location.url} has digest {actual}, not the expected "
                                      f"{printable(digest.strip())}")
        self._pinned = table
        url, options, cache_bytes, _ = self._open_args
        self._open_args = (url, options, cache_bytes, actual)

    # ---- files, checked on first touch ----------------------------------------------------------------------

    def _rows_named(self, shard: int) -> str:
        span = self.geometry.shard_rows(shard)
        try:
            ids = [printable(self.id_of(r)) for r in span[:3]]
        except LogitstoreError:
            return f"{len(span)} examples (rows {span.start}-{span.stop - 1})"
        more = f" and {len(span) - 3} more" if len(span) > 3 else ""
        return f"{len(span)} examples ({', '.join(ids)}{more})"

    def _committed(self, shard: int) -> np.ndarray:
        row = self.commit_row(shard)
        if row is None:
            raise IncompleteStoreError(f"rows requested from shards that are not written yet: {shard}")
        return row

    def _file_limit(self, array: str) -> int:
        g = self.geometry
        if array in self.kind.row_fields:
            return zstd_bound(g.rows_per_shard * np.dtype(self.kind.row_fields[array][0]).itemsize)
        if array.endswith("/offsets") or array == fmt.CONTENT_KEY:
            return zstd_bound(g.rows_per_shard * 16)
        if array.startswith("teacher/"):
            return teacher_store.file_limit(self.header["teacher"], g.rows_per_shard * g.max_length)
        spec = self.fields[array.rsplit("/", 1)[0]]
        n_inner = g.shard_capacity // g.inner_chunk
        chunk = g.inner_chunk * np.dtype(spec.dtype).itemsize
        per_chunk = {"raw": chunk, "zstd": zstd_bound(chunk)}.get(spec.codec, blosc_bound(chunk))
        return n_inner * (per_chunk + 16) + 4

    def _shard_file(self, array: str, shard: int, *, mapped: bool) -> Any:
        """The checked bytes (or map) of shard `shard`'s file of `array`; None when its record says absent."""
        size, sha = fmt.commit_file(self._committed(shard), self._columns[array])
        key = fmt.chunk_key(array, shard)
        loc = self.location
        if size == 0:
            if loc.lexists(key):
                raise DamagedFileError(f"{loc.url}: damaged file {key} (present, but its commit record says "
                                       f"absent): shard {shard}, {self._rows_named(shard)}")
            return None
        if size > self._file_limit(array):
            raise FormatError(f"{loc.url}: the commit record of shard {shard} gives {key} {size} bytes, more than "
                              f"a file of its kind can have ({self._file_limit(array)})")
        try:
            data = loc.map_file(key, size) if mapped else loc.read_file(key, limit=size, size=size)
        except DamagedFileError as exc:
            self._drop_cached(key)
            raise DamagedFileError(f"{loc.url}: damaged file {key} ({exc}): shard {shard}, "
                                   f"{self._rows_named(shard)}") from None
        if data is None:
            raise DamagedFileError(f"{loc.url}: missing file {key} of committed shard {shard}, "
                                   f"{self._rows_named(shard)}")
        if hashlib.sha256(data).digest() != sha:
            self._drop_cached(key)
            raise DamagedFileError(f"{loc.url}: damaged file {key} (its SHA-256 differs from the commit record): "
                                   f"shard {shard}, {self._rows_named(shard)}")
        return data

    def _drop_cached(self, key: str) -> None:
        drop = getattr(self.location, "drop_cached", None)
        if drop is not None:
            drop(key)

    # ---- IDs ------------------------------------------------------------------------------------------------

    def _plan_arrays(self) -> dict[str, np.ndarray]:
        """The ID bytes, ID offsets and the sorted ID index, memory-mapped and checked once."""
        if self._plan is None:
            with self._lock:
                if self._plan is None:
                    self._plan = self._load_plan()
        return self._plan

    def _load_plan(self) -> dict[str, np.ndarray]:
        loc, n = self.location, len(self)
        out: dict[str, np.ndarray] = {}
        for key, (array, dtype, _) in fmt.PLAN_FILES.items():
            size = fmt.plan_file_size(key, n, self.header["id_bytes"])
            if size == 0:
                out[array] = np.zeros(0, dtype=dtype)
                continue
            _, sha = self.header["plan_files"][key]
            try:
                data = loc.map_file(key, size)
            except DamagedFileError as exc:
                self._drop_cached(key)
                raise DamagedFileError(f"{loc.url}: damaged file {key} ({exc}; example IDs / ID index)") from None
            if data is None:
                raise DamagedFileError(f"{loc.url}: missing file {key} (example IDs / ID index)")
            if hashlib.sha256(data).hexdigest() != sha:
                self._drop_cached(key)
                raise DamagedFileError(f"{loc.url}: damaged file {key} (its SHA-256 differs from the header; "
                                       "example IDs / ID index)")
            out[array] = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
        out["ids/offsets"] = out["ids/offsets"].reshape(n, 2)
        self._check_plan(out)
        return out

    def _check_plan(self, plan: dict[str, np.ndarray]) -> None:
        n, total = len(self), self.header["id_bytes"]
        offsets, hashes, rows = plan["ids/offsets"], plan["id_index/hash"], plan["id_index/row"]
        for start in range(0, n, _ID_CHECK_BLOCK):  # blockwise: no temporary proportional to N
            stop = min(start + _ID_CHECK_BLOCK, n)
            off = offsets[start:stop]
            if off.size and (off.min() < 0 or off.max() > total or np.any(off[:, 1] < off[:, 0])):
                raise FormatError(f"{self.location.url}: ID offsets are out of range")
            r = rows[start:stop]
            if r.size and (r.min() < 0 or r.max() >= n):
                raise FormatError(f"{self.location.url}: ID index is malformed")
            h = hashes[max(start - 1, 0):stop]
            if np.any(h[1:] < h[:-1]):
                raise FormatError(f"{self.location.url}: ID index is not sorted")

    @property
    def ids(self) -> list[str]:
        plan = self._plan_arrays()
        raw = plan["ids/values"].tobytes()
        return [self._decode_id(raw[a:b], i) for i, (a, b) in enumerate(plan["ids/offsets"].tolist())]

    def _decode_id(self, raw: bytes, row: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.location.url}: the ID of row {row} is not UTF-8") from None

    def id_of(self, row: int) -> str:
        if not 0 <= row < len(self):
            raise RowOutOfRangeError(f"row {row} out of range for a store of {len(self)} examples")
        plan = self._plan_arrays()
        a, b = plan["ids/offsets"][row]
        return self._decode_id(plan["ids/values"][a:b].tobytes(), row)

    def rows(self, ids: Iterable[str] | str) -> np.ndarray:
        """Row numbers of `ids`; unknown IDs raise :class:`UnknownIdError` naming them."""
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids)
        plan = self._plan_arrays()
        hashes, index_rows = plan["id_index/hash"], plan["id_index/row"]
        wanted = fmt.id_hashes(ids)
        pos = np.searchsorted(hashes, wanted)  # bisection: touches O(log N) pages of the mapped index
        out = np.empty(len(ids), dtype=np.int64)
        unknown = []
        for i, (key, p) in enumerate(zip(ids, pos.tolist())):
            found = -1
            while p < hashes.size and hashes[p] == wanted[i]:
                if self.id_of(int(index_rows[p])) == key:
                    found = int(index_rows[p])
                    break
                p += 1
            if found < 0:
                unknown.append(key)
            out[i] = found
        if unknown:
            shown = ", ".join(printable(repr(u)) for u in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise UnknownIdError(f"{len(unknown)} unknown example ID{'s' if len(unknown) > 1 else ''}: "
                                 f"{shown}{more}")
        return out

    # ---- per-row values -------------------------------------------------------------------------------------

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise RowOutOfRangeError(f"row out of range for a store of {len(self)} examples")
        return rows

    def _absent(self, rows: np.ndarray) -> IncompleteStoreError:
        shards = np.unique(rows // self.geometry.rows_per_shard).tolist()
        absent = [k for k in shards if self.commit_row(k) is None]
        return IncompleteStoreError(f"rows requested from shards that are not written yet: "
                                    f"{', '.join(map(str, absent[:5]))}")

    def _row_part(self, shard: int) -> dict[str, np.ndarray]:
        part = self._parts.items.get(("rows", shard))
        if part is None:
            with self._lock:
                part = self._parts.items.get(("rows", shard))
                if part is None:
                    part = self._load_row_part(shard)
                    self._parts.put(("rows", shard), part, sum(v.nbytes for v in part.values()), 0)
        return part

    def _load_row_part(self, shard: int) -> dict[str, np.ndarray]:
        rps = self.geometry.rows_per_shard
        part = {}
        for name, (dtype, fill) in self.kind.row_fields.items():
            data = self._shard_file(name, shard, mapped=False)
            if data is None:
                part[name] = np.full(rps, fill, dtype=dtype)
                continue
            try:
                part[name] = decode_chunk("zstd", memoryview(data), np.dtype(dtype).newbyteorder("<"),
                                          rps * np.dtype(dtype).itemsize).astype(dtype)
            except FormatError as exc:
                raise FormatError(f"{self.location.url}: {fmt.chunk_key(name, shard)}: {exc}") from None
        if "label" in part:  # a label is a boolean: any other byte is damage, not a third class
            count = len(self.geometry.shard_rows(shard))
            bad = np.flatnonzero(part["label"][:count] > 1)
            if bad.size:
                raise FormatError(f"{self.location.url}: {fmt.chunk_key('label', shard)}: row "
                                  f"{shard * rps + int(bad[0])} has label {int(part['label'][bad[0]])}, not 0 or 1")
        return part

    def row_values(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        rows = self._check_rows(rows)
        out = {name: np.empty(rows.size, dtype=dtype) for name, (dtype, _) in self.kind.row_fields.items()}
        columns = list(out.items())
        rps = self.geometry.rows_per_shard
        try:
            for i, row in enumerate(rows.tolist()):
                shard, local = divmod(row, rps)
                part = self._row_part(shard)
                for name, column in columns:
                    column[i] = part[name][local]
        except IncompleteStoreError:
            raise self._absent(rows) from None
        return out

    def get(self, ids: Iterable[str] | str) -> dict[str, np.ndarray]:
        """Per-sequence values for `ids`, in their order, and `row` (int64). A pairs store gives `chosen_logps`,
        `rejected_logps` (float32), `chosen_tokens`, `rejected_tokens` (int32); an unpaired store gives
        `completion_logps`, `kl_logps` (float32), `completion_tokens`, `kl_tokens` (int32) and `label` (uint8,
        1 desirable, 0 undesirable)."""
        rows = self.rows(ids)
        out = self.row_values(rows)
        out["row"] = rows
        return out

    # ---- teacher records: logitstore/teacher_store.py ----------------------------------------------------

    @property
    def teacher(self) -> dict[str, Any] | None:
        """The header's teacher entry (kind, k, codec, seed, block_positions, vocab); None without records."""
        return dict(self.header["teacher"]) if "teacher" in self.header else None

    def top_k(self, side: str, rows: Sequence[int] | np.ndarray) -> dict[str, list[np.ndarray]]:
        """Each row's teacher records on `side` ("chosen", "rejected"): see `teacher_store.rows_records`."""
        rows = self._check_rows(rows)
        try:
            return teacher_store.rows_records(self, side, rows)
        except IncompleteStoreError:
            raise self._absent(rows) from None

    # ---- content keys ---------------------------------------------------------------------------------------

    @property
    def scoring(self) -> dict[str, Any]:
        """The scoring settings that enter every content key (docs/FORMAT.md, "Content key")."""
        return dict(self.header.get("content_key", {}).get("scoring", {}))

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the values came from: `computed` and `reused` counts and the `sources` reused from."""
        return dict(self.header.get("provenance", {}))

    def content_keys(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """16-byte content keys, uint8 [len(rows), 16] (every row when `rows` is None; all must be committed).

        Read per shard on first touch, like every other per-shard file: checked against the commit record and
        decoded into a buffer of the size the header implies."""
        rows = self._check_rows(np.arange(len(self)) if rows is None else rows)
        out = np.empty((rows.size, fmt.CONTENT_KEY_WIDTH), dtype=np.uint8)
        rps = self.geometry.rows_per_shard
        try:
            shards, local = np.divmod(rows, rps)
            for shard in np.unique(shards).tolist():
                at = shards == shard
                out[at] = self._key_part(shard)[local[at]]
        except IncompleteStoreError:
            raise self._absent(rows) from None
        return out

    def _key_part(self, shard: int) -> np.ndarray:
        part = self._parts.items.get((fmt.CONTENT_KEY, shard))
        if part is None:
            with self._lock:
                part = self._parts.items.get((fmt.CONTENT_KEY, shard))
                if part is None:
                    part = self._load_key_part(shard)
                    self._parts.put((fmt.CONTENT_KEY, shard), part, part.nbytes, 0)
        return part

    def _load_key_part(self, shard: int) -> np.ndarray:
        rps, width = self.geometry.rows_per_shard, fmt.CONTENT_KEY_WIDTH
        data = self._shard_file(fmt.CONTENT_KEY, shard, mapped=False)
        if data is None:  # zarr leaves out a chunk that equals the fill value (all zeros)
            return np.zeros((rps, width), dtype=np.uint8)
        try:
            keys = decode_chunk("zstd", memoryview(data), np.dtype(np.uint8), rps * width)
        except FormatError as exc:
            raise FormatError(f"{self.location.url}: {fmt.chunk_key(fmt.CONTENT_KEY, shard)}: {exc}") from None
        return keys.reshape(rps, width)

    # ---- ragged values --------------------------------------------------------------------------------------

    def _spec(self, field: str) -> fmt.RaggedSpec:
        try:
            return self.fields[field]
        except KeyError:
            raise KeyError(f"the store has no field {field!r} (it has {', '.join(self.fields)})") from None

    def _ragged_part(self, field: str, shard: int) -> tuple[np.ndarray, ShardValues | None]:
        part = self._parts.items.get((field, shard))
        if part is None:
            with self._lock:
                part = self._parts.items.get((field, shard))
                if part is None:
                    part = self._load_ragged_part(field, shard)
                    self._parts.put((field, shard), part, part[0].nbytes, 0 if part[1] is None else 1)
        return part

    def _load_ragged_part(self, field: str, shard: int) -> tuple[np.ndarray, ShardValues | None]:
        """Shard `shard` of `field`: its offsets, checked and made shard-local, and its mapped values."""
        g, spec = self.geometry, self.fields[field]
        array = fmt.offsets_array(field)
        data = self._shard_file(array, shard, mapped=False)
        count = len(g.shard_rows(shard))
        if data is None:
            off = np.zeros((count, 2), dtype=np.int64)
        else:
            try:
                off = decode_chunk("zstd", memoryview(data), np.dtype("<i8"), g.rows_per_shard * 16)
            except FormatError as exc:
                raise FormatError(f"{self.location.url}: {fmt.chunk_key(array, shard)}: {exc}") from None
            off = off.reshape(g.rows_per_shard, 2)[:count].astype(np.int64)
        base = shard * g.shard_capacity
        lengths = off[:, 1] - off[:, 0]
        bad = (off[:, 0] < base) | (lengths < 0) | (off[:, 1] > base + g.shard_capacity) | (lengths > g.max_length)
        if bad.any():
            row = shard * g.rows_per_shard + int(np.flatnonzero(bad)[0])
            raise FormatError(f"{field}/offsets: row {row} points outside its shard")
        local = (off - base).astype(np.uint32)
        values_key = fmt.values_array(field)
        mapped = self._shard_file(values_key, shard, mapped=True)
        values = None if mapped is None else ShardValues(
            mapped, fmt.chunk_key(values_key, shard), spec, g.shard_capacity, g.inner_chunk, self._cache,
            (field, shard))
        return local, values

    def offsets(self, field: str) -> np.ndarray:
        """The (N, 2) global offsets of a ragged field (zeros for rows of shards not committed); reads every shard."""
        spec = self._spec(field)
        g = self.geometry
        out = np.zeros((len(self), 2), dtype=np.int64)
        for shard in range(g.num_shards):
            if self.commit_row(shard) is None:
                continue
            local, _ = self._ragged_part(spec.name, shard)
            span = g.shard_rows(shard)
            out[span.start:span.stop] = local.astype(np.int64) + shard * g.shard_capacity
        return out

    def ragged(self, field: str, rows: Sequence[int] | np.ndarray, *, decode: bool = True) -> list[np.ndarray]:
        """One array per row of a ragged field. Per-token log-probs come back as float32 when `decode`."""
        rows = self._check_rows(rows)
        spec = self._spec(field)
        rps = self.geometry.rows_per_shard
        items = self._parts.items
        out = []
        try:
            for row in rows.tolist():
                shard, local = divmod(row, rps)
                part = items.get((field, shard)) or self._ragged_part(field, shard)
                start, stop = part[0][local].tolist()
                values = part[1]
                out.append(values.read(start, stop) if values is not None else np.zeros(stop - start, spec.dtype))
        except IncompleteStoreError:
            raise self._absent(rows) from None
        if decode and spec.name in self.kind.per_token_fields:
            if spec.codec == "fixed":
                assert spec.scale is not None
                out = [decode_fixed(v, spec.scale) for v in out]
            else:
                out = [np.asarray(v, dtype=np.float32) for v in out]
        return out

    def example(self, key: str | int) -> dict[str, Any]:
        """Everything stored for one example, by ID or row number."""
        row = int(self.rows([key])[0]) if isinstance(key, str) else int(key)
        out: dict[str, Any] = {"id": self.id_of(row), "row": row}
        out.update({name: value[0].item() for name, value in self.row_values([row]).items()})
        for field in self.fields:
            out[field] = self.ragged(field, [row])[0]
        return out


def read_commit_row(loc: Location, shard: int, width: int) -> np.ndarray | None:
    """Shard `shard`'s commit row, or None when it is absent or torn (a torn record means: not committed)."""
    import google_crc32c

    payload = 8 * width
    data = loc.read_file(f"commits/c/{shard}/0", limit=payload + 4 + 4096)
    if data is None or len(data) != payload + 4:
        return None
    if google_crc32c.value(data[:payload]) != int.from_bytes(data[payload:], "little"):
        return None
    row = np.frombuffer(data[:payload], dtype="<u8").astype(np.uint64)
    if row[0] == 1:
        return row
    if row.any():  # intact (its CRC holds) yet neither a commit nor the all-zero "not committed": not a torn write
        raise DamagedFileError(f"{loc.url}: commit record of shard {shard} starts with {int(row[0])}, neither 1 "
                               "(committed) nor an all-zero row (not committed)")
    return None


def store_digest(documents: dict[str, bytes], commits: np.ndarray) -> str:
    """SHA-256 of: a fixed prefix; per metadata document in key order, its key, a newline, its length as 8
    little-endian bytes and its bytes as stored; then "commits" and a newline and the commit table as little-endian
    uint64 in row order (docs/FORMAT.md, "Store digest")."""
    h = hashlib.sha256(DIGEST_PREFIX)
    for key in sorted(documents):
        raw = documents[key]
        h.update(key.encode("utf-8") + b"\n" + len(raw).to_bytes(8, "little"))
        h.update(raw)
    h.update(b"commits\n")
    h.update(np.ascontiguousarray(commits, dtype="<u8").tobytes())
    return h.hexdigest()


def _reopen(url: str, storage_options: dict[str, Any] | None, cache_bytes: int, digest: str | None) -> Store:
    return open(url, storage_options=storage_options, cache_bytes=cache_bytes, digest=digest)
