"""Writing a store: plan it once, fill shards (from any number of processes), finalise it.

The writer never shares a file between two shards, writes each shard's files whole, and records a shard as
complete (its `commits` row) only after all of its files are written. A store is therefore always in one of three
states per shard: absent, complete and checksummed, or being rewritten by the process that owns it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds
from .commits import read_commit_row, store_digest
from .content_key import VERSION as CONTENT_KEY_VERSION
from .content_key import content_keys
from .errors import (
    FingerprintMismatchError,
    FormatError,
    IncompleteStoreError,
    LogitstoreError,
    StoreWriteError,
    printable,
)
from .faults import fault_point
from .format import id_hashes
from .header import parse_root, read_meta
from .quantize import encode_fixed
from .storage import Location, WriteLock, file_sha256, location
from .teacher_store import check_entry, concat, encode_file, teacher_arrays
from .write_lock import LOCK_KEY


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a fingerprint (docs/FORMAT.md)."""
    return hashlib.sha256(fmt.canonical_json(dict(fingerprint))).hexdigest()


def _created_time() -> str:
    # SOURCE_DATE_EPOCH makes a rebuilt store byte-for-byte reproducible (reproducible-builds.org convention).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and not (epoch.isascii() and epoch.isdigit() and int(epoch) < 253402300800):  # before year 10000
        raise LogitstoreError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970-01-01 UTC (an integer from 0), "
                              f"got {epoch!r}")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
            else datetime.datetime.now(datetime.timezone.utc))
    return when.replace(microsecond=0).isoformat()


def read_header(loc: Location) -> dict[str, Any] | None:
    """The store header, or None when the location holds no group metadata."""
    raw = loc.read_file("zarr.json", limit=fmt.MAX_HEADER_BYTES)
    if raw is None:
        return None
    return parse_root(raw, loc.url)


def write_root(loc: Location, header: Mapping[str, Any]) -> None:
    """Write the root zarr.json holding `header`, atomically and durably (docs/FORMAT.md, "Durability")."""
    loc.write_file("zarr.json", fmt.canonical_json(fmt.root_metadata(dict(header))))


_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


