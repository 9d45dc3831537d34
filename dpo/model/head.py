"""The LM head over gathered hidden states, slice by slice: per-token log-probs and teacher divergences without
ever holding [batch, sequence, vocab] logits.

Both run the head over the hidden states that predict scored tokens, in slices bounded by ``LOGIT_BYTES`` of
float32 logits. A plain linear head (no bias, logit scale or soft-capping) goes through a custom autograd function
that holds one [slice, vocab] buffer at a time, forward and backward (:class:`_LinearHeadLogps`,
:class:`_LinearHeadDivergences`); any other head recomputes each slice in the backward pass under autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from ..objectives.distill import check_beta, divergences, log_divergence

LOGIT_BYTES = 64 << 20  # float32 logits of one slice (a few such buffers at once; see _LinearHeadLogps)


def split_lm(model: Any) -> tuple[Any, Any, Any]:
    """(backbone, lm_head, config) of a causal LM, looking through a peft wrapper."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, lm.base_model_prefix)
    return backbone, lm.get_output_embeddings(), lm.config


def head_logits(head: Any, config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """float32 logits of hidden rows as the model computes them (its logit scale and final soft-capping)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return logits_of


class _LinearHeadLogps(torch.autograd.Function):
    """log p(label | hidden) through a plain linear LM head, slice by slice, holding one [slice, vocab] buffer.

    Forward keeps only what backward cannot cheaply redo: each row's log Z (one float). Backward recomputes a
    slice's logits and turns them into their own gradient in place (softmax, times -grad, plus grad at the label),
    where autograd through `head(h).float()` and logsumexp would hold five [slice, vocab] tensors at once. The
    forward computes exactly what the generic path does (same matmul, float32 logsumexp and gather), so the
    values match the reference pass bit for bit.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                step: int) -> torch.Tensor:
        values = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_z = torch.empty_like(values)
        for i in range(0, hidden.shape[0], step):
            logits = torch.nn.functional.linear(hidden[i:i + step], weight).float()
            log_z[i:i + step] = torch.logsumexp(logits, dim=-1)
            values[i:i + step] = logits.gather(1, labels[i:i + step, None]).squeeze(1) - log_z[i:i + step]
            del logits
        ctx.save_for_backward(hidden, weight, labels, log_z)
        ctx.step = step
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, labels, log_z = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's matmul precision
            for i in range(0, hidden.shape[0], ctx.step):
                h, g = hidden[i:i + ctx.step], grad[i:i + ctx.step].float()
                # d value / d logit_v = [v == label] - softmax_v, scaled by the incoming gradient.
                probs = torch.nn.functional.linear(h, weight).float()
                probs.sub_(log_z[i:i + ctx.step, None]).exp_().mul_(-g[:, None])
                probs.scatter_add_(1, labels[i:i + ctx.step, None], g[:, None])
                d_logits = probs.to(h.dtype)  # a no-op in float32; in bfloat16 what autograd's cast would give
                del probs
                if grad_hidden is not None:
                    grad_hidden[i:i + ctx.step] = d_logits @ weight
                if grad_weight is not None:
                    grad_weight += (d_logits.T @ h).to(grad_weight.dtype)
                del d_logits
        return grad_hidden, grad_weight, None, None


def _plain_linear(head: Any) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None


def head_logps(hidden: torch.Tensor, labels: torch.Tensor, head: Any, config: Any, *,
                sum_sq: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label | hidden) for rows of `hidden` [M, H], computed in slices of at most LOGIT_BYTES, and, with
    `sum_sq`, log Σ_v p_v² of each row (detached; WPO's weights)."""
    vocab = head.weight.shape[0]
    step = max(1, LOGIT_BYTES // (4 * vocab))
    logits_of = head_logits(head, config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    plain = all(getattr(text_config, name, None) is None for name in ("final_logit_softcapping", "logit_scale"))
    keep = torch.is_grad_enabled() and hidden.requires_grad
    if keep and not sum_sq and plain and _plain_linear(head):
        return _LinearHeadLogps.apply(hidden, head.weight, labels, step), None

    def piece(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = logits_of(h)
        log_z = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, y[:, None]).squeeze(1) - log_z
        if not sum_sq:
            return (picked,)
        with torch.no_grad():
            return picked, torch.logsumexp(2 * logits, dim=-1) - 2 * log_z

    # Other heads (a LoRA-wrapped or softcapped one, WPO's extra output): under autograd each slice is recomputed
    # in the backward pass instead of keeping its [rows, vocab] logits alive until then.
    pieces = [torch.utils.checkpoint.checkpoint(piece, hidden[i:i + step], labels[i:i + step], use_reentrant=False)
              if keep else piece(hidden[i:i + step], labels[i:i + step]) for i in range(0, hidden.shape[0], step)]
    empty = hidden.new_zeros(0, dtype=torch.float32)
    values = torch.cat([p[0] for p in pieces]) if pieces else empty
    if not sum_sq:
        return values, None
    return values, torch.cat([p[1] for p in pieces]) if pieces else empty


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
            values = torch.stack([log_divergence(teacher, s, b) for b in betas], dim=-1)
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
    ``LOGIT_BYTES`` of logits: the trainer's memory bound for the DPO log-probs, held for distillation
    too. A plain linear head (no bias, logit scale or soft-capping) goes through :class:`_LinearHeadDivergences`
    (one [slice, vocab] buffer at a time, forward and backward); any other head recomputes each slice in the
    backward pass under autograd (a few such buffers)."""
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
    pieces = [torch.utils.checkpoint.checkpoint(piece, *(x[s:s + step] for x in inputs), use_reentrant=False)
              if keep else piece(*(x[s:s + step] for x in inputs))
              for s in range(0, hidden.shape[0], step)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, len(betas), dtype=torch.float32)


def head_top_k_divergence(hidden: torch.Tensor, head, config, ids: torch.Tensor, logps: torch.Tensor,
                          tail_logp: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """:func:`top_k_divergence` [M] from hidden states through the LM head, slice by slice (:func:`head_divergences`)."""
    return head_divergences(hidden, head, config, ids, logps=logps, tail_logp=tail_logp, betas=(beta,))[:, 0]
