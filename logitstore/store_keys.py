"""A store's content keys, and the scoring settings and provenance they go with (part of
:class:`logitstore.reader.Store`; docs/FORMAT.md, "Content key")."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import format as fmt
from .errors import FormatError, IncompleteStoreError
from .shards import decode_chunk
from .storage import Location


class ContentKeys:
    """Per-row content keys, read per shard on first touch."""

    location: Location
    header: dict[str, Any]
    geometry: fmt.Geometry
    _parts: Any
    _lock: threading.RLock

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
