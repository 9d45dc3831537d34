"""Stores made from stores: subsets, merges, and the content-key matching that lets a build reuse values.

No model runs here. A derived store is planned and filled like a built one (whole shards, each committed last),
so a killed `subset` or `merge` resumes when the same command runs again, and copied values keep their bits:
sums and counts as stored, per-token values as stored codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import format as fmt
from . import kinds
from .content_key import content_keys
from .errors import (
    FingerprintMismatchError,
    FormatError,
    IncompleteStoreError,
    InputDataError,
    LogitstoreError,
    printable,
)
from .reader import Store
from .reader import open as open_store
from .storage import location
from .writer import create, fingerprint_digest

# The parts of a fingerprint that decide a pair's values once its token ids are fixed (docs/FORMAT.md).
MODEL_IDENTITY = ("model", "adapter", "precision")
# What a derived store's fingerprint takes from its sources unchanged; it describes its own data and layout.
_OWN_PARTS = ("data", "layout")


# ---- identifying sources ---------------------------------------------------------------------------------------

def source_entry(store: Store, reused: int) -> dict[str, Any]:
    return {"path": store.location.url, "fingerprint_digest": store.header["fingerprint_digest"],
            "digest": store.digest, "reused": int(reused)}


def _differing(a: Mapping[str, Any], b: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if a.get(k) != b.get(k)]


def _per_token_specs(store: Store) -> dict[str, fmt.RaggedSpec]:
    return {name: spec for name, spec in store.fields.items() if name in store.kind.per_token_fields}


def committed_rows(store: Store) -> np.ndarray:
    return np.flatnonzero(np.repeat(store.committed, store.geometry.rows_per_shard)[:len(store)])


# ---- copying rows ----------------------------------------------------------------------------------------------

def read_rows(store: Store, rows: Sequence[int] | np.ndarray, *, per_token: bool,
              teacher: bool = False) -> dict[str, Any]:
    """Rows of `store` in the form `StoreWriter.write_shard` takes, with every stored bit kept: sums and counts
    as stored, token ids, (with `per_token`) per-token values as stored codes, and (with `teacher`) each side's
    teacher records as decoded (re-encoding a decoded record with the same codec gives back the same codes)."""
    rows = np.asarray(rows, dtype=np.int64)
    values = store.row_values(rows)
    kind = store.kind
    out: dict[str, Any] = {name: values[name] for name in kind.row_fields}
    for field in kind.token_fields:
        out[field] = store.ragged(field, rows)
    if per_token:
        for field in kind.per_token_fields:
            out[field] = store.ragged(field, rows, decode=False)
    if teacher:
        out.update(teacher_rows(store, rows))
    # The stored key must be the hash of the stored ids: matching and merging trust keys, so a forged key stops
    # the copy here rather than lend its values to another pair.
    keys = content_keys(*kinds.key_parts(kind, [out[f] for f in kind.token_fields]), store.scoring)
    bad = np.flatnonzero(np.any(keys != store.content_keys(rows), axis=1))
    if bad.size:
        raise FormatError(f"{store.location.url}: the content key of {printable(store.id_of(int(rows[bad[0]])))} "
                          f"disagrees with its token ids ({bad.size} of {rows.size} rows read); run logitstore "
                          "verify on it")
    return out


def combine(n: int, parts: Iterable[tuple[Sequence[int], Mapping[str, Any]]],
            kind: kinds.Kind = kinds.PAIRS) -> dict[str, Any]:
    """One shard's data from parts that each fill some of its `n` positions (`positions`, write_shard data)."""
    out: dict[str, list[Any]] = {}
    filled = np.zeros(n, dtype=bool)
    for positions, data in parts:
        for field, values in data.items():
            column = out.setdefault(field, [None] * n)
            for p, v in zip(positions, values):
                column[p] = v
        filled[list(positions)] = True
    if not filled.all():
        raise ValueError(f"shard position {int(np.flatnonzero(~filled)[0])} has no data")
    data: dict[str, Any] = dict(out)
    for name, (dtype, _) in kind.row_fields.items():
        # float32 sums widen to float64 exactly and narrow back to the same bits in the writer
        data[name] = np.array(out[name], dtype=np.float64 if dtype.startswith("float") else np.int64)
    return data


