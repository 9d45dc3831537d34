"""What DPO optimises, checked the way TRL 1.16 checks it: loss types and weights, β, the f-divergence, label
smoothing, DiscoPOP's τ, LD-DPO's α and WPO weighting.

An :class:`Objective` refuses, on construction, every combination TRL refuses (with TRL's words and reason), what
TRL accepts and then fails on, and every option that would have no effect. No torch here: the CLI checks its
options with it before anything heavy is loaded. :mod:`dpo.losses` computes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from logitstore.errors import LogitstoreError

# TRL 1.16's loss types, in its order, with the paper each comes from.
PAPERS = {
    "sigmoid": "DPO, Rafailov et al. 2023, arXiv:2305.18290",
    "hinge": "SLiC, Zhao et al. 2023, arXiv:2305.10425",
    "ipo": "IPO, Azar et al. 2023, arXiv:2310.12036",
    "exo_pair": "EXO, Ji et al. 2024, arXiv:2402.00856",
    "nca_pair": "NCA, Chen et al. 2024, arXiv:2402.05369",
    "robust": "Robust DPO, Chowdhury et al. 2024, arXiv:2403.00409",
    "bco_pair": "BCO, Jung et al. 2024, arXiv:2404.04656",
    "sppo_hard": "SPPO, Wu et al. 2024, arXiv:2405.00675",
    "aot": "AOT, Melnyk et al. 2024, arXiv:2406.05882",
    "aot_unpaired": "AOT, Melnyk et al. 2024, arXiv:2406.05882",
    "apo_zero": "APO, D'Oosterlinck et al. 2024, arXiv:2408.06266",
    "apo_down": "APO, D'Oosterlinck et al. 2024, arXiv:2408.06266",
    "discopop": "DiscoPOP, Lu et al. 2024, arXiv:2406.08414",
    "sft": "negative log-likelihood of the chosen tokens, as mixed in by MPO (Wang et al. 2024, arXiv:2411.10442)",
    "sigmoid_norm": "DPO on per-token-averaged log-ratios (length-normalised DPO)",
}
LOSS_TYPES = tuple(PAPERS)
# Not TRL DPOTrainer losses: they read the store's teacher records (docs/teacher.md, "Training").
TEACHER_PAPERS = {
    "distill": "distillation on the stored teacher distribution, TRL 1.16 DistillationTrainer's forward KL, reverse "
               "KL or generalized JSD (GKD, Agarwal et al. 2024, arXiv:2306.13649)",
    "tdpo1": "TDPO1, Zeng et al. 2024, arXiv:2404.11999",
    "tdpo2": "TDPO2, Zeng et al. 2024, arXiv:2404.11999",
}
TDPO_LOSSES = ("tdpo1", "tdpo2")
TEACHER_LOSSES = tuple(TEACHER_PAPERS)  # distill, tdpo1, tdpo2
ALL_LOSS_TYPES = LOSS_TYPES + TEACHER_LOSSES
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # f-DPO, arXiv:2309.16240
# Only these are built on the chosen-rejected reward difference, where f-DPO's β·log Z(x) term cancels.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
PER_TOKEN_LOSSES = ("ipo", "sigmoid_norm")  # divide by the completion's token count
SORTING_LOSSES = ("aot", "aot_unpaired")
DEFAULT_DISCOPOP_TAU = 0.05
DEFAULT_F_ALPHA = 0.5
DEFAULT_DISTILL_BETA = 1.0  # TRL 1.16 DistillationConfig.beta: the reverse KL
DEFAULT_TDPO_ALPHA = 0.5  # the TDPO authors' default


class ObjectiveError(LogitstoreError, ValueError):
    """A loss, or a combination of loss options, that cannot be trained."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """What DPO optimises. Defaults are TRL 1.16's; ``None`` means TRL's default for an option that only one loss
    or divergence reads (so that setting it elsewhere can be refused as meaningless)."""

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None  # None: 1.0 each
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha_coef: float | None = None  # α of alpha_divergence (TRL's f_alpha_divergence_coef, default 0.5)
    ld_alpha: float | None = None  # LD-DPO's α, arXiv:2409.06411
    use_weighting: bool = False  # WPO, arXiv:2406.11827
    discopop_tau: float | None = None  # DiscoPOP's τ (default 0.05)
    distill_beta: float | None = None  # distill's divergence: 0 forward KL, 1 reverse KL, between generalized JSD
    tdpo_alpha: float | None = None  # TDPO2's α (default 0.5)

    def __post_init__(self) -> None:
        types = parse_loss_types(self.loss_types)
        object.__setattr__(self, "loss_types", types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        _check(self)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def tau(self) -> float:
        return DEFAULT_DISCOPOP_TAU if self.discopop_tau is None else self.discopop_tau

    @property
    def alpha_coef(self) -> float:
        return DEFAULT_F_ALPHA if self.f_alpha_coef is None else self.f_alpha_coef

    @property
    def needs_teacher(self) -> bool:
        """Whether a loss reads the store's teacher records (distill, tdpo1, tdpo2)."""
        return any(t in TEACHER_LOSSES for t in self.loss_types)

    @property
    def distill_divergence(self) -> float:
        """distill's beta; TRL's default (1.0, the reverse KL) unless set (:func:`for_teacher` picks 0 for a
        sampled record, the only divergence it estimates)."""
        return DEFAULT_DISTILL_BETA if self.distill_beta is None else self.distill_beta

    @property
    def alpha_tdpo(self) -> float:
        return DEFAULT_TDPO_ALPHA if self.tdpo_alpha is None else self.tdpo_alpha

    @property
    def teacher_betas(self) -> tuple[float, ...]:
        """The per-position divergences the losses read, one beta each: distill's, then TDPO's forward KL
        (0.0) unless distill already computes it."""
        betas: list[float] = []
        if "distill" in self.loss_types:
            betas.append(self.distill_divergence)
        if any(t in TDPO_LOSSES for t in self.loss_types) and 0.0 not in betas:
            betas.append(0.0)
        return tuple(betas)


