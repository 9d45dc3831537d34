"""Checking a store: structure, completeness, every file's checksum, and the sanity of its values."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds
from .content_key import content_keys
from .errors import LogitstoreError, StoreNotFoundError, printable
from .write_lock import LOCK_KEY


@dataclasses.dataclass
class VerifyReport:
    """What `verify` found. `problems` is empty for a sound store."""

    path: str
    examples: int = 0
    shards: int = 0
    committed_shards: int = 0
    files_checked: int = 0
    digest: str | None = None
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


def verify(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
           digest: str | None = None) -> VerifyReport:
    """Verify the store at `path` and return a report (raises only when the path holds no store at all).

    With `digest`, a store whose digest differs is a problem (and nothing else is checked).
    """
    from .reader import open as open_store

    report = VerifyReport(str(path))
    try:
        store = open_store(path, storage_options=storage_options, digest=digest)
    except StoreNotFoundError:
        raise
    except LogitstoreError as exc:
        report.problems.append(str(exc))
        return report
    loc, g, header = store.location, store.geometry, store.header
    report.path, report.examples, report.shards = loc.url, len(store), g.num_shards
    try:
        report.digest = store.digest
        committed = store.committed
    except LogitstoreError as exc:  # a commit record that is a link, FIFO, ...
        report.problems.append(str(exc))
        return report
    report.committed_shards = int(committed.sum())
    if not committed.all():
        missing = np.flatnonzero(~committed).tolist()
        state = "damaged: the header says complete but" if header.get("complete") else "incomplete:"
        report.problems.append(f"{state} {len(missing)} of {g.num_shards} shards not written (first: {missing[0]})")
    elif not header.get("complete"):
        report.problems.append("incomplete: every shard is written but the store was never finalised")
    report.problems += _stray_entries(store)

    plan_ok = True
    for key, (size, sha) in header["plan_files"].items():
        report.files_checked += 1
        if _file_problem(loc, key, size, bytes.fromhex(sha)):
            report.problems.append(f"damaged file {key} (example IDs / ID index)")
            plan_ok = False
    if plan_ok:
        try:
            report.problems += _id_problems(store, store.ids)  # decodes and checks every ID
        except LogitstoreError as exc:
            report.problems.append(str(exc))
            plan_ok = False

    damaged_rows: list[int] = []
    for shard in np.flatnonzero(committed).tolist():
        row = store.commit_row(shard)
        for j, array in enumerate(store._meta.shard_files):
            key = fmt.chunk_key(array, shard)
            size, sha = fmt.commit_file(row, j)
            report.files_checked += 1
            if _file_problem(loc, key, size, sha):
                rows = g.shard_rows(shard)
                ids = [printable(store.id_of(r)) if plan_ok else f"row {r}" for r in rows]
                shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
                report.problems.append(f"damaged file {key}: shard {shard}, {len(ids)} examples ({shown})")
                damaged_rows.extend(rows)
    report.damaged_examples = [store.id_of(r) if plan_ok else f"row {r}" for r in sorted(set(damaged_rows))]
    if damaged_rows or not plan_ok:
        return report  # values of damaged shards would only repeat the same finding

    try:
        _check_values(store, report)
        if header.get("complete") and committed.all():
            report.problems += _summary_problems(store)
    except LogitstoreError as exc:
        report.problems.append(str(exc))
    return report


def _id_problems(store: Any, ids: list[str]) -> list[str]:
    """The IDs are unique and the ID index is what they imply: their hashes, sorted, and the stable argsort of the
    hashes in row order (docs/FORMAT.md, "ID hash"; a reader checks only that the index is sorted and in range)."""
    seen: dict[str, int] = {}
    for row, key in enumerate(ids):
        if seen.setdefault(key, row) != row:
            return [f"rows {seen[key]} and {row} have the same ID {printable(repr(key))}"]
    hashes = fmt.id_hashes(ids)
    order = np.argsort(hashes, kind="stable")
    plan = store._plan_arrays()
    if not np.array_equal(plan["id_index/hash"], hashes[order]):
        return ["id_index/hash is not the IDs' hashes in ascending order"]
    if not np.array_equal(plan["id_index/row"], order):
        return ["id_index/row is not the stable argsort of the IDs' hashes"]
    return []


def _summary_problems(store: Any) -> list[str]:
    """`summary` must be what the stored data and the commit rows say (docs/FORMAT.md, "Summary")."""
    table = store.commit_table()
    rows = np.arange(len(store))
    values = store.row_values(rows)
    documents = [len(raw) for key, raw in store._meta.documents.items() if key != "zarr.json"]
    actual = {
        "tokens": {name: int(np.diff(store.offsets(name)[rows], axis=1).sum()) for name in store.kind.token_fields},
        "scored_tokens": {side.tokens: int(values[side.tokens].astype(np.int64).sum()) for side in store.kind.sides},
        "clipped_values": int(table[:, 1].sum(dtype=np.uint64)),
        "data_bytes": fmt.data_bytes(documents, store.header["plan_files"], table),
    }
    stated = store.header["summary"]
    problems = []
    for key, value in actual.items():
        if stated[key] != value:
            source = "the commit rows" if key in ("clipped_values", "data_bytes") else "the stored data"
            problems.append(f"summary.{key} is {fmt.canonical_json(stated[key]).decode()}, but {source} give "
                            f"{fmt.canonical_json(value).decode()}")
    return problems


def _file_problem(loc: Any, key: str, size: int, sha: bytes) -> bool:
    """Whether `key` differs from its record (size 0: absent)."""
    try:
        if size == 0:
            return bool(loc.lexists(key))
        data = loc.map_file(key, size)
    except LogitstoreError:
        return True
    return data is None or hashlib.sha256(data).digest() != sha


def _stray_entries(store: Any) -> list[str]:
    """Links, special files and files the format does not name, anywhere in a local store."""
    loc = store.location
    if not loc.is_local:
        return []
    expected = set(store._meta.documents) | set(store.header["plan_files"]) | {LOCK_KEY}  # a writer's lock file
    expected |= {f"commits/c/{k}/0" for k in range(store.geometry.num_shards)}
    expected |= {fmt.chunk_key(a, k) for a in store._meta.shard_files for k in range(store.geometry.num_shards)}
    problems = []
    for folder, dirs, files in os.walk(loc.root, followlinks=False):
        for name in sorted(dirs + files):
            full = os.path.join(folder, name)
            key = os.path.relpath(full, loc.root).replace(os.sep, "/")
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"symbolic link in the store: {printable(key)}")
            elif stat.S_ISDIR(mode):
                continue
            elif not stat.S_ISREG(mode):
                problems.append(f"not a regular file: {printable(key)}")
            elif key not in expected and not name.endswith(".partial"):
                problems.append(f"file the format does not name: {printable(key)}")
    return problems[:20]


def _check_values(store: Any, report: VerifyReport) -> None:
    g = store.geometry
    good = np.repeat(store.committed, g.rows_per_shard)[:len(store)]
    rows = np.flatnonzero(good)
    if rows.size == 0:
        return
    values = store.row_values(rows)
    _check_content_keys(store, rows, report)
    if store.teacher is not None:
        _check_teacher(store, report)
    if store.kind.name == "unpaired":
        _check_kl_pairing(store, rows, report)
    for s in store.kind.sides:
        side = s.logps.rsplit("_", 1)[0]
        logps, tokens = values[s.logps], values[s.tokens].astype(np.int64)
        bad = ~np.isfinite(logps) | (logps > 1e-3)
        if bad.any():
            report.problems.append(f"{side}_logps: {int(bad.sum())} values are not finite log-probs "
                                   f"(first: {store.id_of(int(rows[np.flatnonzero(bad)[0]]))})")
        try:
            comp = store.offsets(s.ids)[rows]
            prompt = store.offsets("prompt_ids")[rows]
        except LogitstoreError as exc:
            report.problems.append(str(exc))
            continue
        comp_len = comp[:, 1] - comp[:, 0]
        expected = comp_len - ((prompt[:, 1] - prompt[:, 0]) == 0)
        mismatch = tokens != np.maximum(expected, 0)
        if mismatch.any():
            report.problems.append(f"{s.tokens} disagree with the stored completion lengths for "
                                   f"{int(mismatch.sum())} examples "
                                   f"(first: {store.id_of(int(rows[np.flatnonzero(mismatch)[0]]))})")
        field = s.per_token
        if field in store.fields:
            spec = store.fields[field]
            per_token = store.offsets(field)[rows]
            if np.any((per_token[:, 1] - per_token[:, 0]) != tokens):
                report.problems.append(f"{field}: lengths disagree with {s.tokens}")
                continue
            seqs = store.ragged(field, rows)
            sums = np.array([float(np.sum(s, dtype=np.float64)) for s in seqs])
            magnitude = np.array([float(np.abs(s).sum(dtype=np.float64)) for s in seqs])
            off = np.abs(sums - logps) > _sum_tolerance(spec, magnitude)
            if off.any():
                report.problems.append(f"{field}: {int(off.sum())} sums disagree with {s.logps} "
                                       f"(first: {store.id_of(int(rows[np.flatnonzero(off)[0]]))})")


def _check_content_keys(store: Any, rows: np.ndarray, report: VerifyReport) -> None:
    """A content key must be the hash of its row's stored token ids: reuse trusts it to find equal pairs."""
    try:
        stored = store.content_keys(rows)
        ids = [store.ragged(field, rows) for field in store.kind.token_fields]
    except LogitstoreError as exc:
        report.problems.append(str(exc))
        return
    bad = np.any(stored != content_keys(*kinds.key_parts(store.kind, ids), store.scoring), axis=1)
    if bad.any():
        report.problems.append(f"{fmt.CONTENT_KEY} disagrees with the stored token ids for {int(bad.sum())} "
                               f"examples (first: {store.id_of(int(rows[np.flatnonzero(bad)[0]]))})")


