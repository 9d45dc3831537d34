"""Fixed-point coding of per-token log-probs with error feedback along each sequence.

Rounding each value on its own lets the error of a sum grow with the sequence length. Rounding the running sum
instead keeps every prefix sum of the decoded values within ``|scale|/2`` of the true prefix sum, at any length,
for the price of a per-value error of at most ``|scale|``.
"""

from __future__ import annotations

import numpy as np

from .format import FIXED_MAX_CODE


def encode_fixed(values: np.ndarray, lengths: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """Codes for the flat values of consecutive sequences of `lengths`; returns (uint16 codes, clipped count).

    `values` are log-probs (<= 0); tiny positive rounding noise is read as 0.
    """
    if not scale < 0:
        raise ValueError(f"scale must be negative, got {scale}")
    x = np.minimum(np.asarray(values, dtype=np.float64), 0.0)
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != x.size:
        raise ValueError(f"lengths add up to {int(lengths.sum())}, but {x.size} values were given")
    floor = (FIXED_MAX_CODE - 1) * scale  # keeps every code <= FIXED_MAX_CODE after error feedback
    clipped = int(np.count_nonzero(x < floor))
    x = np.maximum(x, floor)
    if x.size == 0:
        return np.zeros(0, np.uint16), clipped
    totals = np.cumsum(x / scale)  # running sums in units of scale, non-decreasing
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nonempty = lengths > 0
    base = np.zeros(x.size)
    seg_before = np.where(starts > 0, totals[np.maximum(starts - 1, 0)], 0.0)
    base[starts[nonempty]] = np.diff(np.concatenate([[0.0], seg_before[nonempty]]))
    totals -= np.cumsum(base)  # restart the running sum at each sequence
    rounded = np.rint(totals)
    codes = np.diff(rounded, prepend=0.0)
    codes[starts[nonempty]] = rounded[starts[nonempty]]
    return codes.astype(np.uint16), clipped


def decode_fixed(codes: np.ndarray, scale: float) -> np.ndarray:
    return codes.astype(np.float32) * np.float32(scale)