# ---- reuse: matching pairs by content key ----------------------------------------------------------------------

@dataclasses.dataclass
class ReusePlan:
    """Which rows of a new store take their values from which source row (`source` -1: to compute)."""

    stores: list[Store]
    source: np.ndarray  # int64 per new row: index into `stores`, or -1
    row: np.ndarray  # int64 per new row: row in that store

    @property
    def reused(self) -> int:
        return int((self.source >= 0).sum())

    @property
    def to_compute(self) -> np.ndarray:
        return self.source < 0

    def provenance(self) -> dict[str, Any]:
        counts = np.bincount(self.source[self.source >= 0], minlength=len(self.stores))
        return {"sources": [source_entry(s, int(c)) for s, c in zip(self.stores, counts)],
                "reused": self.reused, "computed": int(self.source.size) - self.reused}


def plan_reuse(keys: np.ndarray, paths: Sequence[str], *, fingerprint: Mapping[str, Any],
               scoring: Mapping[str, Any], per_token: Mapping[str, fmt.RaggedSpec] | None, out: str | None = None,
               storage_options: dict[str, Any] | None = None,
               log: Callable[[str], None] = lambda _: None) -> ReusePlan:
    """Match the content keys of a new store's pairs against the committed rows of the stores at `paths`.

    A source with another model fingerprint (`MODEL_IDENTITY`) or other scoring settings is refused. When the new
    store keeps per-token values (`per_token`: its per-token field specs), only sources that keep them in the same
    codec can supply a pair; the others are passed over with a note. The first source holding a key wins.
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, fmt.CONTENT_KEY_WIDTH)
    wanted = keys.view(np.dtype((np.void, fmt.CONTENT_KEY_WIDTH))).ravel()
    source = np.full(len(keys), -1, dtype=np.int64)
    row = np.full(len(keys), -1, dtype=np.int64)
    out_url = location(out, storage_options).url if out is not None else None
    stores: list[Store] = []
    for path in paths:
        store = open_store(path, storage_options=storage_options)
        url = store.location.url
        if url == out_url:
            raise InputDataError(f"cannot reuse {url}: it is the store being built")
        diff = _differing(store.fingerprint, fingerprint, MODEL_IDENTITY)
        if diff:
            raise FingerprintMismatchError(
                f"cannot reuse {url}: it was built with another {', '.join(diff)} (its fingerprint "
                f"{store.header['fingerprint_digest'][:12]}, this build {fingerprint_digest(fingerprint)[:12]})")
        if store.scoring != dict(scoring):
            raise FingerprintMismatchError(f"cannot reuse {url}: its values were scored under other settings "
                                           f"({store.scoring} here, {dict(scoring)} in this build)")
        stores.append(store)
        if per_token and _per_token_specs(store) != dict(per_token):
            log(f"Note: {url} has no per-token values in this build's codec; its pairs are computed again.")
            continue
        rows = committed_rows(store)
        theirs = store.content_keys(rows).view(np.dtype((np.void, fmt.CONTENT_KEY_WIDTH))).ravel()
        unique, first = np.unique(theirs, return_index=True)  # the first row holding each key
        open_rows = np.flatnonzero(source < 0)
        if unique.size == 0 or open_rows.size == 0:
            continue
        pos = np.minimum(np.searchsorted(unique, wanted[open_rows]), unique.size - 1)
        hit = unique[pos] == wanted[open_rows]
        source[open_rows[hit]] = len(stores) - 1
        row[open_rows[hit]] = rows[first[pos[hit]]]
    return ReusePlan(stores, source, row)


def reused_part(plan: ReusePlan, new_rows: Sequence[int], tokens: Mapping[str, Sequence[np.ndarray]], *,
                per_token: bool) -> Iterable[tuple[list[int], dict[str, Any]]]:
    """The reused rows among `new_rows` (one shard), read from their sources, as parts for :func:`combine`.

    `tokens` holds the new pairs' token ids by field, in `new_rows` order. A source row whose ids differ from
    the new pair's despite an equal key (a damaged or forged store) stops the build rather than lend its values.
    """
    new_rows = np.asarray(new_rows, dtype=np.int64)
    for s, store in enumerate(plan.stores):
        positions = np.flatnonzero(plan.source[new_rows] == s)
        if positions.size == 0:
            continue
        old_rows = plan.row[new_rows[positions]]
        data = read_rows(store, old_rows, per_token=per_token)
        # Labels are the new data's, not the source's: a value depends on the ids, a label on the data
        data.pop("label", None)
        for field in store.kind.token_fields:
            for p, old_row, ids in zip(positions.tolist(), old_rows.tolist(), data[field]):
                if not np.array_equal(np.asarray(ids, dtype=np.int64), np.asarray(tokens[field][p], dtype=np.int64)):
                    raise LogitstoreError(f"{store.location.url}: row {old_row} has the content key of another "
                                          f"pair ({field} differ); run logitstore verify on it")
        yield positions.tolist(), data


def teacher_rows(store: Store, rows: np.ndarray) -> dict[str, list[Any]]:
    """Each side's teacher records of `rows`, one record per row, as `write_shard` takes them."""
    from .teacher import Sampled, TopK
    from .teacher_store import array_name, side_names

    out: dict[str, list[Any]] = {}
    k = store.header["teacher"]["k"]
    for side in side_names(store.kind):
        rec = store.top_k(side, rows)
        if "logps" in rec:
            out[array_name(side)] = [TopK(*parts) for parts in zip(rec["ids"], rec["logps"], rec["tail_logp"])]
        else:
            out[array_name(side)] = [Sampled(i, c, k) for i, c in zip(rec["ids"], rec["counts"])]
    return out