def _check_kl_pairing(store: Any, rows: np.ndarray, report: VerifyReport) -> None:
    """Row i's KL completion must be the whole completion of the row the header's pairing names, cut only where
    prompt_ids[i] plus it would pass max_length (docs/FORMAT.md, KL pairing), when both rows are readable. The
    source's own stored completion is cut to fit its own prompt, so the two agree as far as both reach, and the
    shorter of them must end exactly at max_length after its prompt."""
    from .kinds import kl_rows

    source = np.asarray(kl_rows(len(store), store.kl_batch_size), dtype=np.int64)
    readable = np.zeros(len(store), dtype=bool)
    readable[rows] = True
    pick = rows[readable[source[rows]]]
    try:
        kl = store.ragged("kl_completion_ids", pick)
        theirs = store.ragged("completion_ids", source[pick])
        offsets = store.offsets("prompt_ids")
    except LogitstoreError as exc:
        report.problems.append(str(exc))
        return
    prompt = offsets[:, 1] - offsets[:, 0]
    room = store.geometry.max_length - prompt
    other, short = [], []
    for r, a, b in zip(pick.tolist(), kl, theirs):
        n = min(len(a), len(b))
        if not np.array_equal(a[:n], b[:n]) or (len(b) < len(a) and len(b) != room[source[r]]):
            other.append(r)  # not that completion, or more of it than the source holds
        elif len(a) < len(b) and len(a) != room[r]:
            short.append(r)
    if other:
        report.problems.append(f"kl_completion_ids: {len(other)} examples do not hold the completion the KL pairing "
                               f"(batch size {store.kl_batch_size}) names (first: {printable(store.id_of(other[0]))})")
    if short:
        report.problems.append(f"kl_completion_ids: {len(short)} examples hold the completion the KL pairing names "
                               f"cut where max_length {store.geometry.max_length} does not require it "
                               f"(first: {printable(store.id_of(short[0]))})")


