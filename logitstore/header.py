"""The root of trust: the store header, checked against the reader's own limits, and every other metadata document
checked to be exactly what the header implies.

Nothing here hands store content to zarr-python. A store whose metadata differs in any way from what the writer
writes for its header (another dtype, codec, chunk grid, key encoding or fill value, Zarr v2 or consolidated
metadata) is refused before a byte of its data is read.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import re
from typing import Any

from . import format as fmt
from . import kinds
from .errors import FormatError
from .storage import Location

_V2_NAMES = (".zarray", ".zgroup", ".zattrs", ".zmetadata")
_TOKEN_DTYPES = ("uint16", "uint32")
_LOGP_DTYPES = {"fixed": "uint16", "float16": "float16", "float32": "float32", "raw": "float32"}
_ROOT_KEYS = {"zarr_format", "node_type", "attributes"}
# The header's keys (docs/FORMAT.md, "Header"); a key outside these is refused, since a reader that ignored it might
# misread a store whose meaning it changes. `complete` and `summary` are written together by finalisation.
HEADER_KEYS = {"format_version", "num_examples", "rows_per_shard", "num_shards", "max_length", "shard_capacity",
               "inner_chunk", "id_bytes", "fields", "shard_files", "fingerprint", "fingerprint_digest", "tokenizer",
               "settings", "created", "plan_files", "skipped", "content_key", "provenance", "teacher"}
REQUIRED_KEYS = HEADER_KEYS - {"teacher"}  # every store has these; `teacher` only a store with teacher records
FINAL_KEYS = {"complete", "summary"}
KIND_KEYS = {"kind", "kl_pairing"}  # an unpaired store's (format version 3) own keys (logitstore/kinds.py)
_TOKENIZER_KEYS = {"pad_token_id", "eos_token_id", "bos_token_id", "vocab_size"}
_CREATED = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00")


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """A checked header with what follows from it, and the metadata bytes as stored (for the digest)."""

    header: dict[str, Any]
    geometry: fmt.Geometry
    fields: dict[str, fmt.RaggedSpec]  # ragged fields
    shard_files: list[str]
    documents: dict[str, bytes]  # file key -> stored zarr.json bytes, the root included


def _int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"header {key} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = fmt.canonical_json(value).decode() if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_root(raw: bytes, url: str) -> dict[str, Any]:
    """The header held in a root zarr.json's bytes (raises FormatError)."""
    try:
        meta = fmt.strict_json(raw)
    except ValueError as exc:
        raise FormatError(f"{url}/zarr.json is not valid JSON ({exc})") from None
    header = meta.get("attributes", {}).get(fmt.HEADER_KEY) if isinstance(meta, dict) and isinstance(
        meta.get("attributes"), dict) else None
    if not isinstance(header, dict):
        raise FormatError(f"{url} is a Zarr group without a logitstore header (another tool's store, or a "
                          "build interrupted while planning: run the build again)")
    try:
        kinds.kind_of(header)  # the format version (and, from version 3 on, the kind) says what follows
    except FormatError as exc:
        raise FormatError(f"{url} has {exc}") from None
    if set(meta) != _ROOT_KEYS or meta != fmt.root_metadata(header):
        raise FormatError(f"{url}/zarr.json holds more than the header (consolidated metadata or other keys: "
                          f"{', '.join(sorted(set(meta) - _ROOT_KEYS)) or 'attributes'})")
    return header


def check_header(header: dict[str, Any], url: str) -> tuple[fmt.Geometry, dict[str, fmt.RaggedSpec], list[str]]:
    """Check every value the reader relies on against its limits; return the geometry, ragged specs, shard files."""
    try:
        return _check_header(header)
    except FormatError as exc:
        raise FormatError(f"{url}: {exc}") from None