@contextlib.contextmanager
def writing(url: str, shard: int | None = None, stop: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn the file system's refusal of a write into one line (StoreWriteError) that names the path and says that
    the same command resumes: disk full, no permission, a read-only file system, an I/O error. `stop` is called
    first (a writer lets go of its lock: its run is over, and the next one resumes)."""
    try:
        yield
    except LogitstoreError:
        raise
    except OSError as exc:
        if stop is not None:
            stop()
        raise StoreWriteError(_write_failure(exc, url, shard)) from None


def _write_failure(exc: OSError, url: str, shard: int | None) -> str:
    path = url if shard is None else f"{url} (shard {shard})"  # when the error names no file
    if isinstance(exc.filename, (str, bytes, os.PathLike)):
        name = _PARTIAL.sub("", os.fsdecode(exc.filename))  # a temporary file stands for the file it becomes
        if "://" in url and "://" not in name:
            path = f"{url.split('://', 1)[0]}://{name}"
        else:
            path = name if os.path.isabs(name) or "://" in name else f"{url}/{name}"
    resume = "run the same command again: it resumes where it stopped, keeping every committed shard"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device writing {printable(path)}; free some space and {resume}"
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {printable(path)}; make it writable (or write to another path) and {resume}"
    if exc.errno == errno.EROFS:
        return (f"cannot write {printable(path)}: the file system is read-only; make it writable (or write to another "
                f"path) and {resume}")
    return f"cannot write {printable(path)}: {exc.strerror or exc}; fix that and {resume}"


class StoreWriter:
    """Fills the shards of a planned store. Create one with :func:`create` (or :meth:`attach`).

    A writer made by :func:`create` holds the store's write lock (docs/FORMAT.md, "Write lock") until it finalises
    the store or is closed (:meth:`close`, the end of a ``with`` block, or its process ending). Writers joined to its
    run with :meth:`attach` take no lock.
    """

    def __init__(self, loc: Location, header: dict[str, Any], lock: WriteLock | None = None):
        import zarr

        self.loc = loc
        self.header = header
        self.geometry = fmt.Geometry(header["num_examples"], header["rows_per_shard"], header["max_length"],
                                     header["inner_chunk"])
        self.kind = kinds.kind_of(header)
        self.ragged = fmt.ragged_from_header(header)
        if not isinstance(header.get("content_key"), dict):
            raise FormatError(f"{loc.url} has no content keys (written by an older logitstore); rebuild it")
        self.scoring = header["content_key"]["scoring"]
        self._group = zarr.open_group(loc.zarr_store(read_only=False), mode="r+")
        self._write_lock = lock
        self._closed = False
        self._read_only = False  # a complete store in a folder this process cannot write: nothing to write
        self._digest: str | None = None

    # ---- opening and closing --------------------------------------------------------------------------------------

    @classmethod
    def attach(cls, path: str | os.PathLike[str] | Location, fingerprint: Mapping[str, Any] | None = None,
               storage_options: dict[str, Any] | None = None) -> StoreWriter:
        """Join the run of the writer that planned the store, to fill some of its shards (e.g. on ranks other than
        the one that called :func:`create`, after it has: a barrier). It takes no lock: the run's lock is the
        planning writer's, held until it finalises, so only processes of that run may attach."""
        loc = path if hasattr(path, "zarr_store") else location(path, storage_options)  # type: ignore[arg-type]
        header = read_header(loc)
        if header is None:
            raise IncompleteStoreError(f"{loc.url} has not been planned yet")
        if fingerprint is not None:
            _check_fingerprint(loc.url, header, fingerprint)
        return cls(loc, header)

    def close(self) -> None:
        """Let go of the store's write lock without finalising (what is committed is kept; the next run resumes).
        Nothing more may be written with this writer."""
        self._closed = True
        if self._write_lock is not None:
            self._write_lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        if self._closed:
            raise LogitstoreError(f"this writer of {self.loc.url} is closed (finalised, or closed, so it holds no "
                                  "lock): open a new one with logitstore.create")
        if self._write_lock is not None:
            self._write_lock.check()

    # ---- state --------------------------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Finalised, and every shard's commit record still intact."""
        return bool(self.header.get("complete")) and bool(self.committed.all())

    @property
    def committed(self) -> np.ndarray:
        """Boolean mask over shards: True where the shard's commit record is present and intact."""
        width = fmt.commit_width(len(self.header["shard_files"]))
        return np.array([read_commit_row(self.loc, k, width) is not None for k in range(self.geometry.num_shards)],
                        dtype=bool)

    @property
    def missing_shards(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.committed)]

    def shard_rows(self, shard: int) -> range:
        return self.geometry.shard_rows(shard)

    # ---- filling ------------------------------------------------------------------------------------------------

    def write_shard(self, shard: int, rows: Mapping[str, Any],
                    teacher_mass: Mapping[str, np.ndarray] | None = None) -> None:
        """Write every file of `shard`, then its commit record.

        `rows` maps each per-row field to an array with one value per row of the shard, and each ragged field to a
        sequence of 1-D arrays (one per row). Per-token log-probs are given as floats whatever the codec. A store
        with teacher records takes each side's records too (``teacher/SIDE``: one record per row), and
        `teacher_mass` may give, per teacher array, the [V] tail mass summed over the shard's positions
        (``teacher.tail_mass``), from which a top-k context's prior is made.
        """
        self._check_writable()
        g = self.geometry
        if not 0 <= shard < g.num_shards:
            raise ValueError(f"shard {shard} is out of range (the store has {g.num_shards})")
        expected = set(self.kind.row_fields) | {s.name for s in self.ragged} | set(teacher_arrays(self.header))
        if set(rows) != expected:
            raise ValueError(f"shard data must have exactly the fields {sorted(expected)}, got {sorted(rows)}")
        with writing(self.loc.url, shard, stop=self.close):
            clipped = self._write_files(shard, rows, teacher_mass)
            fault_point(f"before-commit:{shard}")
            self._commit(shard, clipped)
        fault_point(f"after-commit:{shard}")

    def _write_files(self, shard: int, rows: Mapping[str, Any],
                     teacher_mass: Mapping[str, np.ndarray] | None) -> int:
        """Every file of the shard; returns how many fixed-point values were clipped."""
        span = self.geometry.shard_rows(shard)
        n = len(span)
        for name, (dtype, _) in self.kind.row_fields.items():
            if name == "label" and not np.isin(np.asarray(rows[name]), (0, 1)).all():
                raise ValueError(f"label: expected 0 or 1 (false or true) for every row of shard {shard}")
            values = np.asarray(rows[name], dtype=dtype)
            if values.shape != (n,):
                raise ValueError(f"{name}: expected {n} values for shard {shard}, got shape {values.shape}")
            self._group[name][span.start:span.stop] = values
        self._group[fmt.CONTENT_KEY][span.start:span.stop] = content_keys(
            *kinds.key_parts(self.kind, [rows[f] for f in self.kind.token_fields]), self.scoring)
        clipped = 0
        for spec in self.ragged:
            clipped += self._write_ragged(shard, span, spec, rows[spec.name])
            fault_point(f"mid-shard:{shard}")  # some of the shard's files written, not all
        for array in teacher_arrays(self.header):
            self._write_teacher(shard, span, array, rows[array], rows, (teacher_mass or {}).get(array))
        return clipped

    def _commit(self, shard: int, clipped: int) -> None:
        """The shard's commit row, once its files are durable; it counts once it is durable itself."""
        record = [1, clipped]
        keys = [fmt.chunk_key(array, shard) for array in self.header["shard_files"]]
        for key in keys:
            record += fmt.commit_entry(self.loc.read_bytes(key))
        self.loc.sync(keys)  # the shard's bytes are on disk before a commit row names them
        self._check_writable()  # a lost lease commits nothing
        self._group["commits"][shard] = np.asarray(record, dtype=np.uint64)
        self.loc.sync([f"commits/c/{shard}/0"])

    def _write_teacher(self, shard: int, span: range, array: str, records: Sequence[Any],
                       rows: Mapping[str, Any], mass: np.ndarray | None) -> None:
        """One side's teacher file: a record per row, as many positions as the row's scored-token count."""
        side = self.kind.sides[teacher_arrays(self.header).index(array)]
        if len(records) != len(span):
            raise ValueError(f"{array}: expected {len(span)} records for shard {shard}, got {len(records)}")
        counts = np.asarray(rows[side.tokens], dtype=np.int64)
        got = np.array([r.ids.shape[0] for r in records], dtype=np.int64)
        if not np.array_equal(got, counts):
            bad = int(np.flatnonzero(got != counts)[0])
            raise ValueError(f"{array}: row {span.start + bad} has {got[bad]} records for {counts[bad]} scored tokens")
        teacher = self.header["teacher"]
        self.loc.write_file(fmt.chunk_key(array, shard), encode_file(concat(records, teacher), teacher, mass),
                            durable=False)  # made durable with the shard's other files, before its commit

    def _write_ragged(self, shard: int, span: range, spec: fmt.RaggedSpec, seqs: Sequence[np.ndarray]) -> int:
        g = self.geometry
        if len(seqs) != len(span):
            raise ValueError(f"{spec.name}: expected {len(span)} sequences for shard {shard}, got {len(seqs)}")
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        if lengths.size and int(lengths.max()) > g.max_length:
            raise ValueError(f"{spec.name}: a sequence of {int(lengths.max())} values exceeds max_length "
                             f"{g.max_length}")
        clipped = 0
        if spec.codec == "fixed":
            assert spec.scale is not None
            flat, clipped = _fixed_codes(seqs, lengths, spec.scale)
        else:
            flat = np.concatenate(seqs) if len(seqs) else np.zeros(0)
        if spec.codec != "fixed" and np.issubdtype(np.dtype(spec.dtype), np.integer):
            info = np.iinfo(spec.dtype)
            if flat.size and (flat.min() < 0 or flat.max() > info.max):
                raise ValueError(f"{spec.name}: values outside the range of {spec.dtype}")
        base = shard * g.shard_capacity
        buffer = np.zeros(g.shard_capacity, dtype=spec.dtype)  # whole shard: no read-modify-write of old files
        buffer[:flat.size] = flat
        ends = base + np.cumsum(lengths)
        offsets = np.stack([ends - lengths, ends], axis=1).astype(np.int64)
        self._group[fmt.offsets_array(spec.name)][span.start:span.stop] = offsets
        self._group[fmt.values_array(spec.name)][base:base + g.shard_capacity] = buffer
        return clipped

    # ---- finishing ----------------------------------------------------------------------------------------------

    def finalize(self) -> dict[str, Any]:
        """Mark the store complete once every shard is committed, and let go of the write lock. Returns the summary
        written to the header; :attr:`digest` then names the store this writer finalised."""
        fault_point("before-finalize")
        if self._digest is not None:  # finalised already
            return self.header["summary"]
        self._check_writable()
        missing = self.missing_shards
        if missing:
            raise IncompleteStoreError(f"{len(missing)} of {self.geometry.num_shards} shards are not written yet "
                                       f"(first: {missing[0]})")
        if not self.header.get("complete"):
            header = dict(self.header, complete=True, summary=self._summary())
            with writing(self.loc.url, stop=self.close):
                write_root(self.loc, header)
            self.header = header
        self._digest = self._read_digest()
        self.close()
        return self.header["summary"]

    def _summary(self) -> dict[str, Any]:
        tokens = {}
        for spec in self.ragged:
            if spec.name in self.kind.token_fields:
                off = self._group[fmt.offsets_array(spec.name)][:]
                tokens[spec.name] = int((off[:, 1] - off[:, 0]).sum())
        scored = {name: int(np.asarray(self._group[name][:], dtype=np.int64).sum())
                  for name in (side.tokens for side in self.kind.sides)}
        commits = np.asarray(self._group["commits"][:], dtype=np.uint64)
        documents = [len(fmt.canonical_json(doc)) for doc in fmt.metadata_documents(self.header).values()]
        return {"tokens": tokens, "scored_tokens": scored, "clipped_values": int(commits[:, 1].sum()),
                "data_bytes": fmt.data_bytes(documents, self.header["plan_files"], commits)}

    @property
    def digest(self) -> str:
        """The store digest (as :attr:`logitstore.Store.digest`) of the store this writer finalised: its metadata
        documents and commit table as they were when it finalised, under its lock. Known after :meth:`finalize`,
        or while the lock is held on a store found complete; a writer joined with :meth:`attach` has none."""
        if self._digest is None:
            if self._closed or (self._write_lock is None and not self._read_only):
                raise LogitstoreError(f"the digest of {self.loc.url} is known only to the writer that finalised it")
            if not self.complete:
                raise IncompleteStoreError(f"{self.loc.url} is not finalised yet")
            self._digest = self._read_digest()
        return self._digest

    def _read_digest(self) -> str:
        documents = read_meta(self.loc).documents
        width = fmt.commit_width(len(self.header["shard_files"]))
        table = np.zeros((self.geometry.num_shards, width), dtype=np.uint64)
        for shard in range(self.geometry.num_shards):
            row = read_commit_row(self.loc, shard, width)
            if row is not None:
                table[shard] = row
        return store_digest(documents, table)


