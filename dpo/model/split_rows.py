"""Scoring a batch one sequence at a time (`train --split-sequences`): what the backward pass holds at once is one
sequence's activations, not the whole batch's.

Every loss reads the policy only through the per-token values :func:`dpo.model.scoring.token_logps` returns (the
log-probs, and the teacher divergences of distill and TDPO; WPO's log Σ p² carries no gradient). So the gradient of
a loss with respect to the weights is the sum over rows of (d loss / d row's values) . (d row's values / d weights).
Forward: each row is scored without gradients, which keeps nothing for the backward pass. Backward: the loss's
gradient with respect to those values arrives, and each row is scored again, with gradients, and backpropagated with
its slice of that gradient as weight; the weights' gradients add up row by row. The price is one more forward pass
(the no-gradient one). The loss, the metrics and every loss type are computed as without the option, from the same
values; only float32 rounding differs (a row alone is one sequence's matmul, not the batch's).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch

from .scoring import TokenLogps, token_logps


def _row(x: Any, i: int) -> Any:
    return None if x is None else x[i:i + 1]


def _teacher_row(teacher: Any, i: int) -> Any:
    if teacher is None:
        return None
    return dataclasses.replace(teacher, ids=teacher.ids[i:i + 1], logps=_row(teacher.logps, i),
                               tail_logp=_row(teacher.tail_logp, i), counts=_row(teacher.counts, i))


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """[1, L, ...] padded with zeros (False) to [1, width, ...]."""
    if x.shape[1] == width:
        return x
    pad = x.new_zeros((1, width - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


@contextlib.contextmanager
def _same_autocast(state: tuple[str, bool, torch.dtype]) -> Any:
    device_type, enabled, dtype = state
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        yield


class _Rows(torch.autograd.Function):
    """The per-token values of every row, computed beforehand without gradients; backward scores each row again with
    gradients and backpropagates it with its slice of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, rescore: Callable[[int], TokenLogps],  # type: ignore[override]
                rows: int, per_token: torch.Tensor, divergence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.rescore, ctx.rows = rescore, rows
        ctx.set_materialize_grads(False)
        return per_token.clone(), divergence.clone()

    @staticmethod
    def backward(ctx: Any, grad_tokens: torch.Tensor | None,  # type: ignore[override]
                 grad_divergence: torch.Tensor | None) -> tuple[None, ...]:
        for i in range(ctx.rows):
            with torch.enable_grad():
                tokens = ctx.rescore(i)
                pairs = [(tokens.per_token, grad_tokens), (tokens.divergence, grad_divergence)]
                pairs = [(out, grad[i:i + 1, :out.shape[1]]) for out, grad in pairs
                         if out is not None and grad is not None and out.requires_grad]
                if pairs:
                    torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
            del tokens
        return (None,) * 5


def split_token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor, *, sum_sq: bool = False, teacher: Any = None) -> TokenLogps:
    """:func:`token_logps` of a right-padded batch, one row at a time (the module docstring says how); each row is
    cut to its own length, so a short row does not pay for the batch's padding. Without gradients (evaluation) it
    scores row by row too, and returns plain values."""
    n, width = input_ids.shape[0], input_ids.shape[1] - 1
    lengths = [int(attention_mask[i].nonzero().max()) + 1 if bool(attention_mask[i].any()) else 1 for i in range(n)]
    device_type = input_ids.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    cuda = input_ids.device.type == "cuda"
    states = []

    def score_row(i: int) -> TokenLogps:
        end = lengths[i]
        return token_logps(model, input_ids[i:i + 1, :end], attention_mask[i:i + 1, :end],
                           completion_mask[i:i + 1, :end], sum_sq=sum_sq, teacher=_teacher_row(teacher, i))

    def rescore(i: int) -> TokenLogps:  # the same dropout draws as the first pass (as torch.utils.checkpoint does)
        with torch.random.fork_rng(devices=[input_ids.device] if cuda else [], device_type=device_type), \
                _same_autocast(autocast):
            torch.set_rng_state(states[i][0])
            if cuda:
                torch.cuda.set_rng_state(states[i][1], input_ids.device)
            return score_row(i)

    values = []
    with torch.no_grad():
        for i in range(n):
            states.append((torch.get_rng_state(), torch.cuda.get_rng_state(input_ids.device) if cuda else None))
            values.append(score_row(i))
    per_token = torch.cat([_pad_to(v.per_token, width) for v in values])
    scored = torch.cat([_pad_to(v.scored, width) for v in values])
    log_sum_sq = None if not sum_sq else torch.cat([_pad_to(v.log_sum_sq, width) for v in values])
    divergence = None if teacher is None else torch.cat([_pad_to(v.divergence, width) for v in values])
    if torch.is_grad_enabled():
        anchor = torch.zeros((), device=per_token.device, requires_grad=True)  # makes the outputs need a gradient
        empty = per_token.new_zeros(0)
        per_token, grad_divergence = _Rows.apply(anchor, rescore, n, per_token,
                                                 divergence if divergence is not None else empty)
        divergence = grad_divergence if divergence is not None else None
    return TokenLogps(per_token, scored, log_sum_sq, divergence)
