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

import os
import threading
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds
from .commits import DIGEST_PREFIX, read_commit_row, store_digest  # noqa: F401 - part of this module's interface
from .errors import FormatError, StoreLockedError, StoreNotFoundError
from .header import StoreMeta, read_meta
from .shards import ChunkCache
from .storage import Location, location, require_store
from .store_files import ShardFiles
from .store_keys import ContentKeys
from .store_ragged import RaggedFields
from .store_rows import IdsAndRows
from .store_teacher import TeacherRecords

# Chunk cache + decoded parts + one chunk being decoded stay under 256 MiB whatever a store declares.
DEFAULT_CACHE_BYTES = 128 << 20
PART_BYTES = 96 << 20  # decoded per-shard offsets and per-row values kept at once


def open(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
         cache_bytes: int = DEFAULT_CACHE_BYTES, digest: str | None = None) -> Store:
    """Open the store at `path` (a folder or an fsspec URL) for reading. Opening never runs code from the store.

    With `digest` (the SHA-256 that `Store.digest` and `logitstore info` print), the store must be exactly that
    store: its metadata and commit table are pinned, and every file read is checked against them.
    """
    loc = location(path, storage_options)
    try:
        require_store(loc)
        meta = read_meta(loc)
    except (StoreNotFoundError, FormatError):
        holder = loc.write_lock_holder()
        if holder is not None:  # not a store yet, nor a broken one: a build is planning it
            raise StoreLockedError(f"{loc.url} is being written by a build ({holder.describe()}) that has not "
                                   "finished planning it; open it again in a moment, or once the build is "
                                   "done") from None
        raise
    store = Store(loc, meta, cache_bytes=cache_bytes, storage_options=storage_options)
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


class Store(ShardFiles, IdsAndRows, RaggedFields, ContentKeys, TeacherRecords):
    """A read-only view of a logitstore store.

    Its parts, by concern: commit records, the digest and checked shard files (logitstore/store_files.py); IDs and
    per-row values (store_rows.py); ragged fields (store_ragged.py); content keys (store_keys.py); teacher records
    (store_teacher.py)."""

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

    def example(self, key: str | int) -> dict[str, Any]:
        """Everything stored for one example, by ID or row number."""
        row = int(self.rows([key])[0]) if isinstance(key, str) else int(key)
        out: dict[str, Any] = {"id": self.id_of(row), "row": row}
        out.update({name: value[0].item() for name, value in self.row_values([row]).items()})
        for field in self.fields:
            out[field] = self.ragged(field, [row])[0]
        return out


def _reopen(url: str, storage_options: dict[str, Any] | None, cache_bytes: int, digest: str | None) -> Store:
    return open(url, storage_options=storage_options, cache_bytes=cache_bytes, digest=digest)
