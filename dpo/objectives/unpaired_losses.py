"""Unpaired preference losses (thumbs up / thumbs down) as pure functions: KTO and APO-zero as TRL 1.16's
``KTOTrainer._compute_loss`` computes them, and BCO with its running reward mean.

Every function takes one batch's per-example sequence log-probs (policy and reference) and boolean labels and
returns per-example losses in TRL's order (desirable examples first, in batch order, then undesirable ones), so
that their mean (``nanmean``, as TRL) is TRL's loss. The training loop takes that mean.

TRL 1.16 has no unpaired BCO trainer (its only BCO is DPO's ``bco_pair``); :func:`bco_loss` follows the BCO paper
(Jung et al. 2024, arXiv:2404.04656) as TRL's ``BCOTrainer`` implemented it before its removal, without the
optional density-ratio (UDM) classifier: δ is the running mean of every reward seen so far, chosen and rejected
alike, updated with the batch's rewards before the batch's loss is taken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired", "bco")
PAPERS = {
    "kto": "KTO, Ethayarajh et al. 2024, arXiv:2402.01306",
    "apo_zero_unpaired": "APO, D'Oosterlinck et al. 2024, arXiv:2408.06266 (unpaired variant, TRL's KTOTrainer)",
    "bco": "BCO, Jung et al. 2024, arXiv:2404.04656",
}
# Losses whose KL estimate needs each example's mismatched KL completion (TRL's `calculate_KL`).
KL_LOSSES = ("kto",)


@dataclasses.dataclass(frozen=True)
class UnpairedLossOutput:
    losses: torch.Tensor  # desirable examples' weighted losses, then undesirable ones'; mean = TRL's loss
    chosen_rewards: torch.Tensor  # beta * (policy - reference) of the desirable examples, detached
    rejected_rewards: torch.Tensor  # same for the undesirable ones
    kl: torch.Tensor  # the KL estimate used (0 where the loss has none)
    delta: torch.Tensor | None = None  # BCO's reward baseline


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """KTO's reference point z0 as TRL 1.16 estimates it: the batch mean of policy minus reference log-probs of
    the mismatched KL completions, detached, averaged over ranks (`gather` returns every rank's value), clamped
    at 0."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        kl = gather(kl)
    return kl.mean().clamp(min=0)


def _split(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.as_tensor(labels, dtype=torch.bool, device=values.device)
    chosen = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected = torch.nonzero(~labels, as_tuple=False).view(-1)
    return values.index_select(0, chosen), values.index_select(0, rejected)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> UnpairedLossOutput:
    """KTO (Eq. 7 of the paper) or its APO-zero unpaired variant, term for term TRL 1.16's."""
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"kto_loss computes kto or apo_zero_unpaired, not {loss_type!r}")
    policy_chosen, policy_rejected = _split(policy_logps, labels)
    ref_chosen, ref_rejected = _split(ref_logps, labels)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_ratio - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_ratio))
    else:  # the chosen completions are better than the model's own: no KL reference point
        chosen_losses = 1 - F.sigmoid(beta * chosen_ratio)
        rejected_losses = F.sigmoid(beta * rejected_ratio)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return UnpairedLossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), kl)


@dataclasses.dataclass
class RunningMean:
    """Running mean and variance of every value seen (Chan et al.'s parallel combination), BCO's δ.

    Starts at mean 0, variance 1 and a vanishing count (1e-24), as TRL's `RunningMoments`, so that after the
    first update the mean is the first batch's. Its state is three floats: checkpointed with the run."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold in `values`; `reduce` (a sum over ranks) makes every rank fold in the global batch."""
        values = values.detach().float().reshape(-1)
        total = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
        if reduce is not None:
            total = reduce(total)
        batch_sum, batch_count = total[0], total[1]
        batch_mean = batch_sum / batch_count
        squares = ((values - batch_mean) ** 2).sum()
        if reduce is not None:
            squares = reduce(squares)
        batch_var = squares / batch_count
        delta = batch_mean - self.mean
        count = self.count + batch_count
        combined = self.var * self.count + delta**2 * self.count * batch_count / count + batch_var * batch_count
        self.mean = float(self.mean + (delta * batch_count / count).item())
        self.var = float((combined / count).item())
        self.count = float(count.item())

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def bco_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, running: RunningMean, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, update: bool = True,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> UnpairedLossOutput:
    """BCO: a binary classifier on the implicit reward, shifted by δ, the running mean of rewards.

    With `update` (training), the batch's rewards are folded into `running` first; evaluation leaves it as is."""
    policy_chosen, policy_rejected = _split(policy_logps, labels)
    ref_chosen, ref_rejected = _split(ref_logps, labels)
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    if update:
        running.update(torch.cat((chosen_rewards, rejected_rewards), 0), reduce)
    delta = torch.as_tensor(running.mean, dtype=chosen_rewards.dtype, device=chosen_rewards.device)
    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    zero = torch.zeros((), dtype=chosen_rewards.dtype, device=chosen_rewards.device)
    return UnpairedLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), zero, delta)
