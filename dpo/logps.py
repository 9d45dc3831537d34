"""Per-token log-probabilities of completion tokens, without ever holding [batch, sequence, vocab] logits.

The backbone's hidden states are gathered at the positions that predict a completion token, and the LM head plus
log-softmax run over those positions in slices bounded in bytes. Both the reference pass and the trainer use
these functions, so cached and live log-probs are computed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from logitstore.loader import pad_pairs

from .losses import PairLogps, needed_inputs
from .models import input_device
from .objective import Objective

LOGIT_BYTES = 64 << 20  # float32 logits of one slice (a few such buffers at once; see _LinearHeadLogps)


def is_cpu_4bit(model: Any) -> bool:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(lm, "is_loaded_in_4bit", False)) and next(lm.parameters()).device.type == "cpu"


@contextlib.contextmanager
def exact_4bit(model: Any) -> Iterator[None]:
    """Make bitsandbytes use its float32 dequantize-then-matmul path for a 4-bit model on CPU.

    Without gradients, bitsandbytes' CPU kernels compute 4-bit layers in bfloat16 (about 1e-3 nats off per
    sequence), while training (with gradients) dequantizes to float32. Scoring with gradients enabled from the
    embeddings on keeps reference and policy on the same numerics; elsewhere this does nothing.
    """
    if not is_cpu_4bit(model):
        yield
        return
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = lm.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()


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


def _head_logps(hidden: torch.Tensor, labels: torch.Tensor, head: Any, config: Any, *,
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


@dataclasses.dataclass(frozen=True)
class TokenLogps:
    """Per-token values of a padded batch of 2B rows (chosen rows, then rejected), each [2B, T-1], zero off the
    completion. Position t scores token t+1 given tokens <= t, as in TRL (`completion_mask[:, 1:]`)."""

    per_token: torch.Tensor
    scored: torch.Tensor  # bool: positions that score a completion token
    log_sum_sq: torch.Tensor | None = None  # log Σ_v p_v², detached (WPO)
    divergence: torch.Tensor | None = None  # [2B, T-1, betas]: teacher divergences (dpo.distill_step), zero off


def token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                *, sum_sq: bool = False, teacher: Any = None) -> TokenLogps:
    """Per-token log-probs of the completion tokens of right-padded sequences (and log Σ p² with `sum_sq`; the
    per-position divergences to `teacher`'s records, a :class:`dpo.distill_step.TeacherRecords`, from the same
    hidden states)."""
    backbone, head, config = split_lm(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # With layers spread over devices (build --device-map), the last hidden state and the LM head's output may be
    # on other devices than the inputs; the results go back to the inputs' device. A no-op on one device.
    scored = completion_mask[:, 1:].bool().to(hidden.device)
    labels = input_ids[:, 1:].to(hidden.device)[scored]
    rows = hidden[:, :-1][scored]
    values, squares = _head_logps(rows, labels, head, config, sum_sq=sum_sq)
    per_token = hidden.new_zeros(scored.shape, dtype=torch.float32).masked_scatter(scored, values.to(hidden.device))
    if squares is not None:
        squares = hidden.new_zeros(scored.shape, dtype=torch.float32).masked_scatter(scored, squares.to(hidden.device))
        squares = squares.to(input_ids.device)
    divergence = None
    if teacher is not None:  # a second pass of the LM head over the same rows, slice by slice as the first
        per_position = teacher.per_position(rows, scored, head, config)
        divergence = hidden.new_zeros((*scored.shape, per_position.shape[1]), dtype=torch.float32)
        divergence = divergence.masked_scatter(scored[..., None], per_position.to(hidden.device))
        divergence = divergence.to(input_ids.device)
    return TokenLogps(per_token.to(input_ids.device), scored.to(input_ids.device), squares, divergence)


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, T-1] (zero off the completion) and their sums [B] for right-padded sequences."""
    tokens = token_logps(model, input_ids, attention_mask, completion_mask)
    return tokens.per_token, tokens.per_token.sum(dim=1)


def ld_weighted_sums(per_token: torch.Tensor, scored: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's sequence log-probs [2B]: the first min(|chosen|, |rejected|) scored tokens of each pair count
    fully, the longer completion's tail is weighted by `ld_alpha` (TRL 1.16's formula, term for term)."""
    position = scored.long().cumsum(dim=1)
    chosen_lens, rejected_lens = scored.sum(dim=1).chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)
    shared_logps = (per_token * ((position > 0) & (position <= shared))).sum(dim=1)
    tail_logps = (per_token * (position > shared)).sum(dim=1)
    return shared_logps + ld_alpha * tail_logps


def wpo_weights(per_token: torch.Tensor, log_sum_sq: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights [B] (Eq. 2 of arXiv:2406.11827, as TRL 1.16 computes them): exp of each completion's mean
    of log p(token) - log Σ_v p_v², chosen times rejected; no gradient flows through them."""
    lengths = scored.sum(dim=1).clamp_min(1)
    with torch.no_grad():
        aligned = (per_token - log_sum_sq) * scored
    weights = torch.exp(aligned.sum(dim=1) / lengths)
    chosen, rejected = weights.chunk(2, dim=0)
    return chosen * rejected