def _check_header(header: dict[str, Any]) -> tuple[fmt.Geometry, dict[str, fmt.RaggedSpec], list[str]]:
    missing = sorted(REQUIRED_KEYS - set(header))
    if missing:
        raise FormatError(f"header lacks the required key {missing[0]}")
    geometry = _check_geometry(header)
    n = geometry.num_examples
    store_kind, specs = _check_fields(header)
    if "teacher" in header:
        from .teacher_store import check_entry

        check_entry(header["teacher"])
    shard_files = fmt.shard_file_arrays(specs, store_kind, "teacher" in header)
    if header.get("shard_files") != shard_files:
        raise FormatError(f"header shard_files must be {shard_files}")
    _check_plan_files(header, n)
    for key, kind in (("fingerprint", dict), ("tokenizer", dict), ("settings", dict), ("skipped", list)):
        if not isinstance(header.get(key), kind):
            raise FormatError(f"header {key} must be {'an object' if kind is dict else 'a list'}")
    digest = header.get("fingerprint_digest")
    if not _is_sha256(digest):
        raise FormatError("header fingerprint_digest must be a SHA-256 in lowercase hex")
    actual = hashlib.sha256(fmt.canonical_json(header["fingerprint"])).hexdigest()
    if digest != actual:
        raise FormatError(f"header fingerprint_digest {digest[:12]}... is not the SHA-256 of the fingerprint "
                          f"({actual[:12]}...): the fingerprint was edited")
    _check_tokenizer(header["tokenizer"])
    _check_created(header.get("created"))
    _check_skipped(header["skipped"])
    _check_content_key(header.get("content_key"))
    _check_provenance(header.get("provenance"), n)
    unknown = sorted(set(header) - HEADER_KEYS - FINAL_KEYS - (KIND_KEYS if store_kind is kinds.UNPAIRED
                                                               else {"kind"} if store_kind is not kinds.PAIRS
                                                               else set()))
    if unknown:
        raise FormatError(f"unknown header key {_short(unknown[0])} (format version {store_kind.format_version} has "
                          "no such key)")
    if "complete" in header and header["complete"] is not True:
        raise FormatError("header complete must be true when present")
    if ("complete" in header) != ("summary" in header):
        raise FormatError("header complete and summary come together (finalisation writes both)")
    if "summary" in header:
        _check_summary(header["summary"], geometry, store_kind)
    return geometry, {spec.name: spec for spec in specs}, shard_files


def _check_geometry(header: dict[str, Any]) -> fmt.Geometry:
    """The sizes: examples, shards, lengths, chunks, each within the reader's limits and agreeing."""
    n = _int(header, "num_examples", 1, fmt.MAX_EXAMPLES)
    rps = _int(header, "rows_per_shard", 1, fmt.MAX_ROWS_PER_SHARD)
    max_length = _int(header, "max_length", 1, fmt.MAX_LENGTH)
    inner = _int(header, "inner_chunk", 1, fmt.MAX_INNER_CHUNK)
    _int(header, "id_bytes", 0, fmt.MAX_ID_BYTES)
    geometry = fmt.Geometry(n, rps, max_length, inner)
    if _int(header, "num_shards", 1, fmt.MAX_SHARDS) != geometry.num_shards:
        raise FormatError(f"header num_shards {header['num_shards']} differs from num_examples / rows_per_shard "
                          f"({geometry.num_shards})")
    if geometry.shard_capacity > fmt.MAX_SHARD_CAPACITY:
        raise FormatError(f"rows_per_shard * max_length = {rps * max_length} values per shard is above the limit "
                          f"of {fmt.MAX_SHARD_CAPACITY}")
    if geometry.shard_capacity // inner > fmt.MAX_INNER_PER_SHARD:
        raise FormatError(f"{geometry.shard_capacity // inner} inner chunks per shard is above the limit of "
                          f"{fmt.MAX_INNER_PER_SHARD}")
    if header.get("shard_capacity") != geometry.shard_capacity:
        raise FormatError(f"header shard_capacity {_short(header.get('shard_capacity'))} differs from "
                          f"rows_per_shard * max_length rounded up to whole inner chunks ({geometry.shard_capacity})")
    return geometry


