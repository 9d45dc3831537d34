"""A store's ragged fields: token ids and per-token values, one sequence per row (part of
:class:`logitstore.reader.Store`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds
from .errors import FormatError, IncompleteStoreError
from .quantize import decode_fixed
from .shards import ChunkCache, ShardValues, decode_chunk
from .storage import Location


class RaggedFields:
    """Offsets and values of each ragged field, per shard on first touch."""

    location: Location
    geometry: fmt.Geometry
    fields: dict[str, fmt.RaggedSpec]
    kind: kinds.Kind
    _cache: ChunkCache
    _parts: Any
    _lock: threading.RLock

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
            mapped, f"{self.location.url}: {fmt.chunk_key(values_key, shard)}", spec, g.shard_capacity,
            g.inner_chunk, self._cache, (field, shard))
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
