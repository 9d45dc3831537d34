"""A store's commit records, its digest, and its per-shard files, each checked against its record on first touch
(part of :class:`logitstore.reader.Store`)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds, teacher_store
from .commits import read_commit_row, store_digest
from .errors import DamagedFileError, DigestMismatchError, FormatError, IncompleteStoreError, LogitstoreError, printable
from .header import StoreMeta
from .shards import blosc_bound, zstd_bound
from .storage import Location


class ShardFiles:
    """Commit records, the digest, and checked shard files."""

    location: Location
    header: dict[str, Any]
    geometry: fmt.Geometry
    fields: dict[str, fmt.RaggedSpec]
    kind: kinds.Kind
    _meta: StoreMeta
    _open_args: tuple[Any, ...]
    _columns: dict[str, int]
    _width: int
    _commit_rows: dict[int, np.ndarray | None]
    _pinned: np.ndarray | None

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
