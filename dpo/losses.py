"""DPO losses as pure functions over per-sequence log-probs, matching TRL 1.16's formulas.

Each returns per-example losses and rewards; the training loop takes the mean.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .choices import LOSSES


@dataclasses.dataclass(frozen=True)
class DPOLossOutput:
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B], beta * (policy - reference), detached
    rejected_rewards: torch.Tensor  # [B]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> DPOLossOutput:
    """Per-example DPO losses.

    - ``sigmoid``: -log σ(β Δ), Δ = (π_c - ref_c) - (π_r - ref_r)   (Rafailov et al. 2023)
    - ``robust``: label-smoothed sigmoid, unbiased for flip rate ε  (Chowdhury et al. 2024)
    - ``hinge``: relu(1 - β Δ)                                       (SLiC)
    - ``ipo``: (Δ/len - 1/(2β))², log-ratios averaged per token     (Azar et al. 2023, as TRL normalises it)
    - ``sigmoid_norm``: sigmoid on per-token-averaged log-ratios (length-normalised DPO)
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"the {loss_type} loss needs the completion token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    else:
        delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid" or loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}")
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown loss {loss_type!r}; choose one of {', '.join(LOSSES)}")
    return DPOLossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