def _check_fields(header: dict[str, Any]) -> tuple[kinds.Kind, list[fmt.RaggedSpec]]:
    """The header's fields: exactly the kind's per-row fields and content key, and its ragged fields with supported
    dtypes and codecs. Returns the store's kind and its ragged fields' specs in the format's order."""
    fields = header.get("fields")
    if not isinstance(fields, dict):
        raise FormatError("header fields must be an object")
    store_kind = kinds.kind_of(header)
    _check_kind_keys(header, store_kind)
    for name, (dtype, _) in store_kind.row_fields.items():
        if fields.get(name) != {"kind": "row", "dtype": dtype}:
            raise FormatError(f"header field {name} must be {_short({'kind': 'row', 'dtype': dtype})}, got "
                              f"{_short(fields.get(name))}")
    if fields.get(fmt.CONTENT_KEY) != fmt.CONTENT_KEY_FIELD:
        wanted = fmt.canonical_json(fmt.CONTENT_KEY_FIELD).decode()
        raise FormatError(f"header field {fmt.CONTENT_KEY} must be {wanted}, got {_short(fields.get(fmt.CONTENT_KEY))}")
    ragged: dict[str, fmt.RaggedSpec] = {}
    for name, entry in fields.items():
        if name in store_kind.row_fields or name == fmt.CONTENT_KEY:
            continue
        if name not in store_kind.token_fields + store_kind.per_token_fields:
            raise FormatError(f"unknown field {_short(name)} in the header of a {store_kind.name} store")
        ragged[name] = _ragged_spec(name, entry, store_kind)
    missing = [name for name in store_kind.token_fields if name not in ragged]
    if missing:
        raise FormatError(f"header lacks the field {missing[0]}")
    per_token = [ragged.get(name) for name in store_kind.per_token_fields]
    if any(per_token) and not (all(per_token) and len({(p.codec, p.scale) for p in per_token}) == 1):  # type: ignore[union-attr]
        raise FormatError("per-token fields must come as a pair with the same codec")
    if len({(ragged[name].dtype, ragged[name].codec) for name in store_kind.token_fields}) != 1:
        raise FormatError("token id fields must share one dtype and one codec")
    order = [name for name in store_kind.token_fields + store_kind.per_token_fields
             if name in ragged]  # the format's order
    return store_kind, [ragged[name] for name in order]


def _check_tokenizer(tokenizer: dict[str, Any]) -> None:
    unknown = sorted(set(tokenizer) - _TOKENIZER_KEYS)
    if unknown:
        raise FormatError(f"header tokenizer has the unknown key {_short(unknown[0])} (allowed: "
                          f"{', '.join(sorted(_TOKENIZER_KEYS))})")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = tokenizer.get(key)
        if value is not None and (type(value) is not int or not 0 <= value < 1 << 32):
            raise FormatError(f"header tokenizer.{key} must be a token id or null, got {_short(value)}")
    vocab = tokenizer.get("vocab_size")
    if vocab is not None and (type(vocab) is not int or not 0 < vocab <= 1 << 32):
        raise FormatError(f"header tokenizer.vocab_size must be an integer in [1, {1 << 32}] or null, got "
                          f"{_short(vocab)}")


def _check_created(created: Any) -> None:
    """`created`: the planning time in UTC, to the second, as `YYYY-MM-DDTHH:MM:SS+00:00`."""
    ok = isinstance(created, str) and _CREATED.fullmatch(created) is not None
    if ok:
        try:
            datetime.datetime.fromisoformat(created)
        except ValueError:
            ok = False
    if not ok:
        raise FormatError(f"header created must be a UTC time as YYYY-MM-DDTHH:MM:SS+00:00, got {_short(created)}")


def _check_skipped(skipped: list[Any]) -> None:
    """`skipped`: one {"id", "line", "reason"} per input pair left out (id and reason strings, line from 1)."""
    for i, entry in enumerate(skipped):
        if not (isinstance(entry, dict) and set(entry) == {"id", "line", "reason"} and isinstance(entry["id"], str)
                and type(entry["line"]) is int and entry["line"] >= 1 and isinstance(entry["reason"], str)):
            raise FormatError(f"header skipped[{i}] must be {{id (a string), line (an integer from 1), reason (a "
                              f"string)}}, got {_short(entry)}")


def _check_summary(summary: Any, geometry: fmt.Geometry, kind: kinds.Kind = kinds.PAIRS) -> None:
    """`summary`'s shape; its values are checked against the stored data and commit rows by `verify`."""
    keys = {"tokens", "scored_tokens", "clipped_values", "data_bytes"}
    ok = isinstance(summary, dict) and set(summary) == keys
    limit = geometry.num_examples * geometry.max_length  # tokens of one field can be no more
    if ok:
        counts = {"tokens": kind.token_fields, "scored_tokens": tuple(side.tokens for side in kind.sides)}
        for key, names in counts.items():
            part = summary[key]
            ok = ok and isinstance(part, dict) and set(part) == set(names) and all(
                type(v) is int and 0 <= v <= limit for v in part.values())
        ok = ok and all(type(summary[k]) is int and 0 <= summary[k] < 1 << 63 for k in ("clipped_values",
                                                                                         "data_bytes"))
    if not ok:
        scored = ", ".join(side.tokens for side in kind.sides)
        raise FormatError(f"header summary must be {{tokens: {{{', '.join(kind.token_fields)}}}, scored_tokens: "
                          f"{{{scored}}}, clipped_values, data_bytes}} with counts from 0, "
                          f"got {_short(summary)}")


