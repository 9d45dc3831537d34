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

The trainer's path (:func:`divergences`, :func:`head_divergences`, used by ``dpo/distill_step.py``) computes every
beta the objective reads from one pass over the logits, renormalizes a top-k record's buckets (a quantized record
need not sum to 1), and, for a plain linear LM head, holds one [slice, vocab] buffer at a time
(:class:`_LinearHeadDivergences`).
"""

from __future__ import annotations

import math

import torch


def _divergence(log_t: torch.Tensor, log_s: torch.Tensor, beta: float) -> torch.Tensor:
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
    return _divergence(t_k, s_k, beta)


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
    return _divergence(torch.log_softmax(teacher_logits.float(), -1), torch.log_softmax(student_logits.float(), -1),
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
    return torch.stack([_divergence(t_k, s_k, b) for b in betas], dim=-1)


def _teacher_buckets(k: int, vocab: int, logps: torch.Tensor | None, tail_logp: torch.Tensor | None,
                     counts: torch.Tensor | None) -> torch.Tensor:
    """The teacher's log-probs over the buckets [N, K] or [N, K + 1]: a top-k record's K values and, for K < V,
    its tail, renormalized (:func:`divergences`); a sampled record's log(counts / draws), -inf for padding."""
    if counts is not None:
        c = counts.float()
        q = c / c.sum(-1, keepdim=True).clamp(min=1.0)
        return torch.where(q > 0, torch.log(q.clamp(min=1e-30)), torch.full_like(q, float("-inf")))
    t = logps.float()  # type: ignore[union-attr]
    t = torch.cat([t, tail_logp.float().unsqueeze(-1)], dim=-1) if k < vocab else t  # type: ignore[union-attr]
    return t - torch.logsumexp(t, dim=-1, keepdim=True)


