"""Distillation losses on a stored teacher distribution, as small pure functions.

The divergences are TRL 1.16's ``DistillationTrainer`` definitions (``ChunkedDivergenceFunction``): ``beta = 0`` is
the forward KL(teacher || student), ``beta = 1`` the reverse KL(student || teacher), anything in between the
generalized JSD ``beta * KL(t || m) + (1 - beta) * KL(s || m)`` with mixture ``m = (1 - beta) s + beta t``.

A top-k record does not hold the whole teacher distribution, so the divergence is taken over K + 1 buckets: the K
stored tokens and one tail bucket holding the rest of the mass (the teacher's stored tail log-mass; the student's
logsumexp over the tokens outside the K). With K = V there is no tail and the loss and its gradient are the exact
full-logit ones; with K < V the bucketed divergence is a lower bound of the full one (merging outcomes never
raises an f-divergence), and ``benchmarks/test_topk.py`` reports by how much.

A sampled record (Sparse Logit Sampling) holds K draws from the teacher as distinct ids with counts. Its loss is
KL(empirical || student) over the drawn tokens with the empirical ``counts / K``: its gradient in the student's
logits, ``softmax(student) - counts / K``, is an unbiased estimate of the forward KL's ``softmax(student) - p``.
Only the forward KL has such an estimator; other betas are refused.

The trainer's path (:func:`divergences`; through the LM head slice by slice, :func:`dpo.model.head.head_divergences`)
computes every beta the objective reads from one pass over the logits and renormalizes a top-k record's buckets (a
quantized record need not sum to 1).
"""

from __future__ import annotations

import math

import torch


