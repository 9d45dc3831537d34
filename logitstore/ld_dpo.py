"""LD-DPO reference values from a store's per-token log-probs, for any ``ld_alpha``, at read time.

LD-DPO (Liu et al. 2024, arXiv:2409.06411) weights each sequence's log-prob as ``shared + α · tail``: the first
``min(|chosen|, |rejected|)`` scored tokens of the pair count fully, the longer completion's remaining tokens by α.
The reference side therefore depends on α and on the pair, so a store of sums cannot serve it; a store with
per-token values serves every α from one build. The tail is taken as the stored sum minus the shared prefix, so
α = 1 gives back the stored sum, and with the ``fixed`` codec (every prefix sum within |scale|/2) the result is
within (1 - α) · |scale|/2 of the exact value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import LogitstoreError
from .format import PER_TOKEN_FIELDS


def require_per_token(store: Any) -> None:
    """Refuse a store that cannot serve LD-DPO."""
    if not store.has_per_token:
        raise LogitstoreError(f"{store.location.url} holds no per-token reference log-probs, which LD-DPO (ld_alpha) "
                              "needs; build the store with --per-token")


def ld_reference(chosen_token_logps: Sequence[np.ndarray], rejected_token_logps: Sequence[np.ndarray],
                 chosen_logps: np.ndarray, rejected_logps: np.ndarray, ld_alpha: float,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """LD-weighted reference log-probs (float32) of pairs from their per-token values and stored sums."""
    shared = np.fromiter((min(len(c), len(r)) for c, r in zip(chosen_token_logps, rejected_token_logps)),
                         dtype=np.int64, count=len(chosen_token_logps))
    out = []
    for tokens, sums in ((chosen_token_logps, chosen_logps), (rejected_token_logps, rejected_logps)):
        prefix = np.array([np.asarray(t, dtype=np.float64)[:k].sum() for t, k in zip(tokens, shared)],
                          dtype=np.float64)
        total = np.asarray(sums, dtype=np.float64)
        out.append((prefix + ld_alpha * (total - prefix)).astype(np.float32))
    return out[0], out[1]


def store_ld_reference(store: Any, rows: np.ndarray, ld_alpha: float, *, chunk: int = 4096,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ld_reference` of the given rows of `store`, read `chunk` rows at a time."""
    require_per_token(store)
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    for start in range(0, rows.size, chunk):
        part = rows[start:start + chunk]
        sums = store.row_values(part)
        chosen, rejected = (store.ragged(f, part) for f in PER_TOKEN_FIELDS)
        parts.append(ld_reference(chosen, rejected, sums["chosen_logps"], sums["rejected_logps"], ld_alpha))
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
