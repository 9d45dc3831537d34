"""DPO losses as pure functions, formula for formula TRL 1.16's ``DPOTrainer._compute_loss``.

:func:`dpo_loss` takes one batch's per-pair log-probs (:class:`PairLogps`) and an :class:`~dpo.objective.Objective`
and returns per-example losses and rewards; the training loop takes the mean.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .distill import tdpo_loss
from .objective import LOSS_TYPES, PER_TOKEN_LOSSES, TDPO_LOSSES, Objective, ObjectiveError


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """One batch of B pairs as the losses see it; every tensor is [B] unless noted.

    ``chosen``/``rejected`` are the policy's sequence log-probs and ``ref_*`` the reference's, both LD-weighted
    when LD-DPO is on. The rest is needed only by some objectives (see :func:`needed_inputs`)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None  # completion tokens, prompt excluded (ipo, sigmoid_norm)
    rejected_tokens: torch.Tensor | None = None
    chosen_token_mean: torch.Tensor | None = None  # scalar: mean log-prob over all scored chosen tokens (sft)
    pair_weights: torch.Tensor | None = None  # WPO weights, detached (use_weighting)
    distill: torch.Tensor | None = None  # scalar: mean teacher divergence over all scored tokens, both sides
    chosen_kl: torch.Tensor | None = None  # TDPO's sequential KL(π_ref || π) of each completion
    rejected_kl: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class DPOLossOutput:
    losses: torch.Tensor  # [B], weighted sum over the loss types; its mean is TRL's loss
    chosen_rewards: torch.Tensor  # [B], beta * (policy - reference), detached
    rejected_rewards: torch.Tensor  # [B]


def needed_inputs(objective: Objective) -> set[str]:
    """Optional :class:`PairLogps` fields that `objective` reads."""
    need = set()
    if any(t in PER_TOKEN_LOSSES for t in objective.loss_types):
        need |= {"chosen_tokens", "rejected_tokens"}
    if "sft" in objective.loss_types:
        need.add("chosen_token_mean")
    if objective.use_weighting:
        need.add("pair_weights")
    if "distill" in objective.loss_types:
        need.add("distill")
    if any(t in TDPO_LOSSES for t in objective.loss_types):
        need |= {"chosen_kl", "rejected_kl"}
    return need


def f_scores(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, objective: Objective,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(π/π_ref) of each side's log-ratio (f-DPO); reverse KL gives the log-ratios themselves."""
    kind = objective.f_divergence
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-chosen_ratio), 1 - torch.exp(-rejected_ratio)
    if kind == "js_divergence":  # f'(t) = log(2t/(t+1)) = log 2 + log σ(log t)
        return math.log(2) + F.logsigmoid(chosen_ratio), math.log(2) + F.logsigmoid(rejected_ratio)
    if kind == "alpha_divergence" and abs(objective.alpha_coef - 1.0) >= 1e-6:  # f'(t) = (t^(α-1) - 1)/(α-1)
        a = objective.alpha_coef
        coef = 1.0 / (a - 1.0)
        t_chosen, t_rejected = (a - 1.0) * chosen_ratio, (a - 1.0) * rejected_ratio
        dtype = t_chosen.dtype
        clamp_max = {torch.float16: 11.0}.get(dtype, 80.0)  # exp(.) stays representable after casting back
        chosen = (torch.exp(torch.clamp(t_chosen.float(), max=clamp_max)) - 1.0).to(dtype) * coef
        rejected = (torch.exp(torch.clamp(t_rejected.float(), max=clamp_max)) - 1.0).to(dtype) * coef
        return chosen, rejected
    return chosen_ratio, rejected_ratio  # reverse_kl, and alpha_divergence's limit α → 1


def _conservative(delta: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1 - smoothing) - F.logsigmoid(-beta * delta) * smoothing