def log_divergence(log_t: torch.Tensor, log_s: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row divergence between two distributions given as log-probs over the last dimension."""
    def kl(log_a, log_b):  # Σ a (log a - log b), with 0 · log 0 = 0 and no NaN gradient from the unused branch
        a = torch.exp(log_a)
        safe_a = torch.where(a > 0, log_a, torch.zeros_like(log_a))
        safe_b = torch.where(a > 0, log_b, torch.zeros_like(log_b))
        return (a * (safe_a - safe_b)).sum(-1)

    if beta == 0.0:
        return kl(log_t, log_s)
    if beta == 1.0:
        return kl(log_s, log_t)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


def check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"--distill-beta must be in [0, 1], got {beta}")


def top_k_divergence(student_logits: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor, tail_logp: torch.Tensor,
                     beta: float = 0.0) -> torch.Tensor:
    """Per-position divergence [N] between the student (`student_logits` [N, V]) and a top-k teacher record
    (`ids` [N, K] long, `logps` [N, K], `tail_logp` [N]) over the K stored tokens and one tail bucket."""
    check_beta(beta)
    t_k, s_k = _buckets(torch.log_softmax(student_logits.float(), dim=-1), ids, logps, tail_logp)
    return log_divergence(t_k, s_k, beta)


def _buckets(log_s: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor, tail_logp: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the K stored tokens and, for K < V, one tail bucket."""
    vocab, k = log_s.shape[-1], ids.shape[-1]
    if k > vocab:
        raise ValueError(f"the record holds {k} tokens per position, more than the student's vocabulary ({vocab})")
    s_k = log_s.gather(-1, ids)
    t_k = logps.float()
    if k < vocab:
        rest = log_s.scatter(-1, ids, float("-inf"))
        s_k = torch.cat([s_k, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)
        t_k = torch.cat([t_k, tail_logp.float().unsqueeze(-1)], dim=-1)
    return t_k, s_k


def sampled_divergence(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                       beta: float = 0.0) -> torch.Tensor:
    """Per-position KL(empirical || student) [N] of a sampled record (`ids`, `counts` [N, K'], padding count 0);
    its gradient is unbiased for the forward KL's."""
    check_beta(beta)
    if beta != 0.0:
        raise ValueError("a sampled teacher supports only the forward KL (--distill-beta 0)")
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    counts = counts.float()
    draws = counts.sum(-1, keepdim=True).clamp(min=1.0)
    q = counts / draws
    log_q = torch.where(q > 0, torch.log(q.clamp(min=1e-30)), torch.zeros_like(q))
    return (q * (log_q - log_s.gather(-1, ids))).sum(-1)


def full_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """The exact per-position divergence from full teacher logits (what the stored records approximate)."""
    check_beta(beta)
    return log_divergence(torch.log_softmax(teacher_logits.float(), -1), torch.log_softmax(student_logits.float(), -1),
                       beta)


def sequence_kl(policy_logits: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor, tail_logp: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """TDPO's sequential KL, Σ_t KL(π_ref(·|x, y<t) || π(·|x, y<t)) [B], from a stored top-k reference record.

    `policy_logits` [B, T, V], `ids`/`logps` [B, T, K], `tail_logp` [B, T], `mask` [B, T] marks scored positions."""
    b, t, v = policy_logits.shape
    per_position = top_k_divergence(policy_logits.reshape(b * t, v), ids.reshape(b * t, -1),
                                    logps.reshape(b * t, -1), tail_logp.reshape(b * t), 0.0).reshape(b, t)
    return (per_position * mask).sum(-1)


def tdpo_loss(chosen_margin: torch.Tensor, rejected_margin: torch.Tensor, chosen_kl: torch.Tensor,
              rejected_kl: torch.Tensor, beta: float, *, alpha: float = 0.5, variant: str = "tdpo2",
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO (Zeng et al. 2024, eq. 14 for TDPO1 and 16 for TDPO2, as the authors' ``tdpo_loss`` computes them).

    ``*_margin`` [B]: Σ_t log π - log π_ref over each completion; ``*_kl`` [B]: :func:`sequence_kl`.
    TDPO1: -log σ(β (margin_w - margin_l - (kl_l - kl_w))); TDPO2 scales the KL difference by α and stops the
    gradient through the chosen side's KL. Returns (per-pair losses, chosen rewards, rejected rewards), the rewards
    β (margin + kl), detached."""
    if variant == "tdpo1":
        logits = chosen_margin - rejected_margin - (rejected_kl - chosen_kl)
    elif variant == "tdpo2":
        logits = chosen_margin - rejected_margin - alpha * (rejected_kl - chosen_kl.detach())
    else:
        raise ValueError(f"unknown TDPO variant {variant!r}; choose from tdpo1, tdpo2")
    losses = -torch.nn.functional.logsigmoid(beta * logits)
    return losses, beta * (chosen_margin + chosen_kl).detach(), beta * (rejected_margin + rejected_kl).detach()


def divergences(student_logits: torch.Tensor, ids: torch.Tensor, *, logps: torch.Tensor | None = None,
                tail_logp: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                betas: tuple[float, ...] = (0.0,)) -> torch.Tensor:
    """Per-position divergences [N, len(betas)] of a top-k record (`logps`, `tail_logp`) or a sampled one
    (`counts`), one column per beta, from one log-softmax of the student's logits: what the trainer computes.

    Unlike :func:`top_k_divergence`, the top-k record's K (+ 1 tail) bucket log-probs are renormalized first, as
    ``teacher.reconstruct`` does: a record with quantized values need not sum to exactly 1, and a KL to an
    unnormalized record can fall below 0 (it did, by 3e-4 nats, on a `standard` record of the model itself)."""
    if counts is not None:
        return torch.stack([sampled_divergence(student_logits, ids, counts, b) for b in betas], dim=-1)
    for b in betas:
        check_beta(b)
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    t_k, s_k = _buckets(log_s, ids, logps, tail_logp)  # type: ignore[arg-type]
    t_k = t_k - torch.logsumexp(t_k, dim=-1, keepdim=True)
    return torch.stack([log_divergence(t_k, s_k, b) for b in betas], dim=-1)


