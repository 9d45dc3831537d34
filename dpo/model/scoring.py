"""Per-token log-probabilities of completion tokens, without ever holding [batch, sequence, vocab] logits.

The backbone's hidden states are gathered at the positions that predict a completion token, and the LM head plus
log-softmax run over those positions in slices bounded in bytes (:mod:`dpo.model.head`). Both the reference pass
and the trainer use these functions, so cached and live log-probs are computed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from logitstore.loader import pad_pairs

from .head import head_logps, split_lm
from .loading import input_device


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


@dataclasses.dataclass(frozen=True)
class TokenLogps:
    """Per-token values of a padded batch of 2B rows (chosen rows, then rejected), each [2B, T-1], zero off the
    completion. Position t scores token t+1 given tokens <= t, as in TRL (`completion_mask[:, 1:]`)."""

    per_token: torch.Tensor
    scored: torch.Tensor  # bool: positions that score a completion token
    log_sum_sq: torch.Tensor | None = None  # log Σ_v p_v², detached (WPO)
    divergence: torch.Tensor | None = None  # [2B, T-1, betas]: teacher divergences (dpo.model.teacher_records), zero off


def token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                *, sum_sq: bool = False, teacher: Any = None) -> TokenLogps:
    """Per-token log-probs of the completion tokens of right-padded sequences (and log Σ p² with `sum_sq`; the
    per-position divergences to `teacher`'s records, a :class:`dpo.model.teacher_records.TeacherRecords`, from the same
    hidden states)."""
    backbone, head, config = split_lm(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # With layers spread over devices (build --device-map), the last hidden state and the LM head's output may be
    # on other devices than the inputs; the results go back to the inputs' device. A no-op on one device.
    scored = completion_mask[:, 1:].bool().to(hidden.device)
    labels = input_ids[:, 1:].to(hidden.device)[scored]
    rows = hidden[:, :-1][scored]
    values, squares = head_logps(rows, labels, head, config, sum_sq=sum_sq)
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


def _pad(rows: list[torch.Tensor], value: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def pad_sides(prompts: Sequence[Any], sides: Sequence[Sequence[Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `completion_mask` of prompt + completion rows, right-padded, side after side:
    for two sides (chosen, rejected) exactly :func:`logitstore.loader.pad_pairs`' layout, which training scores."""
    if len(sides) == 2:
        return pad_pairs(prompts, sides[0], sides[1], pad_id)
    rows = [(p, c) for side in sides for p, c in zip(prompts, side)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    completion = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, (p, c) in enumerate(rows):
        lp, end = len(p), len(p) + len(c)
        ids[i, :lp], ids[i, lp:end] = torch.as_tensor(p), torch.as_tensor(c)
        attention[i, :end] = 1
        completion[i, lp:end] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def sides_logps(model: Any, prompts: list[torch.Tensor], sides: list[list[torch.Tensor]], pad_id: int,
                ) -> list[list[torch.Tensor]]:
    """Per-token log-probs of every scored completion token of each side (a list per side, in input order): one
    forward over the prompt + completion rows of every side."""
    device = input_device(model)  # the first parameter's, or the first GPU of a model spread by device_map
    batch = pad_sides(prompts, sides, pad_id)
    ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
    with torch.no_grad(), exact_4bit(model):
        per_token, _ = sequence_logps(model, ids, attn, comp)
    scored = comp[:, 1:].bool()
    rows = [per_token[i][scored[i]].detach().cpu() for i in range(len(sides) * len(prompts))]
    n = len(prompts)
    return [rows[k * n:(k + 1) * n] for k in range(len(sides))]


def pair_logps_full(model: Any, prompts: list[torch.Tensor], chosen: list[torch.Tensor],
                    rejected: list[torch.Tensor], pad_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token log-probs of every scored chosen and rejected token: one forward over prompt+completion."""
    chosen_rows, rejected_rows = sides_logps(model, prompts, [chosen, rejected], pad_id)
    return chosen_rows, rejected_rows


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
        first = head_logps(last_hidden.repeat_interleave(2, dim=0), c_ids[:, 0], head, config)[0]
        scored = c_mask[:, 1:].bool()
        rest = head_logps(hidden[:, :-1][scored], c_ids[:, 1:][scored], head, config)[0]
        pieces = torch.split(rest.detach().cpu(), scored.sum(dim=1).tolist())
        rows = [torch.cat([first[i:i + 1].detach().cpu(), pieces[i]]) for i in range(2 * n)]
    return rows[0::2], rows[1::2]