# ---- subset and merge ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DeriveResult:
    path: str
    examples: int
    sources: int
    shards_written: int
    already_complete: bool
    seconds: float
    store_bytes: int
    duplicates: int = 0  # merge: pairs present in more than one source with the same content, kept once
    not_found: int = 0  # subset --exclude-ids: listed IDs the source does not hold
    digest: str | None = None  # the store digest, as the writer that finalised it knows it

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.path} is already complete ({self.examples} pairs); nothing to do."
        notes = ""
        if self.duplicates:
            notes += f", {self.duplicates} duplicate{'' if self.duplicates == 1 else 's'} kept once"
        if self.not_found:
            notes += f", {self.not_found} excluded ID{'' if self.not_found == 1 else 's'} not in the source"
        return (f"Wrote {self.path}: {self.examples} pairs (0 computed, {self.examples} reused from "
                f"{self.sources} store{'' if self.sources == 1 else 's'}){notes}, {self.shards_written} "
                f"shard{'' if self.shards_written == 1 else 's'} written in {self.seconds:.1f} s.")


def _open_complete(path: str | os.PathLike[str], storage_options: dict[str, Any] | None,
                   digest: str | None = None) -> Store:
    store = open_store(path, storage_options=storage_options, digest=digest)
    if not store.complete:
        raise IncompleteStoreError(f"{store.location.url} is incomplete ({len(store.missing_shards)} shards "
                                   "missing); finish its build first")
    return store


def read_id_file(path: str | os.PathLike[str]) -> list[str]:
    """Example IDs, one per line (blank lines skipped); a repeated ID is refused."""
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - closed by the interpreter at once
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    ids: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line in seen:
            raise InputDataError(f"{path}:{number}: duplicate ID {line!r} (first on line {seen[line]})")
        seen[line] = number
        ids.append(line)
    return ids