def _check_teacher(store: Any, report: VerifyReport) -> None:
    """Every block of every committed shard's teacher files decodes as the header and the row counts say."""
    from .teacher_store import side_names, side_part

    for shard in np.flatnonzero(store.committed).tolist():
        for side, s in zip(side_names(store.kind), store.kind.sides):
            try:
                _, part = side_part(store, side, shard, s.tokens)
                for block in range(part.starts.size - 1):
                    part.block(block)
            except LogitstoreError as exc:
                report.problems.append(str(exc))
                continue
            if store.teacher["kind"] == "top_k" and s.per_token in store.fields:
                _check_teacher_values(store, side, s, np.asarray(store.geometry.shard_rows(shard)), report)


def _check_teacher_values(store: Any, side: str, s: Any, rows: np.ndarray, report: VerifyReport) -> None:
    """Where the token that was there is among a position's K, the record's value is the per-token value, within
    both codecs' bounds (log-probs in nats; sqrt(p) for the sqrt presets): records and values are one model's."""
    from .topk_codec import PRESETS

    preset = PRESETS[store.teacher["codec"]]
    spec = store.fields[s.per_token]
    sqrt = preset.domain == "sqrt"
    # fixed point: each single value is within |scale| (error feedback bounds prefix sums, docs/FORMAT.md)
    tol = preset.step / 2 + 1e-3 + (abs(spec.scale or 0) if spec.codec == "fixed" else 0.0)
    records = store.top_k(side, rows)
    values = store.ragged(s.per_token, rows)
    tokens = store.ragged(s.ids, rows)
    bad, first = 0, None
    for i, row in enumerate(rows.tolist()):
        t = len(values[i])
        at = records["ids"][i] == np.asarray(tokens[i][len(tokens[i]) - t:], np.int64)[:, None]
        hit = at.any(axis=1)
        got = records["logps"][i][at].astype(np.float64)
        want = np.asarray(values[i], np.float64)[hit]
        if spec.codec == "float16":
            tol_row = tol + 2.0 ** -11 * np.abs(want)
        else:
            tol_row = tol
        diff = np.abs(np.exp(got / 2) - np.exp(want / 2)) if sqrt else np.abs(got - want)
        off = int(np.count_nonzero(diff > tol_row))
        if off and first is None:
            first = row
        bad += off
    if bad:
        report.problems.append(f"teacher/{side}: {bad} records disagree with {s.per_token} at the token that was "
                               f"there (first: {store.id_of(int(first))})")
