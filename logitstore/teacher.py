"""A teacher's next-token distribution, reduced to what distillation stores: top-k or sampled tokens.

Pure numpy, one position per row of a ``[N, V]`` logits array:

- :func:`top_k` keeps the K most likely tokens, their log-probs and the log of the remaining mass. The tail is a
  logsumexp over the tokens left out, never ``log(1 - sum(p))``: in float32 that difference is rounding noise once
  the kept mass is close to 1, which it is for large K.
- :func:`sample` draws K tokens from the distribution and keeps the distinct ones with their counts (the Sparse
  Logit Sampling estimator: ``counts / K`` is an unbiased estimate of the teacher's probabilities). Draws are a
  function of ``(seed, stream)`` and the logits alone, so a resumed or re-sharded build draws the same tokens.
- :func:`reconstruct` turns a top-k record back into a full distribution: the tail mass spread over the tokens left
  out in proportion to a prior when one is given (the shard context's, built from :func:`tail_mass`), evenly
  otherwise. That is how fidelity is measured (KL(teacher || reconstruction)).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import LogitstoreError


class TeacherError(LogitstoreError, ValueError):
    """A top-k or sampling request that cannot be met (K out of range, malformed logits)."""


@dataclasses.dataclass(frozen=True)
class TopK:
    ids: np.ndarray  # [N, K] int32, most likely first (ties: smaller id first)
    logps: np.ndarray  # [N, K] float32, non-increasing along each row
    tail_logp: np.ndarray  # [N] float32, log of the mass outside the K tokens; -inf when K = V


@dataclasses.dataclass(frozen=True)
class Sampled:
    ids: np.ndarray  # [N, K] int32, distinct sampled tokens, smaller id first; padding (count 0) last, id 0
    counts: np.ndarray  # [N, K] uint16, draws of each token; each row sums to K
    k: int  # draws per position


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (the precision the tail's logsumexp needs)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise TeacherError(f"logits must be [positions, vocabulary], got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise TeacherError("logits hold a NaN or infinite value")
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def _check_k(k: int, vocab: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise TeacherError(f"{what} must be a positive integer, got {k!r}")
    if what == "--top-k" and k > vocab:
        raise TeacherError(f"{what} {k} is larger than the vocabulary ({vocab} tokens)")


def top_k(logits: np.ndarray, k: int) -> TopK:
    """The K most likely next tokens of each position, their log-probs and the log of the rest's mass."""
    logps = log_softmax(logits)
    n, vocab = logps.shape
    _check_k(k, vocab, "--top-k")
    if k == vocab:
        order = np.argsort(-logps, axis=1, kind="stable")
    else:
        part = np.argpartition(-logps, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # ascending ids, so the stable sort below breaks ties by id
        order = np.take_along_axis(part, np.argsort(-np.take_along_axis(logps, part, 1), axis=1, kind="stable"), 1)
    kept = np.take_along_axis(logps, order, axis=1)
    rest = logps.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    top = rest.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        safe_top = np.where(np.isfinite(top), top, 0.0)
        tail = (safe_top + np.log(np.exp(rest - safe_top).sum(axis=1, keepdims=True)))[:, 0]
    tail = np.where(np.isfinite(top[:, 0]), tail, -np.inf)
    return TopK(order.astype(np.int32), kept.astype(np.float32), tail.astype(np.float32))


def sample(logits: np.ndarray, k: int, *, seed: int, stream: int = 0) -> Sampled:
    """K draws with replacement from each position's distribution, as distinct ids with counts.

    The draws depend only on ``(seed, stream)`` and the logits: a build passes the row number as `stream` so that
    any row is drawn the same way whichever shard or rank computes it."""
    logps = log_softmax(logits)
    n, vocab = logps.shape
    _check_k(k, vocab, "--sample-k")
    if k > np.iinfo(np.uint16).max:
        raise TeacherError(f"--sample-k {k} is too large (at most {np.iinfo(np.uint16).max})")
    rng = np.random.default_rng([int(seed), int(stream)])
    cdf = np.cumsum(np.exp(logps), axis=1)
    u = rng.random((n, k)) * cdf[:, -1:]  # scaled by the row's own total: no draw falls past the last token
    draws = np.empty((n, k), np.int64)
    for i in range(n):
        draws[i] = np.minimum(np.searchsorted(cdf[i], u[i], side="right"), vocab - 1)
    keys, cnt = np.unique(np.arange(n)[:, None] * vocab + draws, return_counts=True)  # sorted by row, then id
    row = keys // vocab
    col = np.arange(keys.size) - np.searchsorted(row, row)  # place within its row
    ids = np.zeros((n, k), np.int32)
    counts = np.zeros((n, k), np.uint16)
    ids[row, col], counts[row, col] = keys % vocab, cnt
    return Sampled(ids, counts, int(k))


def tail_mass(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[V] float64: each token's teacher probability summed over the positions where it is not among `ids` ([N, K],
    the record's tokens). A build adds this up over a shard and passes it to ``topk_codec.vocab_order(...,
    tail_mass=)``: the prior that :func:`reconstruct` spreads each position's tail by."""
    p = np.exp(log_softmax(logits))
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 2 or ids.shape[0] != p.shape[0]:
        raise TeacherError(f"ids must be [positions, K] with {p.shape[0]} positions, got shape {tuple(ids.shape)}")
    np.put_along_axis(p, ids, 0.0, axis=1)
    return p.sum(axis=0)


def _tail_weights(record: TopK, vocab: int, prior: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Log-weights [V] of the tokens the tail is spread over and, per position, the log of their sum over the
    tokens outside that position's K."""
    n, k = record.ids.shape
    if prior is None:
        return np.zeros(vocab), np.full(n, np.log(vocab - k) if k < vocab else -np.inf)
    w = np.asarray(prior, np.float64)
    if w.shape != (vocab,) or not (np.isfinite(w) & (w <= 0)).all():
        raise TeacherError(f"prior must be [V] finite log-weights <= 0, V = {vocab}")
    weights = np.exp(w)
    kept = weights[record.ids.astype(np.int64)].sum(axis=1)
    with np.errstate(divide="ignore"):
        return w, np.log(np.maximum(weights.sum() - kept, 0.0))


def reconstruct(record: TopK, vocab: int, prior: np.ndarray | None = None) -> np.ndarray:
    """[N, V] float64 log-probs: the K stored values, and the tail mass spread over the other V - K tokens in
    proportion to `prior` ([V] log-weights, ``ShardContext.log_prior``) or, without one, evenly; renormalized (a
    quantized record need not sum to exactly 1)."""
    n, k = record.ids.shape
    w, log_rest = _tail_weights(record, vocab, prior)
    out = np.empty((n, vocab), np.float64)
    tail = record.tail_logp.astype(np.float64)
    with np.errstate(invalid="ignore"):
        out[:] = np.where(np.isfinite(log_rest)[:, None], (tail - log_rest)[:, None] + w[None, :], -np.inf)
    np.put_along_axis(out, record.ids.astype(np.int64), record.logps.astype(np.float64), axis=1)
    top = out.max(axis=1, keepdims=True)
    return out - top - np.log(np.exp(out - top).sum(axis=1, keepdims=True))


def kl(teacher_logps: np.ndarray, other_logps: np.ndarray) -> np.ndarray:
    """Per-position KL(teacher || other), both [N, V] log-probs, in nats."""
    p = np.exp(teacher_logps)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (teacher_logps - other_logps), 0.0)
    return terms.sum(axis=1)


def reconstruction_kl(teacher_logps: np.ndarray, record: TopK, prior: np.ndarray | None = None) -> np.ndarray:
    """Per-position KL(teacher || reconstruct(record, V, prior)) without building the [N, V] reconstruction: the
    same number as ``kl(teacher_logps, reconstruct(record, V, prior))`` in O(N (K + V)) and no [N, V] output."""
    n, vocab = teacher_logps.shape
    k = record.ids.shape[1]
    w, log_rest = _tail_weights(record, vocab, prior)
    p = np.exp(teacher_logps)
    negentropy = np.where(p > 0, p * teacher_logps, 0.0).sum(axis=1)
    ids = record.ids.astype(np.int64)
    values = record.logps.astype(np.float64)
    tail = record.tail_logp.astype(np.float64)
    has_rest = np.isfinite(log_rest) & np.isfinite(tail)
    # the reconstruction's normalizer: the K values plus the spread tail, whose weights add up to exp(tail)
    both = np.concatenate([values, np.where(has_rest, tail, -np.inf)[:, None]], axis=1)
    top = both.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(both - top).sum(axis=1))
    p_k = np.take_along_axis(p, ids, 1)
    # the teacher's exact mass outside the K and its prior-weighted sum, from its full distribution (a measurement)
    rest = np.maximum(1.0 - p_k.sum(axis=1), 0.0) if k < vocab else np.zeros(n)
    rest_w = p @ w - (p_k * w[ids]).sum(axis=1)
    with np.errstate(invalid="ignore"):
        rest_term = np.where(rest > 0, np.where(has_rest, rest * (tail - log_rest - log_z) + rest_w, -np.inf), 0.0)
    return negentropy - (p_k * (values - log_z[:, None])).sum(axis=1) - rest_term