def for_teacher(objective: Objective, kind: str, url: str) -> Objective:
    """`objective` checked against a store's teacher record kind ("top_k" or "sampled"), distill's beta resolved:
    a sampled record estimates only the forward KL's gradient, and TDPO needs the sequential KL's value."""
    if not objective.needs_teacher:
        return objective
    if kind == "sampled":
        tdpo = [t for t in objective.loss_types if t in TDPO_LOSSES]
        if tdpo:
            raise ObjectiveError(f"{tdpo[0]} needs the reference's top-k distribution and {url} holds sampled "
                                 "teacher records (an estimate of the forward KL's gradient, not of its value); "
                                 "rebuild with --top-k K")
        if objective.distill_beta not in (None, 0.0):
            raise ObjectiveError(f"{url} holds sampled teacher records, which estimate only the forward KL; pass "
                                 f"--distill-beta 0 (got {objective.distill_beta})")
        return dataclasses.replace(objective, distill_beta=0.0)
    return objective


def parse_loss_types(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"sigmoid,sft"`` or ``["sigmoid", "sft"]`` as a tuple of known loss types."""
    types = tuple(t.strip() for t in value.split(",")) if isinstance(value, str) else tuple(value)
    if not types or any(not t for t in types):
        raise ObjectiveError(f"expected one or more loss types separated by commas, got {value!r}")
    unknown = [t for t in types if t not in ALL_LOSS_TYPES]
    if unknown:
        raise ObjectiveError(f"unknown loss type {unknown[0]!r}; choose from {', '.join(ALL_LOSS_TYPES)} (a "
                             f"preference-pair store) or {', '.join(UNPAIRED_LOSS_TYPES)} (an unpaired store)")
    if len(set(types)) != len(types):
        raise ObjectiveError(f"loss type {next(t for t in types if types.count(t) > 1)!r} is listed twice; give "
                             "it one weight instead")
    return types


def _check(o: Objective) -> None:
    types = o.loss_types
    if o.loss_weights is not None and len(o.loss_weights) != len(types):
        # TRL's check (DPOConfig.__post_init__), in the command's words
        given = len(o.loss_weights)
        raise ObjectiveError(f"--loss-weights gives {given} weight{'s' if given != 1 else ''} for {len(types)} "
                             f"--loss type{'s' if len(types) != 1 else ''} ({', '.join(types)}); give one weight "
                             "per type, in the same order")
    if not all(math.isfinite(w) for w in o.weights):
        raise ObjectiveError(f"loss weights must be finite numbers, got {list(o.weights)}")
    if not (math.isfinite(o.beta) and o.beta > 0):
        raise ObjectiveError(f"--beta must be a positive number, got {o.beta}")
    if o.f_divergence not in F_DIVERGENCES:
        raise ObjectiveError(f"unknown f-divergence {o.f_divergence!r}; choose from {', '.join(F_DIVERGENCES)}")
    pair_types = [t for t in types if t != "distill"]  # distill reads no pair log-ratio
    if o.f_divergence != "reverse_kl" and not pair_types:
        raise ObjectiveError("the f-divergence has no effect on distill; it applies to the DPO losses")
    if o.f_divergence != "reverse_kl" and not set(pair_types) <= set(F_DIVERGENCE_LOSSES):
        # TRL's message and reason (DPOTrainer.__init__)
        raise ObjectiveError(
            f"`f_divergence_type='{o.f_divergence}'` is only supported for the following loss types: "
            f"{sorted(F_DIVERGENCE_LOSSES)}. You provided {pair_types}. Use the default "
            "`f_divergence_type='reverse_kl'` with these losses. The f-DPO reparameterization leaves a β·log Z(x) "
            "term that only cancels in the chosen-rejected reward difference.")
    if o.f_alpha_coef is not None and o.f_divergence != "alpha_divergence":
        raise ObjectiveError("the alpha coefficient only applies to the alpha_divergence f-divergence")
    if o.f_alpha_coef is not None and not math.isfinite(o.f_alpha_coef):
        raise ObjectiveError(f"the alpha coefficient must be finite, got {o.f_alpha_coef}")
    if o.use_weighting and any(t in SORTING_LOSSES for t in types):
        # TRL's message (DPOTrainer.__init__ raises NotImplementedError)
        raise ObjectiveError("WPO-style weighting is not implemented for 'aot' or 'aot_unpaired' because those "
                             "losses sort samples, which would misalign per-pair weights.")
    if o.use_weighting and "distill" in types:
        raise ObjectiveError("WPO-style weighting does not apply to the 'distill' loss: it is one mean over the "
                             "batch's completion tokens, not a per-pair value to weight")
    if o.use_weighting and "sft" in types:
        # TRL 1.16 fails here with a RuntimeError (an in-place product on the expanded batch-level SFT term).
        raise ObjectiveError("WPO-style weighting does not apply to the 'sft' loss: it is one batch-level "
                             "average, not a per-pair value to weight")
    ls = o.label_smoothing
    if ls != 0.0 and not any(t in LABEL_SMOOTHING_LOSSES for t in types):
        raise ObjectiveError(f"label smoothing has no effect on {', '.join(types)}; only "
                             f"{', '.join(LABEL_SMOOTHING_LOSSES)} use it")
    if not (math.isfinite(ls) and 0.0 <= ls < 1.0):
        raise ObjectiveError(f"label smoothing is a probability in [0, 1), got {ls}")
    if "robust" in types and not ls < 0.5:
        # TRL only warns; at 0.5 the robust loss divides by zero and above it flips sign.
        raise ObjectiveError(f"The `label_smoothing` parameter should lie in [0.0, 0.5) for the 'robust' loss. "
                             f"You provided {ls}.")
    if "exo_pair" in types and ls == 0.0:
        # TRL's message (DPOTrainer.__init__)
        raise ObjectiveError("Label smoothing must be greater than 0.0 when using 'exo_pair' loss. The EXO paper "
                             "recommends a value of 1e-3.")
    if o.discopop_tau is not None:
        if "discopop" not in types:
            raise ObjectiveError("--discopop-tau only applies to the discopop loss")
        if not (math.isfinite(o.discopop_tau) and o.discopop_tau > 0):
            raise ObjectiveError(f"--discopop-tau must be a positive number, got {o.discopop_tau}")
    if o.ld_alpha is not None and not pair_types:
        raise ObjectiveError("--ld-alpha has no effect on distill; it applies to the DPO losses")
    if o.ld_alpha is not None and any(t in TDPO_LOSSES for t in types):
        raise ObjectiveError("--ld-alpha does not apply to TDPO: its sequential KL sums every completion token, "
                             "so a length-desensitized log-ratio would weigh the two terms differently")
    if o.distill_beta is not None:
        if "distill" not in types:
            raise ObjectiveError("--distill-beta only applies to the distill loss")
        if not (math.isfinite(o.distill_beta) and 0.0 <= o.distill_beta <= 1.0):
            raise ObjectiveError(f"--distill-beta must be in [0, 1], got {o.distill_beta}")
    if o.tdpo_alpha is not None:
        if "tdpo2" not in types:
            raise ObjectiveError("--tdpo-alpha only applies to the tdpo2 loss (TDPO1 has no α)")
        if not (math.isfinite(o.tdpo_alpha) and o.tdpo_alpha >= 0):
            raise ObjectiveError(f"--tdpo-alpha must be a non-negative number, got {o.tdpo_alpha}")
    if o.ld_alpha is not None and not (math.isfinite(o.ld_alpha) and 0.0 <= o.ld_alpha <= 1.0):
        # TRL documents the range; 1.0 weighs the tail fully (plain DPO), 0.0 drops it.
        raise ObjectiveError(f"--ld-alpha must be in [0.0, 1.0], got {o.ld_alpha}")


# ---- unpaired objectives (thumbs up / thumbs down): computed by dpo/unpaired_losses.py -------------------------

UNPAIRED_PAPERS = {
    "kto": "KTO, Ethayarajh et al. 2024, arXiv:2402.01306",
    "apo_zero_unpaired": "APO, D'Oosterlinck et al. 2024, arXiv:2408.06266 (unpaired variant, TRL's KTOTrainer)",
    "bco": "BCO, Jung et al. 2024, arXiv:2404.04656",
}
UNPAIRED_LOSS_TYPES = tuple(UNPAIRED_PAPERS)


@dataclasses.dataclass(frozen=True)
class UnpairedObjective:
    """What KTO-style training optimises on an unpaired store. Defaults are TRL 1.16's KTOConfig's."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in UNPAIRED_LOSS_TYPES:
            raise ObjectiveError(f"unknown unpaired loss {self.loss_type!r}; choose from "
                                 f"{', '.join(UNPAIRED_LOSS_TYPES)}")
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ObjectiveError(f"{name.replace('_', ' ')} must be a positive number, got {value}")
            object.__setattr__(self, name, value)

    @property
    def uses_kl(self) -> bool:
        """Whether the loss reads the KL completions (TRL's `calculate_KL`): it then trains in the store's chunks."""
        return self.loss_type == "kto"

    ld_alpha = None  # what the training loop asks every objective
    use_weighting = False
    needs_teacher = False


def unpaired_objective(loss: str | Sequence[str], *, beta: float, desirable_weight: float, undesirable_weight: float,
                       dpo_options: dict[str, object]) -> UnpairedObjective | None:
    """The unpaired objective `loss` names, or None for DPO losses (which refuse the unpaired weights).
    `dpo_options` are the DPO-only options as given (name -> value, None or default when unset)."""
    types = tuple(t.strip() for t in loss.split(",")) if isinstance(loss, str) else tuple(loss)
    unpaired = [t for t in types if t in UNPAIRED_LOSS_TYPES]
    if not unpaired:
        if (desirable_weight, undesirable_weight) != (1.0, 1.0):
            raise ObjectiveError(f"desirable and undesirable weights apply to the unpaired losses "
                                 f"({', '.join(UNPAIRED_LOSS_TYPES)}), not to {', '.join(types)}")
        return None
    if len(types) > 1:
        raise ObjectiveError(f"{unpaired[0]} trains on an unpaired store and cannot be combined with other losses")
    for name, value in dpo_options.items():
        if value not in (None, False, 0.0, "reverse_kl"):
            raise ObjectiveError(f"{name} does not apply to {types[0]} (a DPO option)")
    return UnpairedObjective(types[0], beta, desirable_weight, undesirable_weight)


def objective_of(cfg: Any) -> Objective | UnpairedObjective:
    """The objective a :class:`dpo.config.TrainConfig` asks for: a DPO objective (refusing what TRL 1.16 refuses,
    and options without effect), or an unpaired one (kto, apo_zero_unpaired, bco) for an unpaired store."""
    unpaired = unpaired_objective(
        cfg.loss, beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
        dpo_options={"--loss-weights": cfg.loss_weights, "--label-smoothing": cfg.label_smoothing,
                     "--f-divergence": cfg.f_divergence, "--f-alpha": cfg.f_alpha_coef, "--ld-alpha": cfg.ld_alpha,
                     "--use-weighting": cfg.use_weighting, "--discopop-tau": cfg.discopop_tau,
                     # set or not: 0 is a value of these, not their default
                     "--distill-beta": cfg.distill_beta is not None, "--tdpo-alpha": cfg.tdpo_alpha is not None})
    if unpaired is not None:
        return unpaired
    return Objective(loss_types=cfg.loss, loss_weights=cfg.loss_weights, beta=cfg.beta,
                     label_smoothing=cfg.label_smoothing, f_divergence=cfg.f_divergence, f_alpha_coef=cfg.f_alpha_coef,
                     ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting, discopop_tau=cfg.discopop_tau,
                     distill_beta=cfg.distill_beta, tdpo_alpha=cfg.tdpo_alpha)