def subset(source: str | os.PathLike[str], out: str | os.PathLike[str], *, ids: Sequence[str] | None = None,
           exclude: Sequence[str] | None = None, rows_per_shard: int | None = None,
           storage_options: dict[str, Any] | None = None, digest: str | None = None) -> DeriveResult:
    """A store of the pairs of `source` listed in `ids` (or all but those in `exclude`), in the source's order.
    With `digest`, the source must be the store it names (`Store.digest`)."""
    if (ids is None) == (exclude is None):
        raise ValueError("give exactly one of ids and exclude")
    start = time.perf_counter()
    store = _open_complete(source, storage_options, digest)
    _refuse_unpaired(store, "subset")
    not_found = 0
    if ids is not None:
        if len(set(ids)) != len(ids):
            raise InputDataError("the ID list repeats an ID")
        rows = np.sort(store.rows(ids))
    else:
        dropped = set(exclude or ())
        all_ids = store.ids
        not_found = len(dropped - set(all_ids))
        rows = np.array([r for r, key in enumerate(all_ids) if key not in dropped], dtype=np.int64)
    if rows.size == 0:
        raise InputDataError(f"no pair of {store.location.url} is left to write")
    result = _write_derived(out, [store], [(0, int(r)) for r in rows.tolist()], kind="subset",
                            rows_per_shard=rows_per_shard, storage_options=storage_options, start=start)
    result.not_found = not_found
    return result


def merge(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          rows_per_shard: int | None = None, storage_options: dict[str, Any] | None = None,
          digests: Sequence[str] | None = None) -> DeriveResult:
    """One store holding the pairs of every source, in order. Sources must share everything in their fingerprint
    but the data and layout; an ID held by two sources with different content is refused, with equal content
    kept once. With `digests` (one per source, in order), each source must be the store its digest names."""
    if not sources:
        raise ValueError("merge needs at least one store")
    if digests is not None and len(digests) != len(sources):
        raise ValueError(f"{len(digests)} digests given for {len(sources)} stores; give one per store, in order")
    start = time.perf_counter()
    stores = [_open_complete(path, storage_options, None if digests is None else digests[i])
              for i, path in enumerate(sources)]
    for store in stores:
        _refuse_unpaired(store, "merge")
    first = stores[0]
    identity = [k for k in set(first.fingerprint) | {k for s in stores for k in s.fingerprint}
                if k not in _OWN_PARTS]
    for store in stores[1:]:
        diff = sorted(_differing(store.fingerprint, first.fingerprint, identity))
        if diff:
            raise FingerprintMismatchError(f"cannot merge {store.location.url} with {first.location.url}: "
                                           f"they differ in {', '.join(diff)}")
        if store.scoring != first.scoring:
            raise FingerprintMismatchError(f"cannot merge {store.location.url} with {first.location.url}: their "
                                           "values were scored under other settings")
        if _per_token_specs(store) != _per_token_specs(first):
            raise FingerprintMismatchError(f"cannot merge {store.location.url} with {first.location.url}: they "
                                           "differ in per-token values (one lacks them, or another codec)")
        if store.teacher != first.teacher:
            raise FingerprintMismatchError(f"cannot merge {store.location.url} with {first.location.url}: they "
                                           "differ in teacher records (one lacks them, or another kind, K, codec, "
                                           "seed or vocabulary)")
    picks: list[tuple[int, int]] = []
    seen: dict[str, tuple[int, bytes]] = {}
    duplicates = 0
    for s, store in enumerate(stores):
        keys = store.content_keys()
        for r, key in enumerate(store.ids):
            if key in seen:
                other, other_key = seen[key]
                if other_key != keys[r].tobytes() or not _same_ids(stores[other], stores[other].rows([key])[0],
                                                                   store, r):
                    raise InputDataError(f"example ID {printable(repr(key))} is in {stores[other].location.url} and "
                                         f"{store.location.url} with different content")
                duplicates += 1
                continue
            seen[key] = (s, keys[r].tobytes())
            picks.append((s, r))
    result = _write_derived(out, stores, picks, kind="merge", rows_per_shard=rows_per_shard,
                            storage_options=storage_options, start=start)
    result.duplicates = duplicates
    return result


def _refuse_unpaired(store: Store, verb: str) -> None:
    """An unpaired store's KL values pair each row with its neighbour within chunks of the KL batch size: taking
    rows out or putting stores together moves rows across chunks, and copied KL values would no longer be the
    ones TRL pairs. Rather than recompute them (which needs the model), derived unpaired stores are refused."""
    if store.kind is kinds.UNPAIRED:
        raise InputDataError(f"cannot {verb} {store.location.url}: it is an unpaired store, and moving its rows "
                             f"would break the KL pairing (each example's KL completion is its neighbour's within "
                             f"batches of {store.kl_batch_size}); build a new store from the {verb}'s data instead "
                             "(--reuse copies every value that is still valid)")
    if store.kind is kinds.COMPLETION:
        raise InputDataError(f"cannot {verb} {store.location.url}: it is a completion store, and {verb} handles "
                             "pairs stores only; build a new store from the data instead")