def pair_logps(tokens: TokenLogps, completion_mask: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, objective: Objective) -> PairLogps:
    """What `objective`'s losses read from one batch: policy and reference log-probs (LD-weighted with
    ``ld_alpha``; the reference must then already be), token counts, the SFT term, WPO weights."""
    if objective.ld_alpha is None:
        logps = tokens.per_token.sum(dim=1)
    else:
        logps = ld_weighted_sums(tokens.per_token, tokens.scored, objective.ld_alpha)
    chosen, rejected = logps.chunk(2, dim=0)
    need = needed_inputs(objective)
    extra: dict[str, Any] = {}
    if "chosen_tokens" in need:
        extra["chosen_tokens"], extra["rejected_tokens"] = completion_mask.sum(dim=1).chunk(2, dim=0)
    if "chosen_token_mean" in need:
        chosen_rows, _ = tokens.per_token.chunk(2, dim=0)
        chosen_scored, _ = tokens.scored.chunk(2, dim=0)
        extra["chosen_token_mean"] = chosen_rows[chosen_scored].mean()
    if "pair_weights" in need:
        if tokens.log_sum_sq is None:
            raise ValueError("WPO weighting needs token_logps(..., sum_sq=True)")
        extra["pair_weights"] = wpo_weights(tokens.per_token, tokens.log_sum_sq, tokens.scored)
    if "distill" in need or "chosen_kl" in need:
        if tokens.divergence is None:
            raise ValueError(f"{', '.join(objective.loss_types)} needs token_logps(..., teacher=records)")
        betas = objective.teacher_betas
    if "distill" in need:  # TRL's reduction: the mean over every scored completion token of the batch
        per_position = tokens.divergence[..., betas.index(objective.distill_divergence)]  # type: ignore[index]
        extra["distill"] = per_position[tokens.scored].mean()
    if "chosen_kl" in need:  # TDPO: Σ_t KL(π_ref || π) over each completion (zero off it)
        kl = tokens.divergence[..., betas.index(0.0)].sum(dim=1)  # type: ignore[index]
        extra["chosen_kl"], extra["rejected_kl"] = kl.chunk(2, dim=0)
    return PairLogps(chosen, rejected, ref_chosen, ref_rejected, **extra)


def _pad(rows: list[torch.Tensor], value: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def pair_logps_full(model: Any, prompts: list[torch.Tensor], chosen: list[torch.Tensor],
                    rejected: list[torch.Tensor], pad_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token log-probs of every scored chosen and rejected token: one forward over prompt+completion."""
    device = input_device(model)  # the first parameter's, or the first GPU of a model spread by device_map
    batch = pad_pairs(prompts, chosen, rejected, pad_id)
    ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
    with torch.no_grad(), exact_4bit(model):
        per_token, _ = sequence_logps(model, ids, attn, comp)
    scored = comp[:, 1:].bool()
    rows = [per_token[i][scored[i]].detach().cpu() for i in range(2 * len(prompts))]
    n = len(prompts)
    return rows[:n], rows[n:]


def _cache_kwarg(backbone: Any) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; use whichever the model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(backbone).forward).parameters else "past_key_values"


def padded_positions(prompts: list[torch.Tensor], chosen: list[torch.Tensor], rejected: list[torch.Tensor],
                     share_prompt: bool) -> int:
    """Positions (padding included) a batch costs: one pass over prompt+completion, or the prompts once and then
    both completions from their cache."""
    n = len(prompts)
    if not share_prompt:
        return 2 * n * max(len(p) + len(c) for p, c in zip(prompts + prompts, list(chosen) + list(rejected)))
    return n * max(map(len, prompts)) + 2 * n * max(max(map(len, chosen)), max(map(len, rejected)))


def pair_logps_shared(model: Any, prompts: list[torch.Tensor], chosen: list[torch.Tensor],
                      rejected: list[torch.Tensor], pad_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Same values as :func:`pair_logps_full`, running each prompt once and both completions from its KV cache.
    Falls back to one pass when padding would make sharing cost more positions than it saves."""
    if any(len(p) == 0 for p in prompts) or (
            padded_positions(prompts, chosen, rejected, True) >= padded_positions(prompts, chosen, rejected, False)):
        return pair_logps_full(model, prompts, chosen, rejected, pad_id)
    with torch.no_grad(), exact_4bit(model):
        backbone, head, config = split_lm(model)
        device = next(model.parameters()).device
        n = len(prompts)
        p_ids, p_mask = _pad(prompts, pad_id, device)
        out = backbone(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        p_len = torch.tensor([len(p) for p in prompts], device=device)
        last_hidden = out.last_hidden_state[torch.arange(n, device=device), p_len - 1]  # predicts token 0
        cache.batch_repeat_interleave(2)  # rows: chosen_0, rejected_0, chosen_1, ...
        completions = [c for pair in zip(chosen, rejected) for c in pair]
        c_ids, c_mask = _pad(completions, pad_id, device)
        positions = p_len.repeat_interleave(2)[:, None] + torch.arange(c_ids.shape[1], device=device)[None, :]
        full_mask = torch.cat([p_mask.repeat_interleave(2, dim=0), c_mask], dim=1)
        hidden = backbone(input_ids=c_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                          **{_cache_kwarg(backbone): cache}).last_hidden_state
        first = _head_logps(last_hidden.repeat_interleave(2, dim=0), c_ids[:, 0], head, config)[0]
        scored = c_mask[:, 1:].bool()
        rest = _head_logps(hidden[:, :-1][scored], c_ids[:, 1:][scored], head, config)[0]
        pieces = torch.split(rest.detach().cpu(), scored.sum(dim=1).tolist())
        rows = [torch.cat([first[i:i + 1].detach().cpu(), pieces[i]]) for i in range(2 * n)]
    return rows[0::2], rows[1::2]
