"""The store layout as data: array names, dtypes, codecs and file keys (docs/FORMAT.md in code).

Every other module takes names and keys from here, so the layout is written down once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .kinds import PAIRS, Kind, kind_of

FORMAT_VERSION = 2  # of pairs stores; unpaired stores are version 3 (logitstore/kinds.py)
HEADER_KEY = "logitstore"

# Per-row arrays: name -> (dtype, fill value). NaN marks a sum that was never written.
ROW_FIELDS: dict[str, tuple[str, Any]] = PAIRS.row_fields
# Per-row content key: 16 bytes per row (chunks of (rows_per_shard, 16)), declared in the header as
# CONTENT_KEY_FIELD; defined in logitstore/content_key.py and docs/FORMAT.md ("Content key"). Every store has it.
CONTENT_KEY = "content_key"
CONTENT_KEY_WIDTH = 16
CONTENT_KEY_FIELD = {"kind": "row", "dtype": "uint8", "width": CONTENT_KEY_WIDTH}
TOKEN_FIELDS = PAIRS.token_fields  # the pairs kind's; every kind's are in logitstore/kinds.py
PER_TOKEN_FIELDS = PAIRS.per_token_fields

TOKEN_CODECS = ("zstd", "raw")
LOGP_CODECS = ("fixed", "float16", "float32", "raw")
DEFAULT_FIXED_SCALE = -(2.0**-7)  # sum error <= 2^-8 nats; 1.44 B/token on hh-rlhf (docs/benchmarks.md)
FIXED_MAX_CODE = np.iinfo(np.uint16).max

ROWS_PER_SHARD = 1024
# A build's default shard: about this many positions through the model (prompt + chosen and prompt + rejected per
# pair), within [MIN_BUILD_ROWS, ROWS_PER_SHARD] rows. A shard is the unit a build commits, so an interruption
# loses at most one shard of model work: 2^18 positions, about a minute for a 7B model in 4-bit on a 12 GB GPU.
SHARD_POSITIONS = 1 << 18
MIN_BUILD_ROWS = 8
INNER_CHUNK = 8192

def build_rows_per_shard(positions: np.ndarray) -> int:
    """Rows per shard for pairs that take `positions` (per pair) through the model: about SHARD_POSITIONS a shard."""
    mean = float(np.mean(positions)) if len(positions) else 1.0
    return int(min(ROWS_PER_SHARD, max(MIN_BUILD_ROWS, SHARD_POSITIONS // max(1, math.ceil(mean)))))


# ---- limits the reader owns (docs/FORMAT.md, "Reader limits"): whatever a header says, nothing beyond these is
# allocated, mapped or decoded. Each bound keeps one allocation or one file under a few hundred megabytes.
MAX_HEADER_BYTES = 8 << 20          # the root zarr.json (header, fingerprint, skipped inputs)
MAX_METADATA_BYTES = 64 << 10       # any other zarr.json
MAX_EXAMPLES = 1 << 31
MAX_ROWS_PER_SHARD = 1 << 20
MAX_SHARDS = 1 << 18                # the commit table: at most 2^18 rows
MAX_LENGTH = 1 << 20                # tokens per sequence
MAX_INNER_CHUNK = 1 << 22           # values per inner chunk (16 MiB decoded at 4 bytes per value)
MAX_SHARD_CAPACITY = (1 << 32) - 1  # values per shard of a ragged field (shard-local offsets fit in uint32)
MAX_INNER_PER_SHARD = 1 << 20       # inner chunks per shard (a 16 MiB shard index)
MAX_ID_BYTES = 1 << 34              # all example IDs together
MAX_SCORING_BYTES = 4 << 10         # the content key's scoring settings, as canonical JSON
MAX_SOURCES = 1024                  # provenance: stores values were reused from
MAX_SOURCE_PATH = 4096              # provenance: characters of a source's path or URL
MIN_FIXED_SCALE, MAX_FIXED_SCALE = -1.0, -(2.0**-24)
ZSTD_LEVEL = 3
BLOSC_CLEVEL = 5


@dataclasses.dataclass(frozen=True)
class RaggedSpec:
    """How one ragged field is stored."""

    name: str
    dtype: str
    codec: str
    scale: float | None = None  # fixed point: value = code * scale

    def header(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "ragged", "dtype": self.dtype, "codec": self.codec}
        if self.scale is not None:
            out["scale"] = self.scale
        return out


def id_hashes(ids: Any) -> np.ndarray:
    """64-bit hashes of example IDs: the first 8 bytes of BLAKE2b (digest size 8) of the UTF-8 bytes, read as a
    little-endian unsigned integer."""
    import hashlib

    out = np.empty(len(ids), dtype=np.uint64)
    for i, key in enumerate(ids):
        out[i] = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return out


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def ragged_specs(vocab_size: int, token_codec: str, per_token: bool, logp_codec: str,
                 fixed_scale: float = DEFAULT_FIXED_SCALE, kind: Kind = PAIRS) -> list[RaggedSpec]:
    if token_codec not in TOKEN_CODECS:
        raise ValueError(f"unknown token codec {token_codec!r}; choose one of {', '.join(TOKEN_CODECS)}")
    specs = [RaggedSpec(name, token_dtype(vocab_size), token_codec) for name in kind.token_fields]
    if per_token:
        if logp_codec not in LOGP_CODECS:
            raise ValueError(f"unknown per-token codec {logp_codec!r}; choose one of {', '.join(LOGP_CODECS)}")
        if logp_codec == "fixed" and not fixed_scale < 0:
            raise ValueError(f"fixed-point scale must be negative, got {fixed_scale}")
        dtype = {"fixed": "uint16", "float16": "float16", "float32": "float32", "raw": "float32"}[logp_codec]
        scale = fixed_scale if logp_codec == "fixed" else None
        specs += [RaggedSpec(name, dtype, logp_codec, scale) for name in kind.per_token_fields]
    return specs


def spec_from_header(name: str, entry: dict[str, Any]) -> RaggedSpec:
    return RaggedSpec(name, entry["dtype"], entry["codec"], entry.get("scale"))


def ragged_from_header(header: dict[str, Any]) -> list[RaggedSpec]:
    """The ragged fields of a header in the format's order (token ids, then per-token values), whatever the order
    of the header's keys (canonical JSON sorts them)."""
    fields, kind = header["fields"], kind_of(header)
    return [spec_from_header(name, fields[name]) for name in kind.token_fields + kind.per_token_fields
            if name in fields]