def _check_content_key(entry: Any) -> None:
    """`content_key`: {"version": 1, "scoring": {...}}; the scoring settings enter every content key."""
    from .content_key import VERSION

    if not isinstance(entry, dict) or set(entry) != {"version", "scoring"}:
        raise FormatError(f"header content_key must be an object with exactly version and scoring, got "
                          f"{_short(entry)}")
    if type(entry["version"]) is not int or entry["version"] != VERSION:
        raise FormatError(f"header content_key.version {_short(entry['version'])} is not one this logitstore "
                          f"computes ({VERSION})")
    if not isinstance(entry["scoring"], dict):
        raise FormatError(f"header content_key.scoring must be an object, got {_short(entry['scoring'])}")
    if len(fmt.canonical_json(entry["scoring"])) > fmt.MAX_SCORING_BYTES:
        raise FormatError(f"header content_key.scoring is above the limit of {fmt.MAX_SCORING_BYTES} bytes")


def _check_provenance(entry: Any, n: int) -> None:
    """`provenance`: how many values were computed and reused, and the stores they were reused from."""
    if not isinstance(entry, dict) or set(entry) != {"sources", "reused", "computed"}:
        raise FormatError(f"header provenance must be an object with exactly sources, reused and computed, got "
                          f"{_short(entry)}")
    counts = [entry["reused"], entry["computed"]]
    if any(type(c) is not int or not 0 <= c <= n for c in counts) or sum(counts) != n:
        raise FormatError(f"header provenance reused and computed must be counts that add up to num_examples "
                          f"({n}), got {_short(counts)}")
    sources = entry["sources"]
    if not isinstance(sources, list) or len(sources) > fmt.MAX_SOURCES:
        raise FormatError(f"header provenance.sources must be a list of at most {fmt.MAX_SOURCES} stores")
    total = 0
    for i, source in enumerate(sources):
        ok = (isinstance(source, dict) and set(source) == {"path", "fingerprint_digest", "digest", "reused"}
              and isinstance(source["path"], str) and len(source["path"]) <= fmt.MAX_SOURCE_PATH
              and all(_is_sha256(source[k]) for k in ("fingerprint_digest", "digest"))
              and type(source["reused"]) is int and 0 <= source["reused"] <= n)
        if not ok:
            raise FormatError(f"header provenance.sources[{i}] must be {{path (at most {fmt.MAX_SOURCE_PATH} "
                              f"characters), fingerprint_digest, digest (SHA-256 in hex), reused (a count)}}, got "
                              f"{_short(source)}")
        total += source["reused"]
    if total != entry["reused"]:
        raise FormatError(f"header provenance: the sources' reused counts add up to {total}, not to reused "
                          f"({entry['reused']})")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_kind_keys(header: dict[str, Any], kind: kinds.Kind) -> None:
    """An unpaired store records its KL pairing; a pairs store has none."""
    if kind is kinds.UNPAIRED:
        if "kl_pairing" not in header:
            raise FormatError("header lacks the required key kl_pairing (an unpaired store records its KL pairing)")
        kinds.check_kl_pairing(header["kl_pairing"])
    elif "kl_pairing" in header:
        raise FormatError("header kl_pairing belongs to unpaired stores only")


