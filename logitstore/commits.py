"""The commit table and the store digest: one record per shard that says it is complete, and the SHA-256 that names
a store's exact contents (docs/FORMAT.md, "Completeness record" and "Store digest")."""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import DamagedFileError
from .storage import Location

DIGEST_PREFIX = b"logitstore digest 2\n"


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