# ---- file keys -------------------------------------------------------------------------------------------------

def values_array(field: str) -> str:
    return f"{field}/values"


def offsets_array(field: str) -> str:
    return f"{field}/offsets"


def shard_file_arrays(ragged: list[RaggedSpec], kind: Kind = PAIRS, teacher: bool = False) -> list[str]:
    """Arrays with exactly one chunk file per shard, in `commits` column order; a store with teacher records ends
    with one teacher file per side (logitstore/teacher_store.py)."""
    names = [*kind.row_fields, CONTENT_KEY]
    for spec in ragged:
        names += [offsets_array(spec.name), values_array(spec.name)]
    if teacher:
        names += [f"teacher/{side.ids[:-len('_ids')]}" for side in kind.sides]
    return names


def chunk_key(array: str, shard: int) -> str:
    """Key of shard `shard`'s file of `array` (zarr v3 default chunk key encoding)."""
    if array.endswith("/offsets") or array == CONTENT_KEY:  # two-dimensional: one chunk column
        return f"{array}/c/{shard}/0"
    return f"{array}/c/{shard}"


# The arrays written once when a store is planned, stored uncompressed (memory-mapped by the reader): each is one
# chunk, so one file, of exactly `items * itemsize` bytes.
PLAN_FILES = {  # file key -> (array, dtype, values per example or None for the ID bytes)
    "ids/values/c/0": ("ids/values", "uint8", None),
    "ids/offsets/c/0/0": ("ids/offsets", "int64", 2),
    "id_index/hash/c/0": ("id_index/hash", "uint64", 1),
    "id_index/row/c/0": ("id_index/row", "int64", 1),
}


def plan_file_keys() -> list[str]:
    return list(PLAN_FILES)


def plan_file_size(key: str, num_examples: int, id_bytes: int) -> int:
    _, dtype, per_example = PLAN_FILES[key]
    items = id_bytes if per_example is None else num_examples * per_example
    return items * np.dtype(dtype).itemsize


# ---- the completeness record -----------------------------------------------------------------------------------

COMMIT_FILE_WORDS = 5  # per shard file: byte size, then its SHA-256 as four little-endian uint64 words


def commit_width(num_files: int) -> int:
    return 2 + COMMIT_FILE_WORDS * num_files


def commit_entry(data: bytes | memoryview | None) -> list[int]:
    """The commit words of one file: [size, sha256 words]; all zeros for an absent file."""
    import hashlib

    if data is None:
        return [0] * COMMIT_FILE_WORDS
    digest = hashlib.sha256(data).digest()
    return [len(data), *np.frombuffer(digest, dtype="<u8").tolist()]


def commit_file(row: np.ndarray, column: int) -> tuple[int, bytes]:
    """(size, sha256 digest) of file `column` of a commit row."""
    start = 2 + COMMIT_FILE_WORDS * column
    return int(row[start]), np.asarray(row[start + 1:start + 5], dtype="<u8").tobytes()


def data_bytes(document_sizes: Iterable[int], plan_files: Mapping[str, Any], commits: np.ndarray) -> int:
    """`summary.data_bytes` of a store whose shards are all committed: the recorded sizes of every file but the root
    zarr.json (the other metadata documents, the plan files, the commit files and every shard file)."""
    num_files = (commits.shape[1] - 2) // COMMIT_FILE_WORDS
    shard_files = int(commits[:, 2::COMMIT_FILE_WORDS][:, :num_files].sum(dtype=np.uint64))
    commit_files = commits.shape[0] * (8 * commits.shape[1] + 4)
    return int(sum(document_sizes)) + sum(int(size) for size, _ in plan_files.values()) + commit_files + shard_files