def _per_token(scores: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    return scores / tokens.clamp(min=1.0)  # type: ignore[union-attr]


def single_loss(loss_type: str, x: PairLogps, objective: Objective, chosen_scores: torch.Tensor,
                rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-example loss of one loss type (before WPO weighting)."""
    beta, ls = objective.beta, objective.label_smoothing
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":  # TRL averages the log-ratios per token (confirmed with the IPO authors)
        ipo_delta = _per_token(chosen_scores, x.chosen_tokens) - _per_token(rejected_scores, x.rejected_tokens)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":  # KL(softmax(β·scores) || [1-ε, ε]) over {chosen, rejected}
        epsilon = torch.tensor(ls, device=delta.device)
        log_pw, log_pl = torch.log1p(-epsilon), torch.log(epsilon)
        return (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - log_pw)
                + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - log_pl))
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    if loss_type == "robust":  # unbiased for labels flipped with probability ε
        clean = -(1 - ls) * F.logsigmoid(beta * delta)
        flipped = -ls * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * ls)
    if loss_type == "bco_pair":  # TRL 1.16's form has no running reward mean: nothing to checkpoint
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if loss_type == "sppo_hard":  # P = 1 for the winner, 0 for the loser
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "aot":  # the batch's sorted policy log-ratio margins against the sorted reference ones
        policy_sorted, _ = torch.sort(x.chosen - x.rejected, dim=0)
        ref_sorted, _ = torch.sort(x.ref_chosen - x.ref_rejected, dim=0)
        return _conservative(policy_sorted - ref_sorted, beta, ls)
    if loss_type == "aot_unpaired":
        chosen_sorted, _ = torch.sort(chosen_ratio, dim=0)
        rejected_sorted, _ = torch.sort(rejected_ratio, dim=0)
        return _conservative(chosen_sorted - rejected_sorted, beta, ls)
    if loss_type == "apo_zero":  # chosen better than the model's own outputs: raise chosen, lower rejected
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":  # chosen worse than the model's own outputs: lower both, rejected more
        return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss_type == "discopop":  # logistic and exponential losses blended by σ(logits / τ)
        logits = delta * beta
        modulation = torch.sigmoid(logits / objective.tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sft":  # one batch-level value; expanded so that its mean is that value
        return (-x.chosen_token_mean).expand(x.chosen.shape[0])  # type: ignore[operator]
    if loss_type == "distill":  # one batch-level value, as sft: TRL's per-token mean over the completions
        return x.distill.expand(x.chosen.shape[0])  # type: ignore[union-attr]
    if loss_type in TDPO_LOSSES:
        return tdpo_loss(chosen_ratio, rejected_ratio, x.chosen_kl, x.rejected_kl, beta,  # type: ignore[arg-type]
                         alpha=objective.alpha_tdpo, variant=loss_type)[0]
    if loss_type == "sigmoid_norm":
        norm_delta = _per_token(chosen_scores, x.chosen_tokens) - _per_token(rejected_scores, x.rejected_tokens)
        return -F.logsigmoid(beta * norm_delta)
    raise ObjectiveError(f"unknown loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def dpo_loss(x: PairLogps, objective: Objective = Objective()) -> DPOLossOutput:
    """Per-example losses of `objective` on one batch: Σ_k w_k · loss_k (· WPO weight), and the rewards."""
    missing = sorted(name for name in needed_inputs(objective) if getattr(x, name) is None)
    if missing:
        raise ValueError(f"{', '.join(objective.loss_types)} needs {', '.join(missing)}")
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    chosen_scores, rejected_scores = f_scores(chosen_ratio, rejected_ratio, objective)
    total: torch.Tensor | float = 0.0
    for loss_type, weight in zip(objective.loss_types, objective.weights):
        per_pair = single_loss(loss_type, x, objective, chosen_scores, rejected_scores)
        if objective.use_weighting:
            per_pair = per_pair * x.pair_weights
        total = total + per_pair * weight
    beta = objective.beta
    return DPOLossOutput(total, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())  # type: ignore[arg-type]
