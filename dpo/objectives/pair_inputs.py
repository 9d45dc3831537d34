"""What the pair losses read from one batch's per-token values: the policy's sequence log-probs of each side (plain
sums, or LD-DPO's length-desensitized sums), token counts, the SFT term, WPO's weights, and the teacher terms
(distillation's per-token mean, TDPO's sequential KL), gathered into a :class:`PairLogps`.

Rows are a padded batch of 2B rows, chosen rows then rejected rows, as :func:`logitstore.loader.pad_pairs` lays them
out and :func:`dpo.model.scoring.token_logps` scores them.
"""

from __future__ import annotations

from typing import Any

import torch

from .objective import Objective
from .pair_losses import PairLogps, needed_inputs


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


def pair_logps(tokens: Any, completion_mask: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, objective: Objective) -> PairLogps:
    """What `objective`'s losses read from one batch (`tokens`: a :class:`dpo.model.scoring.TokenLogps`): policy and
    reference log-probs (LD-weighted with
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