# ---- canonical JSON and the metadata every array must have -----------------------------------------------------

def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only (other characters as \\uXXXX), no NaN or infinity, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def strict_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON, refusing NaN/Infinity, duplicate keys and absurd nesting (raises ValueError)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None


def _bytes_codec(dtype: str) -> dict[str, Any]:
    if np.dtype(dtype).itemsize == 1:
        return {"name": "bytes"}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def _zstd_codec() -> dict[str, Any]:
    return {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}


def _fill_json(fill: Any) -> Any:
    return "NaN" if isinstance(fill, float) and math.isnan(fill) else fill


def _array(shape: list[int], dtype: str, chunks: list[int], codecs: list[dict[str, Any]], fill: Any = 0,
           attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "zarr_format": 3, "node_type": "array", "shape": shape, "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_json(fill), "codecs": codecs, "attributes": attributes or {},
        "storage_transformers": [],
    }


def _inner_codecs_json(spec: RaggedSpec) -> list[dict[str, Any]]:
    codecs = [_bytes_codec(spec.dtype)]
    if spec.codec == "zstd":
        codecs.append(_zstd_codec())
    elif spec.codec != "raw":
        codecs.append({"name": "blosc", "configuration": {"typesize": np.dtype(spec.dtype).itemsize, "cname": "zstd",
                                                           "clevel": BLOSC_CLEVEL, "shuffle": "shuffle",
                                                           "blocksize": 0}})
    return codecs


GROUP_METADATA = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def root_metadata(header: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": {HEADER_KEY: header}}


def metadata_documents(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every zarr.json of a store except the root, keyed by file key: exactly what the header implies.

    The writer writes these documents and the reader requires them, so no store content chooses a dtype, codec,
    chunk grid or key encoding.
    """
    n, rps, shards = header["num_examples"], header["rows_per_shard"], header["num_shards"]
    cap, inner, id_bytes = header["shard_capacity"], header["inner_chunk"], header["id_bytes"]
    ragged = ragged_from_header(header)
    docs: dict[str, dict[str, Any]] = {}
    for group in ("ids", "id_index", *(spec.name for spec in ragged)):
        docs[f"{group}/zarr.json"] = dict(GROUP_METADATA)
    docs["ids/values/zarr.json"] = _array([id_bytes], "uint8", [max(id_bytes, 1)], [_bytes_codec("uint8")])
    docs["ids/offsets/zarr.json"] = _array([n, 2], "int64", [n, 2], [_bytes_codec("int64")])
    docs["id_index/hash/zarr.json"] = _array([n], "uint64", [n], [_bytes_codec("uint64")])
    docs["id_index/row/zarr.json"] = _array([n], "int64", [n], [_bytes_codec("int64")])
    for name, (dtype, fill) in kind_of(header).row_fields.items():
        docs[f"{name}/zarr.json"] = _array([n], dtype, [rps], [_bytes_codec(dtype), _zstd_codec()], fill)
    docs[f"{CONTENT_KEY}/zarr.json"] = _array([n, CONTENT_KEY_WIDTH], "uint8", [rps, CONTENT_KEY_WIDTH],
                                              [_bytes_codec("uint8"), _zstd_codec()])
    for spec in ragged:
        docs[f"{offsets_array(spec.name)}/zarr.json"] = _array([n, 2], "int64", [rps, 2],
                                                               [_bytes_codec("int64"), _zstd_codec()])
        sharding = {"name": "sharding_indexed", "configuration": {
            "chunk_shape": [inner], "codecs": _inner_codecs_json(spec),
            "index_codecs": [_bytes_codec("uint64"), {"name": "crc32c"}], "index_location": "end"}}
        docs[f"{values_array(spec.name)}/zarr.json"] = _array(
            [shards * cap], spec.dtype, [cap], [sharding], 0, {"scale": spec.scale} if spec.scale is not None else None)
    if "teacher" in header:  # a group, so that Zarr readers see the folder as one; its files are not Zarr arrays
        docs["teacher/zarr.json"] = dict(GROUP_METADATA)
    width = commit_width(len(header["shard_files"]))
    docs["commits/zarr.json"] = _array([shards, width], "uint64", [1, width],
                                       [_bytes_codec("uint64"), {"name": "crc32c"}])
    return docs


@dataclasses.dataclass(frozen=True)
class Geometry:
    num_examples: int
    rows_per_shard: int
    max_length: int
    inner_chunk: int

    def __post_init__(self) -> None:
        for name in ("num_examples", "rows_per_shard", "max_length", "inner_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.rows_per_shard)

    @property
    def shard_capacity(self) -> int:
        cap = self.rows_per_shard * self.max_length
        return -(-cap // self.inner_chunk) * self.inner_chunk  # whole inner chunks

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, self.num_examples))

    def header(self) -> dict[str, int]:
        return {
            "num_examples": self.num_examples,
            "rows_per_shard": self.rows_per_shard,
            "num_shards": self.num_shards,
            "max_length": self.max_length,
            "shard_capacity": self.shard_capacity,
            "inner_chunk": self.inner_chunk,
        }
