"""The store layout as data: array names, dtypes, codecs and file keys (docs/FORMAT.md in code).

Every other module takes names and keys from here, so the layout is written down once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FORMAT_VERSION = 1
HEADER_KEY = "logitstore"

# Per-row arrays: name -> (dtype, fill value). NaN marks a sum that was never written.
ROW_FIELDS: dict[str, tuple[str, Any]] = {
    "chosen_logps": ("float32", float("nan")),
    "rejected_logps": ("float32", float("nan")),
    "chosen_tokens": ("int32", -1),
    "rejected_tokens": ("int32", -1),
}
# Per-row content key: 16 bytes per row (chunks of (rows_per_shard, 16)), declared in the header as
# {"kind": "row", "dtype": "uint8", "width": 16}; defined in logitstore/content_key.py and docs/FORMAT.md.
CONTENT_KEY = "content_key"
CONTENT_KEY_WIDTH = 16
TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
PER_TOKEN_FIELDS = ("chosen_token_logps", "rejected_token_logps")

TOKEN_CODECS = ("zstd", "raw")
LOGP_CODECS = ("fixed", "float16", "float32", "raw")
DEFAULT_FIXED_SCALE = -(2.0**-7)  # sum error <= 2^-8 nats; 1.44 B/token on hh-rlhf (docs/benchmarks.md)
FIXED_MAX_CODE = np.iinfo(np.uint16).max

ROWS_PER_SHARD = 1024
INNER_CHUNK = 8192


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


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def ragged_specs(vocab_size: int, token_codec: str, per_token: bool, logp_codec: str,
                 fixed_scale: float = DEFAULT_FIXED_SCALE) -> list[RaggedSpec]:
    if token_codec not in TOKEN_CODECS:
        raise ValueError(f"unknown token codec {token_codec!r}; choose one of {', '.join(TOKEN_CODECS)}")
    specs = [RaggedSpec(name, token_dtype(vocab_size), token_codec) for name in TOKEN_FIELDS]
    if per_token:
        if logp_codec not in LOGP_CODECS:
            raise ValueError(f"unknown per-token codec {logp_codec!r}; choose one of {', '.join(LOGP_CODECS)}")
        if logp_codec == "fixed" and not fixed_scale < 0:
            raise ValueError(f"fixed-point scale must be negative, got {fixed_scale}")
        dtype = {"fixed": "uint16", "float16": "float16", "float32": "float32", "raw": "float32"}[logp_codec]
        scale = fixed_scale if logp_codec == "fixed" else None
        specs += [RaggedSpec(name, dtype, logp_codec, scale) for name in PER_TOKEN_FIELDS]
    return specs


def spec_from_header(name: str, entry: dict[str, Any]) -> RaggedSpec:
    return RaggedSpec(name, entry["dtype"], entry["codec"], entry.get("scale"))


def inner_codecs(spec: RaggedSpec) -> dict[str, Any]:
    """zarr-python keyword arguments (serializer/compressors) for a ragged field's inner chunks."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if spec.codec == "raw":
        return {"compressors": None}
    if spec.codec == "zstd":
        return {"compressors": [ZstdCodec(level=3)]}
    typesize = np.dtype(spec.dtype).itemsize
    return {"compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=typesize)]}


def row_compressors() -> list[Any]:
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=3)]


# ---- file keys -------------------------------------------------------------------------------------------------

def values_array(field: str) -> str:
    return f"{field}/values"


def offsets_array(field: str) -> str:
    return f"{field}/offsets"


def shard_file_arrays(ragged: list[RaggedSpec]) -> list[str]:
    """Arrays with exactly one chunk file per shard, in `commits` column order."""
    names = [*ROW_FIELDS, CONTENT_KEY]
    for spec in ragged:
        names += [offsets_array(spec.name), values_array(spec.name)]
    return names


def chunk_key(array: str, shard: int) -> str:
    """Key of shard `shard`'s file of `array` (zarr v3 default chunk key encoding)."""
    if array.endswith("/offsets") or array == CONTENT_KEY:  # two-dimensional: one chunk column
        return f"{array}/c/{shard}/0"
    return f"{array}/c/{shard}"


PLAN_ARRAYS = ("ids/values", "ids/offsets", "id_index/hash", "id_index/row")


def plan_file_keys() -> list[str]:
    return ["ids/values/c/0", "ids/offsets/c/0/0", "id_index/hash/c/0", "id_index/row/c/0"]


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
