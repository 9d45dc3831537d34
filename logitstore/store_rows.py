"""Example IDs and per-row values of a store: the ID files, the ID index, lookups by ID, and the per-row arrays
(part of :class:`logitstore.reader.Store`)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds
from .errors import DamagedFileError, FormatError, IncompleteStoreError, RowOutOfRangeError, UnknownIdError, printable
from .shards import decode_chunk
from .storage import Location

_ID_CHECK_BLOCK = 1 << 20


class IdsAndRows:
    """Example IDs, row lookups and per-row values."""

    location: Location
    header: dict[str, Any]
    geometry: fmt.Geometry
    kind: kinds.Kind
    _plan: dict[str, np.ndarray] | None
    _parts: Any
    _lock: threading.RLock

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
        end = 0  # where the previous row's ID ends: the IDs lie back to back in row order, from 0 to id_bytes
        for start in range(0, n, _ID_CHECK_BLOCK):  # blockwise: no temporary proportional to N
            stop = min(start + _ID_CHECK_BLOCK, n)
            off = offsets[start:stop]
            if off.size and (off.min() < 0 or off.max() > total or np.any(off[:, 1] < off[:, 0])):
                raise FormatError(f"{self.location.url}: ID offsets are out of range")
            gaps = np.flatnonzero(off[:, 0] != np.concatenate([[end], off[:-1, 1]]))
            if gaps.size:
                raise FormatError(f"{self.location.url}: ID offsets: row {start + int(gaps[0])}'s ID does not start "
                                  "where the previous one ends (the IDs lie back to back in row order)")
            end = int(off[-1, 1])
            r = rows[start:stop]
            if r.size and (r.min() < 0 or r.max() >= n):
                raise FormatError(f"{self.location.url}: ID index is malformed")
            h = hashes[max(start - 1, 0):stop]
            if np.any(h[1:] < h[:-1]):
                raise FormatError(f"{self.location.url}: ID index is not sorted")
        if end != total:
            raise FormatError(f"{self.location.url}: ID offsets end at byte {end}, but id_bytes is {total}")

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

