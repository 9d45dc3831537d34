"""What the kinds that train on teacher records share (a pairs store built with --top-k or --sample-k, and a
completion store): a batch's records on the device, the store's and the batch's checks, distillation's global
token mean and the teacher metrics of a step. The records' alignment with the scored positions is
:mod:`dpo.model.teacher_records`'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..model.teacher_records import SAMPLED_KEYS, TOP_K_KEYS, TeacherRecords
from ..objectives.objective import Objective


def teacher_records(batch: dict[str, torch.Tensor], objective: Objective, device: Any) -> TeacherRecords | None:
    """The batch's teacher records on `device` if `objective` reads them (distill, tdpo1, tdpo2), else None."""
    if not objective.needs_teacher:
        return None
    move = {k: batch[k].to(device, non_blocking=True) for k in (*TOP_K_KEYS, *SAMPLED_KEYS) if k in batch}
    if "teacher_counts" in move:
        return TeacherRecords(move["teacher_ids"], objective.teacher_betas, counts=move["teacher_counts"])
    if "teacher_logps" not in move:
        raise ValueError(f"{', '.join(objective.loss_types)} reads teacher records, and the batch holds none "
                         "(make_loader(..., teacher=True))")
    return TeacherRecords(move["teacher_ids"], objective.teacher_betas, logps=move["teacher_logps"],
                          tail_logp=move["teacher_tail_logp"])


def global_token_mean(pair: Any, scored: torch.Tensor) -> Any:
    """`pair` with distill's per-token mean taken over every rank's scored tokens, as TRL's DistillationTrainer
    divides by the token count of all processes: each rank's sum over the count's per-rank share, which DDP's and
    FSDP2's gradient averaging then turns into the global mean. The same pair in one process."""
    from ..distributed import group as distributed

    if pair.distill is None or not distributed.is_distributed():
        return pair
    local = scored.sum().to(pair.distill)
    share = distributed.all_reduce_sum(local.detach().clone()) / torch.distributed.get_world_size()
    return dataclasses.replace(pair, distill=pair.distill * local / share.clamp(min=1.0))


@dataclasses.dataclass(frozen=True)
class CompletionTerms:
    """A completion batch's distill term (no pairs, so no TDPO sequential KL): what :func:`global_token_mean` and
    :func:`teacher_metrics` take in place of a pair's terms."""

    distill: torch.Tensor
    chosen_kl: None = None


def completion_terms(tokens: Any, objective: Objective) -> CompletionTerms:
    """distill on a completion store's rows: TRL's DistillationTrainer reduction, the mean of each scored
    position's divergence (distill's beta) over every scored completion token of the batch, as for pairs."""
    if tokens.divergence is None:
        raise ValueError("distill needs token_logps(..., teacher=records)")
    per_position = tokens.divergence[..., objective.teacher_betas.index(objective.distill_divergence)]
    return CompletionTerms(per_position[tokens.scored].mean())


def teacher_metrics(pair: Any) -> dict[str, torch.Tensor]:
    """What the teacher terms add to a step's record: distill's loss, TDPO's sequential KL of each side."""
    out = {}
    if pair.distill is not None:
        out["distill/loss"] = pair.distill.detach()
    if pair.chosen_kl is not None:
        out["tdpo/seq_kl_chosen"] = pair.chosen_kl.detach().mean()
        out["tdpo/seq_kl_rejected"] = pair.rejected_kl.detach().mean()
    return out


def check_teacher(store: Any, objective: Any) -> Any:
    """Refuse a store without teacher records when `objective` reads them, in one line; return it with distill's
    beta resolved for the store's record kind (:func:`dpo.objectives.objective.for_teacher`)."""
    from logitstore.loader import require_teacher

    from ..objectives.objective import for_teacher

    if not objective.needs_teacher:
        return objective
    require_teacher(store)  # the loader's one line for a store without records
    return for_teacher(objective, str(store.teacher["kind"]), store.location.url)


def check_teacher_vocabulary(store: Any, objective: Any, vocab_size: int) -> None:
    """A teacher of a larger vocabulary (the header's ``vocab``) than the model's logits (`vocab_size`) was another
    tokenizer's: its ids past the model's have no logit to compare with."""
    from logitstore.errors import LogitstoreError

    info = store.teacher if objective.needs_teacher else None
    if info and int(info["vocab"]) > vocab_size:
        raise LogitstoreError(f"{store.location.url} holds a teacher of {info['vocab']} tokens, more than the "
                              f"model's vocabulary of {vocab_size}; the store was built for another tokenizer")


def per_example(per_row: torch.Tensor, n: int) -> torch.Tensor:
    """[n] bool of examples from a batch's [R] bool of rows: a pair's two rows (chosen rows, then rejected rows)
    count for it; a completion batch has one row per example."""
    return per_row if per_row.numel() == n else per_row[:n] | per_row[n:]


def check_teacher_batch(batch: dict[str, torch.Tensor], vocab_size: int) -> tuple[torch.Tensor, str] | None:
    """The rows (of ``batch["rows"]``, a bool mask) whose teacher records do not fit the batch, and why: ids
    outside the model's vocabulary, log-probs that are NaN or above 0, or another number of positions than the row
    scores. None if all fit."""
    if "teacher_ids" not in batch:
        return None
    ids = batch["teacher_ids"]
    records = TeacherRecords(ids, (0.0,), logps=batch.get("teacher_logps"), counts=batch.get("teacher_counts"))
    n = batch["rows"].numel()
    outside = ((ids < 0) | (ids >= vocab_size)).flatten(1).any(dim=1)
    if outside.any():
        token = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        return per_example(outside, n), (f"a teacher token id {token}, outside the model's vocabulary of "
                                           f"{vocab_size}; the store was built for another tokenizer")
    if records.logps is not None:  # a log-probability is at most 0; padding is -inf
        values = torch.cat([records.logps.flatten(1), batch["teacher_tail_logp"].flatten(1)], dim=1)
        wrong = torch.isnan(values) | (values > 0)
        if wrong.any():
            per_row = wrong.any(dim=1)
            return per_example(per_row, n), (f"a teacher log-prob of {float(values[wrong][0])}, which is no "
                                               "log-probability; the store is damaged")
    scored = batch["completion_mask"][:, 1:].sum(dim=1)
    entries = records.real().sum(dim=1)
    differ = entries != scored
    if differ.any():
        i = int(differ.nonzero()[0, 0])
        return per_example(differ, n), (f"teacher records for {int(entries[i])} positions of a completion that "
                                         f"scores {int(scored[i])} tokens; the store is damaged")
    return None