def _same_ids(a: Store, row_a: int, b: Store, row_b: int) -> bool:
    """Whether two rows hold the same token ids (a duplicate is kept once only when they do, whatever its key)."""
    return all(np.array_equal(a.ragged(f, [row_a])[0].astype(np.int64), b.ragged(f, [row_b])[0].astype(np.int64))
               for f in fmt.TOKEN_FIELDS)


def _write_derived(out: str | os.PathLike[str], stores: list[Store], picks: list[tuple[int, int]], *, kind: str,
                   rows_per_shard: int | None, storage_options: dict[str, Any] | None,
                   start: float) -> DeriveResult:
    """Plan (or resume) the store at `out` holding source rows `picks` (store index, row) in order, and fill it."""
    first = stores[0]
    n = len(picks)
    all_ids = [s.ids for s in stores]
    all_keys = [s.content_keys() for s in stores]
    ids = [all_ids[s][r] for s, r in picks]
    data_hash = hashlib.sha256()
    for (s, r), key in zip(picks, ids):  # the data part of the fingerprint: IDs and content, in order
        data_hash.update(key.encode("utf-8") + b"\0" + all_keys[s][r].tobytes())
    rps = int(rows_per_shard or first.geometry.rows_per_shard)
    fingerprint = dict(first.fingerprint, data={"examples": n, "sha256": data_hash.hexdigest(), "derived": kind})
    if isinstance(fingerprint.get("layout"), dict):
        fingerprint["layout"] = dict(fingerprint["layout"], rows_per_shard=rps)
    counts = np.bincount(np.array([s for s, _ in picks], dtype=np.int64), minlength=len(stores))
    provenance = {"sources": [source_entry(s, int(c)) for s, c in zip(stores, counts)], "reused": n,
                  "computed": 0}
    per_token = _per_token_specs(first)
    logp = next(iter(per_token.values()), None)
    token_spec = first.fields["prompt_ids"]
    vocab = max(int(s.tokenizer.get("vocab_size") or 0) for s in stores) or np.iinfo(token_spec.dtype).max + 1
    writer = create(out, ids, fingerprint=fingerprint, vocab_size=vocab,
                    max_length=max(s.geometry.max_length for s in stores), per_token=bool(per_token),
                    token_codec=token_spec.codec, logp_codec=logp.codec if logp else "fixed",
                    fixed_scale=logp.scale if logp and logp.scale is not None else fmt.DEFAULT_FIXED_SCALE,
                    rows_per_shard=rps, inner_chunk=first.geometry.inner_chunk, tokenizer=first.tokenizer,
                    settings={"derived": kind, "token_codec": token_spec.codec,
                              "codec": logp.codec if logp else None},
                    scoring=first.scoring, provenance=provenance, storage_options=storage_options,
                    teacher=first.teacher)
    if writer.complete:
        with writer:
            return DeriveResult(writer.loc.url, n, len(stores), 0, True, 0.0, writer.loc.total_bytes(),
                                digest=writer.digest)
    source = np.array([s for s, _ in picks], dtype=np.int64)
    row = np.array([r for _, r in picks], dtype=np.int64)
    missing = writer.missing_shards
    with writer:  # the lock goes when this returns or fails, not when the writer is collected
        for shard in missing:
            span = writer.shard_rows(shard)
            parts = []
            for s, store in enumerate(stores):
                positions = np.flatnonzero(source[span.start:span.stop] == s)
                if positions.size:
                    parts.append((positions.tolist(), read_rows(store, row[span.start + positions],
                                                                per_token=bool(per_token),
                                                                teacher=first.teacher is not None)))
            writer.write_shard(shard, combine(len(span), parts))
        writer.finalize()
    return DeriveResult(writer.loc.url, n, len(stores), len(missing), False, time.perf_counter() - start,
                        writer.loc.total_bytes(), digest=writer.digest)
