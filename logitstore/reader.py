"""Reading a store: :func:`open` returns a read-only :class:`Store`.

Per-row values (sequence log-prob sums, token counts) are loaded into memory when the store opens; ragged data
(token ids, per-token log-probs) is read on demand through :mod:`logitstore.shards`. A ``Store`` pickles as its
path, so each DataLoader worker reopens its own maps.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import format as fmt
from .errors import FormatError, IncompleteStoreError, UnknownIdError
from .quantize import decode_fixed
from .shards import ChunkCache, ShardValues
from .storage import Location, file_crc, location, require_store
from .writer import committed_shards, id_hashes, read_header

DEFAULT_CACHE_BYTES = 256 << 20


def open(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
         cache_bytes: int = DEFAULT_CACHE_BYTES) -> Store:
    """Open the store at `path` (a folder or an fsspec URL) for reading. Opening never runs code from the store."""
    loc = location(path, storage_options)
    require_store(loc)
    header = read_header(loc)
    assert header is not None
    return Store(loc, header, cache_bytes=cache_bytes, storage_options=storage_options)


class Store:
    """A read-only view of a logitstore store."""

    def __init__(self, loc: Location, header: dict[str, Any], *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 storage_options: dict[str, Any] | None = None):
        import zarr

        self.location = loc
        self.header = header
        self._open_args = (loc.url, storage_options, cache_bytes)
        try:
            self.geometry = fmt.Geometry(header["num_examples"], header["rows_per_shard"], header["max_length"],
                                         header["inner_chunk"])
            self.fields = {name: fmt.spec_from_header(name, entry) for name, entry in header["fields"].items()
                           if entry["kind"] == "ragged"}
            if header["shard_capacity"] != self.geometry.shard_capacity:
                raise FormatError("shard_capacity does not match rows_per_shard, max_length and inner_chunk")
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{loc.url}: malformed header ({exc})") from exc
        unknown = set(self.fields) - set(fmt.TOKEN_FIELDS) - set(fmt.PER_TOKEN_FIELDS)
        if unknown:
            raise FormatError(f"{loc.url}: unknown fields {sorted(unknown)}")
        self._group = zarr.open_group(loc.zarr_store(read_only=True), mode="r")
        n = self.geometry.num_examples
        self._row_values: dict[str, np.ndarray] = {}
        for name in fmt.ROW_FIELDS:
            values = np.asarray(self._group[name][:])
            if values.shape != (n,):
                raise FormatError(f"{loc.url}: {name} has shape {values.shape}, expected ({n},)")
            self._row_values[name] = values
        self.committed = committed_shards(self._group, self.geometry.num_shards)
        self._commit_rows: np.ndarray | None = None
        self._cache = ChunkCache(cache_bytes)
        self._offsets: dict[str, np.ndarray] = {}
        self._shards: dict[tuple[str, int], ShardValues | None] = {}
        self._ids: tuple[np.ndarray, np.ndarray] | None = None
        self._index: tuple[np.ndarray, np.ndarray] | None = None
        self._content_keys: np.ndarray | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        url, storage_options, cache_bytes = self._open_args
        return (_reopen, (url, storage_options, cache_bytes))

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing_shards)} shards missing"
        return f"<logitstore.Store {self.location.url} examples={len(self)} {state}>"

    # ---- description ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.geometry.num_examples

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
        return all(name in self.fields for name in fmt.PER_TOKEN_FIELDS)

    # ---- IDs ------------------------------------------------------------------------------------------------

    def _id_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ids is None:
            values = np.asarray(self._group["ids/values"][:], dtype=np.uint8)
            offsets = np.asarray(self._group["ids/offsets"][:], dtype=np.int64)
            n = len(self)
            if offsets.shape != (n, 2) or (n and (offsets.min() < 0 or offsets.max() > values.size
                                                  or np.any(offsets[:, 1] < offsets[:, 0]))):
                raise FormatError(f"{self.location.url}: ID offsets are out of range")
            self._ids = (values, offsets)
        return self._ids

    @property
    def ids(self) -> list[str]:
        values, offsets = self._id_arrays()
        raw = values.tobytes()
        return [raw[a:b].decode("utf-8") for a, b in offsets.tolist()]

    def id_of(self, row: int) -> str:
        values, offsets = self._id_arrays()
        a, b = offsets[row]
        return values[a:b].tobytes().decode("utf-8")

    def rows(self, ids: Iterable[str] | str) -> np.ndarray:
        """Row numbers of `ids`; unknown IDs raise :class:`UnknownIdError` naming them."""
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids)
        if self._index is None:
            hashes = np.asarray(self._group["id_index/hash"][:], dtype=np.uint64)
            rows = np.asarray(self._group["id_index/row"][:], dtype=np.int64)
            if hashes.shape != (len(self),) or rows.shape != (len(self),) or (
                    len(self) and (rows.min() < 0 or rows.max() >= len(self))):
                raise FormatError(f"{self.location.url}: ID index is malformed")
            self._index = (hashes, rows)
        hashes, index_rows = self._index
        wanted = id_hashes(ids)
        pos = np.searchsorted(hashes, wanted)
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
            shown = ", ".join(repr(u) for u in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise UnknownIdError(f"{len(unknown)} unknown example ID{'s' if len(unknown) > 1 else ''}: "
                                 f"{shown}{more}")
        return out

    # ---- per-row values -------------------------------------------------------------------------------------

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for a store of {len(self)} examples")
        shards = rows // self.geometry.rows_per_shard
        absent = np.unique(shards[~self.committed[shards]])
        if absent.size:
            raise IncompleteStoreError(f"rows requested from shards that are not written yet: "
                                       f"{', '.join(map(str, absent[:5].tolist()))}")
        return rows

    def row_values(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        rows = self._check_rows(rows)
        return {name: values[rows] for name, values in self._row_values.items()}

    def get(self, ids: Iterable[str] | str) -> dict[str, np.ndarray]:
        """Per-sequence values for `ids`, in their order: `chosen_logps`, `rejected_logps` (float32),
        `chosen_tokens`, `rejected_tokens` (int32) and `row` (int64)."""
        rows = self.rows(ids)
        out = self.row_values(rows)
        out["row"] = rows
        return out

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
        """16-byte content keys, uint8 [len(rows), 16] (every row when `rows` is None; all must be committed)."""
        if self._content_keys is None:
            if fmt.CONTENT_KEY not in self.header["fields"]:
                raise FormatError(f"{self.location.url} has no content keys (written by an older logitstore)")
            keys = np.asarray(self._group[fmt.CONTENT_KEY][:], dtype=np.uint8)
            if keys.shape != (len(self), fmt.CONTENT_KEY_WIDTH):
                raise FormatError(f"{self.location.url}: {fmt.CONTENT_KEY} has shape {keys.shape}, expected "
                                  f"({len(self)}, {fmt.CONTENT_KEY_WIDTH})")
            self._content_keys = keys
        return self._content_keys[self._check_rows(np.arange(len(self)) if rows is None else rows)]

    # ---- ragged values --------------------------------------------------------------------------------------

    def offsets(self, field: str) -> np.ndarray:
        """The (N, 2) global offsets of a ragged field, checked against the shard layout."""
        spec = self._spec(field)
        off = self._offsets.get(spec.name)
        if off is None:
            off = np.asarray(self._group[fmt.offsets_array(spec.name)][:], dtype=np.int64)
            g = self.geometry
            if off.shape != (len(self), 2):
                raise FormatError(f"{spec.name}/offsets has shape {off.shape}, expected ({len(self)}, 2)")
            shard = np.arange(len(self)) // g.rows_per_shard
            ok = ~self.committed[shard]
            base = shard * g.shard_capacity
            lengths = off[:, 1] - off[:, 0]
            ok |= (off[:, 0] >= base) & (lengths >= 0) & (off[:, 1] <= base + g.shard_capacity) & (
                lengths <= g.max_length)
            if not ok.all():
                raise FormatError(f"{spec.name}/offsets: row {int(np.flatnonzero(~ok)[0])} points outside its shard")
            self._offsets[spec.name] = off
        return off

    def _spec(self, field: str) -> fmt.RaggedSpec:
        try:
            return self.fields[field]
        except KeyError:
            raise KeyError(f"the store has no field {field!r} (it has {', '.join(self.fields)})") from None

    def _shard_values(self, field: str, shard: int) -> ShardValues | None:
        key = (field, shard)
        if key not in self._shards:
            with self._lock:
                if key not in self._shards:
                    self._shards[key] = self._open_shard(field, shard)
        return self._shards[key]

    def _open_shard(self, field: str, shard: int) -> ShardValues | None:
        spec = self.fields[field]
        file_key = fmt.chunk_key(fmt.values_array(field), shard)
        path = self.location.local_file(file_key)
        if path is None:
            return None  # every inner chunk was the fill value
        if not self.location.is_local:
            self._check_fetched(field, shard, path)
        g = self.geometry
        return ShardValues(path, spec, g.shard_capacity, g.inner_chunk, self._cache, (field, shard))

    def commit_table(self) -> np.ndarray:
        """The `commits` array: per shard [1, clipped, size_0, crc_0, ...] (zeros for uncommitted shards)."""
        if self._commit_rows is None:
            self._commit_rows = np.asarray(self._group["commits"][:], dtype=np.uint64)
        return self._commit_rows

    def _check_fetched(self, field: str, shard: int, path: Any) -> None:
        """A file fetched from a remote store must match its commit record before it is used."""
        column = self.header["shard_files"].index(fmt.values_array(field))
        size, crc = (int(v) for v in self.commit_table()[shard, 2 + 2 * column: 4 + 2 * column])
        data = path.read_bytes()
        if len(data) != size or file_crc(data) != crc:
            self.location.drop_cached(fmt.chunk_key(fmt.values_array(field), shard))  # type: ignore[union-attr]
            raise FormatError(f"{field} shard {shard} fetched from {self.location.url} fails its checksum")

    def ragged(self, field: str, rows: Sequence[int] | np.ndarray, *, decode: bool = True) -> list[np.ndarray]:
        """One array per row of a ragged field. Per-token log-probs come back as float32 when `decode`."""
        rows = self._check_rows(rows)
        spec = self._spec(field)
        off = self.offsets(field)
        g = self.geometry
        out = []
        for row in rows.tolist():
            shard = row // g.rows_per_shard
            base = shard * g.shard_capacity
            start, stop = off[row, 0] - base, off[row, 1] - base
            values = self._shard_values(field, shard)
            out.append(values.read(start, stop) if values is not None else np.zeros(stop - start, spec.dtype))
        if decode and spec.name in fmt.PER_TOKEN_FIELDS:
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


def _reopen(url: str, storage_options: dict[str, Any] | None, cache_bytes: int) -> Store:
    return open(url, storage_options=storage_options, cache_bytes=cache_bytes)
