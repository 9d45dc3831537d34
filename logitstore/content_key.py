"""The content key of a pair: what its reference values depend on besides the model, in 16 bytes.

Two pairs with equal keys have the same prompt, chosen and rejected token ids (after truncation) and were scored
under the same scoring settings, so a model with the same fingerprint gives them the same values whatever their
example IDs. That is what lets a build reuse another store's values (docs/FORMAT.md, "Content key").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KEY_BYTES = 16
VERSION = 1
_DOMAIN = b"logitstore content key v1\n"


def _length(n: int) -> bytes:
    return int(n).to_bytes(8, "little")


def _prefix(scoring: Mapping[str, Any]) -> Any:
    """The hash state after the domain tag and the scoring settings, shared by every pair of a store."""
    settings = json.dumps(scoring, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(_DOMAIN)
    h.update(_length(len(settings)))
    h.update(settings)
    return h


def _token_bytes(ids: Any) -> bytes:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= 2**32)):
        raise ValueError("token ids must be a 1-D sequence of integers in [0, 2^32)")
    return _length(a.size) + a.astype("<u4").tobytes()


def content_keys(prompt_ids: Sequence[Any], chosen_ids: Sequence[Any], rejected_ids: Sequence[Any],
                 scoring: Mapping[str, Any]) -> np.ndarray:
    """Keys of pairs given as parallel sequences of token id arrays: uint8 [n, 16]."""
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError("prompt, chosen and rejected ids must have one entry per pair")
    prefix = _prefix(scoring)
    out = np.empty((len(prompt_ids), KEY_BYTES), dtype=np.uint8)
    for i, parts in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        h = prefix.copy()
        for ids in parts:
            h.update(_token_bytes(ids))
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


def content_key(prompt_ids: Any, chosen_ids: Any, rejected_ids: Any, scoring: Mapping[str, Any]) -> bytes:
    """The 16-byte key of one pair."""
    return content_keys([prompt_ids], [chosen_ids], [rejected_ids], scoring)[0].tobytes()