def _ragged_spec(name: str, entry: Any, kind: kinds.Kind = kinds.PAIRS) -> fmt.RaggedSpec:
    if not isinstance(entry, dict) or entry.get("kind") != "ragged":
        raise FormatError(f"header field {name} must be a ragged field")
    dtype, codec, scale = entry.get("dtype"), entry.get("codec"), entry.get("scale")
    allowed = set(entry) <= {"kind", "dtype", "codec", "scale"}
    if name in kind.token_fields:
        ok = allowed and dtype in _TOKEN_DTYPES and codec in fmt.TOKEN_CODECS and "scale" not in entry
    else:
        ok = allowed and codec in fmt.LOGP_CODECS and dtype == _LOGP_DTYPES[codec] and (
            ("scale" in entry) == (codec == "fixed"))
    if not ok:
        raise FormatError(f"header field {name} has an unsupported dtype, codec or key: {_short(entry)}")
    if scale is not None and (type(scale) is not float or not math.isfinite(scale)
                              or not fmt.MIN_FIXED_SCALE <= scale <= fmt.MAX_FIXED_SCALE):
        raise FormatError(f"header field {name}: fixed-point scale must be a finite float in "
                          f"[{fmt.MIN_FIXED_SCALE}, {fmt.MAX_FIXED_SCALE}], got {_short(scale)}")
    return fmt.RaggedSpec(name, dtype, codec, scale)


def _check_plan_files(header: dict[str, Any], n: int) -> None:
    plan = header.get("plan_files")
    keys = [key for key in fmt.plan_file_keys() if fmt.plan_file_size(key, n, header["id_bytes"])]
    if not isinstance(plan, dict) or sorted(plan) != sorted(keys):
        raise FormatError(f"header plan_files must name exactly {keys}")
    for key in keys:
        entry = plan[key]
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == fmt.plan_file_size(
                key, n, header["id_bytes"]) and isinstance(entry[1], str) and len(entry[1]) == 64):
            raise FormatError(f"header plan_files[{key!r}] must be [its size in bytes, its SHA-256 in hex]")


def read_meta(loc: Location) -> StoreMeta:
    """Read and check the root header and every other metadata document of the store at `loc`."""
    raw = loc.read_file("zarr.json", limit=fmt.MAX_HEADER_BYTES)
    if raw is None:
        from .errors import StoreNotFoundError

        raise StoreNotFoundError(f"no logitstore store at {loc.url}")
    header = parse_root(raw, loc.url)
    geometry, fields, shard_files = check_header(header, loc.url)
    documents = {"zarr.json": raw}
    expected = fmt.metadata_documents(header)
    folders = [""] + [key[:-len("/zarr.json")] for key in expected]
    _refuse_v2(loc, folders)
    for key, doc in expected.items():
        stored = loc.read_file(key, limit=fmt.MAX_METADATA_BYTES)
        if stored is None:
            raise FormatError(f"{loc.url}: {key} is missing")
        try:
            parsed = fmt.strict_json(stored)
        except ValueError as exc:
            raise FormatError(f"{loc.url}: {key} is not valid JSON ({exc})") from None
        if not isinstance(parsed, dict) or fmt.canonical_json(parsed) != fmt.canonical_json(doc):
            raise FormatError(f"{loc.url}: {key} differs from the metadata the header implies "
                              f"({_first_difference(parsed, doc)})")
        documents[key] = stored
    return StoreMeta(header, geometry, fields, shard_files, dict(sorted(documents.items())))


def _refuse_v2(loc: Location, folders: list[str]) -> None:
    """Zarr v2 metadata next to the v3 documents would let another Zarr reader see other arrays."""
    if not loc.is_local:
        folders = [""]  # one request per name on an object store; the whole tree is checked by `verify`
    for folder in folders:
        for name in _V2_NAMES:
            key = f"{folder}/{name}" if folder else name  # built here from constants: no check_key needed
            there = os.path.lexists(os.path.join(loc.root, key)) if loc.is_local else loc.fs.exists(
                f"{loc._root}/{key}")
            if there:
                raise FormatError(f"{loc.url}: refusing Zarr v2 metadata {key} in a Zarr v3 store")


def _first_difference(got: Any, want: Any, path: str = "") -> str:
    if isinstance(got, dict) and isinstance(want, dict):
        for key in sorted(set(got) | set(want)):
            if key not in want:
                return f"unexpected {path}{key}"
            if key not in got:
                return f"no {path}{key}"
            if fmt.canonical_json(got[key]) != fmt.canonical_json(want[key]):
                return _first_difference(got[key], want[key], f"{path}{key}.")
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return f"{path.rstrip('.')} has {len(got)} entries, expected {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            if fmt.canonical_json(a) != fmt.canonical_json(b):
                return _first_difference(a, b, f"{path}{i}.")
    return f"{path.rstrip('.') or 'document'} is {_short(got)}, expected {_short(want)}"