def _fixed_codes(seqs: Sequence[np.ndarray], lengths: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """Fixed-point codes of a shard's sequences. uint16 sequences are codes already (copied from a store with the
    same codec and scale) and pass through unchanged, so copied values stay bit for bit; the others are encoded."""
    is_code = np.fromiter((np.asarray(s).dtype == np.uint16 for s in seqs), dtype=bool, count=len(seqs))
    if not is_code.any():
        return encode_fixed(np.concatenate(seqs) if len(seqs) else np.zeros(0), lengths, scale)
    encode = np.flatnonzero(~is_code)
    parts: list[np.ndarray] = [np.asarray(s) if c else np.zeros(0, np.uint16) for s, c in zip(seqs, is_code)]
    clipped = 0
    if encode.size:
        codes, clipped = encode_fixed(np.concatenate([seqs[i] for i in encode]), lengths[encode], scale)
        for i, piece in zip(encode.tolist(), np.split(codes, np.cumsum(lengths[encode])[:-1])):
            parts[i] = piece
    return np.concatenate(parts), clipped


def _check_fingerprint(url: str, header: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    theirs = header.get("fingerprint_digest")
    ours = fingerprint_digest(fingerprint)
    if theirs != ours:
        diff = sorted(k for k in set(fingerprint) | set(header.get("fingerprint", {}))
                      if fingerprint.get(k) != header.get("fingerprint", {}).get(k))
        raise FingerprintMismatchError(
            f"{url} was built for a different {', '.join(diff) or 'configuration'} "
            f"(store fingerprint {str(theirs)[:12]}, this run {ours[:12]}); use another output path")


_KNOWN_TOP = {name for kind in kinds.KINDS.values()
              for name in (*kind.row_fields, *kind.token_fields, *kind.per_token_fields)} | {
    "ids", "id_index", "commits", "zarr.json", fmt.CONTENT_KEY, "teacher", LOCK_KEY}


def create(path: str | os.PathLike[str], ids: Sequence[str], *, fingerprint: Mapping[str, Any],
           vocab_size: int, max_length: int, per_token: bool = False, token_codec: str = "zstd",
           logp_codec: str = "fixed", fixed_scale: float = fmt.DEFAULT_FIXED_SCALE,
           rows_per_shard: int = fmt.ROWS_PER_SHARD, inner_chunk: int = fmt.INNER_CHUNK,
           tokenizer: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None,
           skipped: Sequence[Mapping[str, Any]] = (), storage_options: dict[str, Any] | None = None,
           scoring: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
           kind: str = "pairs", kl_batch_size: int | None = None,
           teacher: Mapping[str, Any] | None = None) -> StoreWriter:
    """Plan a store for `ids` (or resume the one already there with the same fingerprint) and return its writer.

    Planning writes the array metadata, the IDs and the ID index, then the group header last: a store whose
    header exists is planned. Re-running with the same fingerprint resumes; another fingerprint is refused.
    `scoring` names how the values are computed from the token ids, apart from the model (it enters every
    content key); `provenance` says where the values come from (default: all computed by the caller), and a
    resumed store must have been planned with the same.

    `kind="unpaired"` plans an unpaired store (KTO, BCO: fields `completion_*`, `kl_*` and `label`), whose rows'
    KL completions were paired within chunks of `kl_batch_size` rows (docs/FORMAT.md, "Unpaired stores").

    `teacher` (``teacher_store.entry(...)``) plans teacher records: each shard then takes, per side, one record
    per row (docs/FORMAT.md, "Teacher records").
    """
    provenance = dict(provenance or {"sources": [], "reused": 0, "computed": len(ids)})
    store_kind = _kind_to_plan(kind, kl_batch_size)
    loc = location(path, storage_options)
    stray = [n for n in loc.top_level_names() if n not in _KNOWN_TOP and not n.endswith(".partial")]
    if stray:  # before anything is written, the lock included
        raise LogitstoreError(f"{loc.url} exists and is not a logitstore store (it holds {stray[0]!r}); "
                              "choose an empty or new path")
    if loc.is_local and os.path.lexists(loc.root) and not os.path.isdir(loc.root):
        raise LogitstoreError(f"{loc.url} exists and is not a folder; choose an empty or new path")
    resume = dict(fingerprint=fingerprint, kind=kind, kl_batch_size=kl_batch_size, teacher=teacher,
                  provenance=provenance)
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for key in ids:
            if key in seen:
                raise ValueError(f"duplicate example ID {key!r}")
            seen.add(key)
    geometry = fmt.Geometry(len(ids), rows_per_shard, max_length, inner_chunk)
    ragged = fmt.ragged_specs(vocab_size, token_codec, per_token, logp_codec, fixed_scale, store_kind)
    created = _created_time()  # every refusal that needs no store comes before the lock, which writes a file
    teacher_entry = check_entry(dict(teacher)) if teacher is not None else None
    with writing(loc.url):
        lock = _lock_or_read_only(loc, ids, resume)
    if isinstance(lock, StoreWriter):
        return lock  # a complete store where nothing may be written: nothing is to be written
    try:
        header = _planned_header(loc)  # read again under the lock: another writer may have planned it meanwhile
        if header is not None:
            _check_resumable(loc, header, ids, **resume)
            loc.remove_partials()
            return StoreWriter(loc, header, lock)
        encoded = [i.encode("utf-8") for i in ids]
        header = _new_header(store_kind, geometry, ragged, encoded, fingerprint=fingerprint, vocab_size=vocab_size,
                             tokenizer=tokenizer, settings=settings, skipped=skipped, scoring=scoring,
                             provenance=provenance, kl_batch_size=kl_batch_size, teacher=teacher_entry,
                             created=created)
        with writing(loc.url):
            loc.remove_partials()
            header["plan_files"] = _write_plan(loc, header, encoded)
            fault_point("before-header")  # plan arrays written, the header that makes them a planned store not yet
            write_root(loc, header)  # last: a store whose header exists is planned
        fault_point("after-header")
        return StoreWriter(loc, header, lock)
    except BaseException:
        lock.release()
        raise


def _lock_or_read_only(loc: Location, ids: Sequence[str], resume: dict[str, Any]) -> WriteLock | StoreWriter:
    """The store's write lock; or, where the store cannot be written (a read-only folder or mount) but is complete
    and is what this run would write, a writer with nothing to write."""
    try:
        return loc.acquire_write_lock()
    except OSError as exc:
        if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
            raise
        header = _planned_header(loc)
        if header is None or not header.get("complete"):
            raise
        _check_resumable(loc, header, ids, **resume)
        writer = StoreWriter(loc, header)
        if not writer.complete:
            raise
        writer._read_only = True
        return writer


def _kind_to_plan(kind: str, kl_batch_size: int | None) -> kinds.Kind:
    """The store kind `create` is asked for, with its KL batch size checked."""
    if kind not in kinds.KINDS:
        raise ValueError(f"unknown store kind {kind!r}; choose one of {', '.join(kinds.KINDS)}")
    store_kind = kinds.KINDS[kind]
    if (store_kind is kinds.UNPAIRED) != (kl_batch_size is not None):
        raise ValueError("an unpaired store needs kl_batch_size (and only an unpaired store takes it)")
    if kl_batch_size is not None and not 2 <= int(kl_batch_size) <= kinds.MAX_KL_BATCH_SIZE:
        raise ValueError(f"kl_batch_size must be in [2, {kinds.MAX_KL_BATCH_SIZE}], got {kl_batch_size}")
    return store_kind


def _check_resumable(loc: Location, header: Mapping[str, Any], ids: Sequence[str], *,
                     fingerprint: Mapping[str, Any], kind: str, kl_batch_size: int | None,
                     teacher: Mapping[str, Any] | None, provenance: Mapping[str, Any]) -> None:
    """A planned store is resumed only by a run that would plan exactly it."""
    _check_fingerprint(loc.url, header, fingerprint)
    theirs = (header.get("kind", "pairs"), header.get("kl_pairing", {}).get("batch_size"))
    if theirs != (kind, kl_batch_size):
        raise FingerprintMismatchError(f"{loc.url} was planned as a {theirs[0]} store"
                                       f"{f' with KL batch size {theirs[1]}' if theirs[1] else ''}; this run "
                                       f"asks for {kind}{f' with KL batch size {kl_batch_size}' if kl_batch_size else ''}"
                                       "; use another output path")
    if header.get("teacher") != (dict(teacher) if teacher is not None else None):
        raise FingerprintMismatchError(f"{loc.url} was planned with teacher records "
                                       f"{fmt.canonical_json(header.get('teacher')).decode()}, this run asks for "
                                       f"{fmt.canonical_json(teacher).decode()}; use another output path")
    if header["num_examples"] != len(ids):
        raise FormatError(f"{loc.url} plans {header['num_examples']} examples, this run has {len(ids)}")
    _check_provenance(loc.url, header, provenance)


def _new_header(store_kind: kinds.Kind, geometry: fmt.Geometry, ragged: list[fmt.RaggedSpec],
                encoded: list[bytes], *, fingerprint: Mapping[str, Any], vocab_size: int,
                tokenizer: Mapping[str, Any] | None, settings: Mapping[str, Any] | None,
                skipped: Sequence[Mapping[str, Any]], scoring: Mapping[str, Any] | None,
                provenance: Mapping[str, Any], kl_batch_size: int | None,
                teacher: dict[str, Any] | None, created: str) -> dict[str, Any]:
    """The header of a new store, but its `plan_files` (known once the plan files are written)."""
    fields: dict[str, Any] = {name: {"kind": "row", "dtype": dtype}
                              for name, (dtype, _) in store_kind.row_fields.items()}
    fields[fmt.CONTENT_KEY] = dict(fmt.CONTENT_KEY_FIELD)
    fields.update({spec.name: spec.header() for spec in ragged})
    header: dict[str, Any] = {
        "format_version": store_kind.format_version,
        **({"kind": store_kind.name, "kl_pairing": kinds.kl_pairing(kl_batch_size)}  # type: ignore[arg-type]
           if store_kind is kinds.UNPAIRED else {"kind": store_kind.name} if store_kind is not kinds.PAIRS else {}),
        **geometry.header(),
        "id_bytes": sum(len(b) for b in encoded),
        "fields": fields,
        "shard_files": fmt.shard_file_arrays(ragged, store_kind, teacher is not None),
        "fingerprint": dict(fingerprint),
        "fingerprint_digest": fingerprint_digest(fingerprint),
        "tokenizer": dict(tokenizer or {"vocab_size": vocab_size}),
        "settings": dict(settings or {}),
        "created": created,
        "skipped": [dict(s) for s in skipped],
        "content_key": {"version": CONTENT_KEY_VERSION, "scoring": dict(scoring or {})},
        "provenance": dict(provenance),
    }
    if teacher is not None:
        header["teacher"] = teacher
    return header


def _provenance_identity(p: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must agree when a store is resumed: counts and source digests (a moved source keeps its digest)."""
    return (p.get("reused"), p.get("computed"),
            [(s.get("digest"), s.get("reused")) for s in p.get("sources", [])])


def _provenance_text(p: Mapping[str, Any]) -> str:
    sources = p.get("sources", [])
    return (f"{p.get('reused')} pairs reused from {len(sources)} store{'' if len(sources) == 1 else 's'} and "
            f"{p.get('computed')} computed")


def _check_provenance(url: str, header: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    theirs = header.get("provenance", {})
    if _provenance_identity(theirs) != _provenance_identity(provenance):
        raise FingerprintMismatchError(
            f"{url} was planned with {_provenance_text(theirs)}, this run has {_provenance_text(provenance)}; "
            "run with the same stores to reuse (or the same inputs), or use another output path")


def _planned_header(loc: Location) -> dict[str, Any] | None:
    """The header of a planned store; None for nothing there or a plan that was interrupted (it is redone)."""
    try:
        return read_header(loc)
    except FormatError:
        if loc.has_key("zarr.json") and b'"logitstore"' not in (loc.read_bytes("zarr.json") or b""):
            return None
        raise


def _write_plan(loc: Location, header: dict[str, Any], encoded: list[bytes]) -> dict[str, list[Any]]:
    """Write every metadata document but the root's, and the ID files; return `plan_files` for the header."""
    import zarr

    # Clear whatever an interrupted plan left but the write lock (zarr's "w" mode would remove it too); the root's
    # own document is written last.
    loc.clear(keep=(LOCK_KEY,))
    zarr.open_group(loc.zarr_store(read_only=False), mode="a", zarr_format=3)
    written = []
    for key, doc in fmt.metadata_documents(header).items():
        loc.write_file(key, fmt.canonical_json(doc), durable=False)  # made durable together, before the header
        written.append(key)
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    ends = np.cumsum(lengths)
    hashes = id_hashes([b.decode("utf-8") for b in encoded])
    order = np.argsort(hashes, kind="stable")
    content = {
        "ids/values/c/0": b"".join(encoded),
        "ids/offsets/c/0/0": np.stack([ends - lengths, ends], axis=1).astype("<i8").tobytes(),
        "id_index/hash/c/0": hashes[order].astype("<u8").tobytes(),
        "id_index/row/c/0": order.astype("<i8").tobytes(),
    }
    plan_files: dict[str, list[Any]] = {}
    for key in fmt.plan_file_keys():
        data = content[key]
        if data:  # an empty array has no chunk file
            loc.write_file(key, data, durable=False)
            written.append(key)
            plan_files[key] = [len(data), file_sha256(data)]
    loc.sync(written)  # every document and plan file on disk before the header makes them a planned store
    loc.sync_name()  # and a new store folder's own name
    return plan_files
