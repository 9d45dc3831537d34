"""Checking a store: structure, completeness, every file's checksum, and the sanity of its values."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from . import format as fmt
from .content_key import content_keys
from .errors import FormatError, LogitstoreError
from .storage import file_crc


@dataclasses.dataclass
class VerifyReport:
    """What `verify` found. `problems` is empty for a sound store."""

    path: str
    examples: int = 0
    shards: int = 0
    committed_shards: int = 0
    files_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    damaged_examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), ok=self.ok)


def _sum_tolerance(spec: fmt.RaggedSpec, magnitude: np.ndarray) -> np.ndarray:
    """How far the sum of stored per-token values may be from the stored float32 sum."""
    eps32 = 1e-6 * magnitude + 1e-4
    if spec.codec == "fixed":
        return abs(spec.scale or 0) / 2 + eps32
    if spec.codec == "float16":
        return 2.0**-11 * magnitude + eps32  # float16 keeps 11 significant bits
    return eps32


def verify(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Verify the store at `path` and return a report (raises only when the path holds no store at all)."""
    from .reader import open as open_store

    report = VerifyReport(str(path))
    try:
        store = open_store(path, storage_options=storage_options)
    except FormatError as exc:
        report.problems.append(str(exc))
        return report
    loc, g, header = store.location, store.geometry, store.header
    report.path, report.examples, report.shards = loc.url, len(store), g.num_shards
    report.committed_shards = int(store.committed.sum())
    if store.missing_shards:
        missing = store.missing_shards
        report.problems.append(f"incomplete: {len(missing)} of {g.num_shards} shards not written "
                               f"(first: {missing[0]})")
    elif not header.get("complete"):
        report.problems.append("incomplete: every shard is written but the store was never finalised")

    for key, (size, crc) in header.get("plan_files", {}).items():
        data = loc.read_bytes(key)
        report.files_checked += 1
        if (data is None and size) or (data is not None and (len(data) != size or file_crc(data) != crc)):
            report.problems.append(f"damaged file {key} (example IDs / ID index)")

    commits = store.commit_table()
    damaged_rows: list[int] = []
    for shard in np.flatnonzero(store.committed).tolist():
        for j, array in enumerate(header["shard_files"]):
            key = fmt.chunk_key(array, shard)
            size, crc = int(commits[shard, 2 + 2 * j]), int(commits[shard, 3 + 2 * j])
            data = loc.read_bytes(key)
            report.files_checked += 1
            bad = (data is None) if size else (data is not None)
            bad = bad or (data is not None and (len(data) != size or file_crc(data) != crc))
            if bad:
                rows = g.shard_rows(shard)
                ids = [store.id_of(r) for r in rows]
                shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
                report.problems.append(f"damaged file {key}: shard {shard}, {len(ids)} examples ({shown})")
                damaged_rows.extend(rows)
    report.damaged_examples = [store.id_of(r) for r in sorted(set(damaged_rows))]
    if damaged_rows:
        return report  # values of damaged shards would only repeat the same finding

    _check_values(store, report)
    return report


def _check_values(store: Any, report: VerifyReport) -> None:
    g = store.geometry
    good = np.repeat(store.committed, g.rows_per_shard)[:len(store)]
    rows = np.flatnonzero(good)
    if rows.size == 0:
        return
    values = store.row_values(rows)
    _check_content_keys(store, rows, report)
    for side in ("chosen", "rejected"):
        logps, tokens = values[f"{side}_logps"], values[f"{side}_tokens"].astype(np.int64)
        bad = ~np.isfinite(logps) | (logps > 1e-3)
        if bad.any():
            report.problems.append(f"{side}_logps: {int(bad.sum())} values are not finite log-probs "
                                   f"(first: {store.id_of(int(rows[np.flatnonzero(bad)[0]]))})")
        try:
            comp = store.offsets(f"{side}_ids")[rows]
            prompt = store.offsets("prompt_ids")[rows]
        except LogitstoreError as exc:
            report.problems.append(str(exc))
            continue
        comp_len = comp[:, 1] - comp[:, 0]
        expected = comp_len - ((prompt[:, 1] - prompt[:, 0]) == 0)
        mismatch = tokens != np.maximum(expected, 0)
        if mismatch.any():
            report.problems.append(f"{side}_tokens disagree with the stored completion lengths for "
                                   f"{int(mismatch.sum())} examples "
                                   f"(first: {store.id_of(int(rows[np.flatnonzero(mismatch)[0]]))})")
        field = f"{side}_token_logps"
        if field in store.fields:
            spec = store.fields[field]
            per_token = store.offsets(field)[rows]
            if np.any((per_token[:, 1] - per_token[:, 0]) != tokens):
                report.problems.append(f"{field}: lengths disagree with {side}_tokens")
                continue
            seqs = store.ragged(field, rows)
            sums = np.array([float(np.sum(s, dtype=np.float64)) for s in seqs])
            magnitude = np.array([float(np.abs(s).sum(dtype=np.float64)) for s in seqs])
            off = np.abs(sums - logps) > _sum_tolerance(spec, magnitude)
            if off.any():
                report.problems.append(f"{field}: {int(off.sum())} sums disagree with {side}_logps "
                                       f"(first: {store.id_of(int(rows[np.flatnonzero(off)[0]]))})")


def _check_content_keys(store: Any, rows: np.ndarray, report: VerifyReport) -> None:
    """A content key must be the hash of its row's stored token ids: reuse trusts it to find equal pairs."""
    try:
        stored = store.content_keys(rows)
        ids = [store.ragged(field, rows) for field in fmt.TOKEN_FIELDS]
    except LogitstoreError as exc:
        report.problems.append(str(exc))
        return
    bad = np.any(stored != content_keys(*ids, store.scoring), axis=1)
    if bad.any():
        report.problems.append(f"{fmt.CONTENT_KEY} disagrees with the stored token ids for {int(bad.sum())} "
                               f"examples (first: {store.id_of(int(rows[np.flatnonzero(bad)[0]]))})")
