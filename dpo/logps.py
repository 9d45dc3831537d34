"""Per-token log-probabilities of completion tokens, without ever holding [batch, sequence, vocab] logits.

The backbone's hidden states are gathered at the positions that predict a completion token, and the LM head plus
log-softmax run over those positions in slices bounded in bytes. Both the reference pass and the trainer use
these functions, so cached and live log-probs are computed the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from logitstore.loader import pad_pairs

LOGIT_BYTES = 256 << 20  # float32 logits held at once


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


def mixed_precision(device: Any, dtype: str) -> contextlib.AbstractContextManager:
    """The autocast every scoring forward runs under, reference pass and training alike: on CUDA in bfloat16 or
    float16 the policy at step 0 then computes exactly the numerics the store was filled with."""
    enabled = torch.device(device).type == "cuda" and dtype in ("bfloat16", "float16")
    return torch.autocast("cuda", dtype=getattr(torch, dtype) if enabled else torch.bfloat16, enabled=enabled)


def split_lm(model: Any) -> tuple[Any, Any, Any]:
    """(backbone, lm_head, config) of a causal LM, looking through a peft wrapper."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, lm.base_model_prefix)
    return backbone, lm.get_output_embeddings(), lm.config


def _head_logps(hidden: torch.Tensor, labels: torch.Tensor, head: Any, config: Any) -> torch.Tensor:
    """log p(label | hidden) for rows of `hidden` [M, H], computed in slices of at most LOGIT_BYTES."""
    vocab = head.weight.shape[0]
    step = max(1, LOGIT_BYTES // (4 * vocab))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    # Under autograd each slice is recomputed in the backward pass instead of keeping its [rows, vocab] logits
    # (and their float32 copy) alive until then: one extra LM-head matmul buys the memory of every slice but one.
    keep = torch.is_grad_enabled() and hidden.requires_grad
    out = [torch.utils.checkpoint.checkpoint(piece, hidden[i:i + step], labels[i:i + step], use_reentrant=False)
           if keep else piece(hidden[i:i + step], labels[i:i + step]) for i in range(0, hidden.shape[0], step)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, T-1] (zero off the completion) and their sums [B] for right-padded sequences.

    Position t of the result scores token t+1 given tokens <= t, as in TRL (`completion_mask[:, 1:]`).
    """
    backbone, head, config = split_lm(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    scored = completion_mask[:, 1:].bool()
    labels = input_ids[:, 1:][scored]
    values = _head_logps(hidden[:, :-1][scored], labels, head, config)
    per_token = hidden.new_zeros(scored.shape, dtype=torch.float32)
    per_token = per_token.masked_scatter(scored, values)
    return per_token, per_token.sum(dim=1)


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
    device = next(model.parameters()).device
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
        first = _head_logps(last_hidden.repeat_interleave(2, dim=0), c_ids[:, 0], head, config)
        scored = c_mask[:, 1:].bool()
        rest = _head_logps(hidden[:, :-1][scored], c_ids[:, 1:][scored], head, config)
        pieces = torch.split(rest.detach().cpu(), scored.sum(dim=1).tolist())
        rows = [torch.cat([first[i:i + 1].detach().cpu(), pieces[i]]) for i in range(2 * n)]
    return rows[0::2], rows[1::2]