class _LinearHeadDivergences(torch.autograd.Function):
    """:func:`divergences` through a plain linear LM head, slice by slice, holding one [slice, vocab] buffer.

    The divergences depend on the logits only through the student's bucket log-probs s_b (the K record tokens
    and, for a top-k record with K < V, the tail). Forward keeps each row's log Z and s_b, and the divergences'
    gradient in s_b (a [rows, betas, buckets] tensor, from autograd on those small tensors). Backward recomputes
    a slice's logits and turns them into their gradient in place: with g_b = dL/ds_b, G = Σ_b g_b and
    p = softmax(logits), dL/dlogit_u = g_b(u) p_u / P_b(u) - p_u G, i.e. g_k - p_u G at a record token and
    p_u (g_tail / P_tail - G) elsewhere (0 - p_u G without a tail bucket).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, teacher, betas, step):  # type: ignore[override]
        n, k = ids.shape
        vocab = weight.shape[0]
        tail = teacher.shape[1] > k
        log_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        s_b = torch.empty(n, teacher.shape[1], dtype=torch.float32, device=hidden.device)
        for i in range(0, n, step):
            logits = torch.nn.functional.linear(hidden[i:i + step], weight).float()
            log_z[i:i + step] = torch.logsumexp(logits, dim=-1)
            s_b[i:i + step, :k] = logits.gather(1, ids[i:i + step]) - log_z[i:i + step, None]
            if tail:  # the tokens outside the record, in log space: the record's logits masked out in place
                s_b[i:i + step, k] = torch.logsumexp(logits.scatter_(1, ids[i:i + step], float("-inf")), -1) \
                    - log_z[i:i + step]
            del logits
        with torch.enable_grad():
            s = s_b.detach().requires_grad_()
            values = torch.stack([_divergence(teacher, s, b) for b in betas], dim=-1)
            jac = torch.stack([torch.autograd.grad(values[:, j].sum(), s, retain_graph=j < len(betas) - 1)[0]
                               for j in range(len(betas))], dim=1) if n else s.new_zeros(0, len(betas), s.shape[1])
        ctx.save_for_backward(hidden, weight, ids, log_z, s_b, jac)
        ctx.step, ctx.tail, ctx.vocab = step, tail, vocab
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return values.detach()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight, ids, log_z, s_b, jac = ctx.saved_tensors
        k = ids.shape[1]
        g = (grad.float()[:, :, None] * jac).sum(dim=1)  # dL/ds_b [n, buckets]
        total = g.sum(dim=1)
        if ctx.tail:  # g_tail / P_tail; no tail mass means no tail gradient to spread
            tail_mass = torch.exp(s_b[:, k])
            per_unit = torch.where(tail_mass > 0, g[:, k] / tail_mass.clamp(min=1e-38), torch.zeros_like(tail_mass))
        else:
            per_unit = torch.zeros_like(total)
        at_ids = g[:, :k] - torch.exp(s_b[:, :k]) * per_unit[:, None]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        device, enabled, dtype = ctx.autocast
        step = ctx.step
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's matmul precision
            for i in range(0, hidden.shape[0], step):
                h, rows = hidden[i:i + step], slice(i, i + step)
                d = torch.nn.functional.linear(h, weight).float()
                d.sub_(log_z[rows, None]).exp_().mul_((per_unit[rows] - total[rows])[:, None])
                d.scatter_add_(1, ids[rows], at_ids[rows])
                d_logits = d.to(h.dtype)
                del d
                if grad_hidden is not None:
                    grad_hidden[rows] = d_logits @ weight
                if grad_weight is not None:
                    grad_weight += (d_logits.T @ h).to(grad_weight.dtype)
                del d_logits
        return grad_hidden, grad_weight, None, None, None, None


def head_divergences(hidden: torch.Tensor, head, config, ids: torch.Tensor, *, logps: torch.Tensor | None = None,
                     tail_logp: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                     betas: tuple[float, ...] = (0.0,)) -> torch.Tensor:
    """:func:`divergences` from hidden states [M, H] through the LM head, in slices of at most
    ``dpo.logps.LOGIT_BYTES`` of logits: the trainer's memory bound for the DPO log-probs, held for distillation
    too. A plain linear head (no bias, logit scale or soft-capping) goes through :class:`_LinearHeadDivergences`
    (one [slice, vocab] buffer at a time, forward and backward); any other head recomputes each slice in the
    backward pass under autograd (a few such buffers)."""
    from torch.utils.checkpoint import checkpoint

    from .logps import LOGIT_BYTES, _plain_linear, head_logits

    for b in betas:
        check_beta(b)
    if counts is not None and any(b != 0.0 for b in betas):
        raise ValueError("a sampled teacher supports only the forward KL (--distill-beta 0)")
    vocab = head.weight.shape[0]
    if ids.shape[-1] > vocab:
        raise ValueError(f"the record holds {ids.shape[-1]} tokens per position, more than the student's vocabulary "
                         f"({vocab})")
    step = max(1, LOGIT_BYTES // (4 * vocab))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    plain = all(getattr(text_config, name, None) is None for name in ("final_logit_softcapping", "logit_scale"))
    keep = torch.is_grad_enabled() and hidden.requires_grad
    if keep and plain and _plain_linear(head):
        teacher = _teacher_buckets(ids.shape[-1], vocab, logps, tail_logp, counts)
        return _LinearHeadDivergences.apply(hidden, head.weight, ids, teacher, tuple(betas), step)

    logits_of = head_logits(head, config)
    record = {"logps": logps, "tail_logp": tail_logp, "counts": counts}
    names = [k for k, v in record.items() if v is not None]

    def piece(h, i, *values):
        return divergences(logits_of(h), i, betas=betas, **dict(zip(names, values)))

    inputs = (hidden, ids, *(record[k] for k in names))
    pieces = [checkpoint(piece, *(x[s:s + step] for x in inputs), use_reentrant=False)
              if keep else piece(*(x[s:s + step] for x in inputs))
              for s in range(0, hidden.shape[0], step)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, len(betas), dtype=torch.float32)


def head_top_k_divergence(hidden: torch.Tensor, head, config, ids: torch.Tensor, logps: torch.Tensor,
                          tail_logp: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """:func:`top_k_divergence` [M] from hidden states through the LM head, slice by slice (:func:`head_divergences`)."""
    return head_divergences(hidden, head, config, ids, logps=logps, tail_logp=tail_logp, betas=(beta,))[:, 0]
