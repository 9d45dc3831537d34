"""The trainer's teacher terms: a batch's stored teacher records, aligned with the positions the policy scores.

The loader pads the records per row and completion token, in :func:`logitstore.loader.pad_pairs`' row layout:
entry ``[i, t]`` is the teacher's distribution over row i's t-th scored completion token. The policy's token loop
(:func:`dpo.logps.token_logps`) gathers the hidden states that predict those same tokens, row by row in order, so
the records' real entries, taken row-major, line up with them one to one. :meth:`TeacherRecords.per_position`
runs the LM head over those hidden states slice by slice (:func:`dpo.distill.head_divergences`), never holding
[batch, sequence, vocab] logits, and returns each position's divergence for every beta the objective reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .distill import head_divergences
from .objective import TDPO_LOSSES, UNPAIRED_LOSS_TYPES, Objective

TOP_K_KEYS = ("teacher_ids", "teacher_logps", "teacher_tail_logp")
SAMPLED_KEYS = ("teacher_ids", "teacher_counts")


@dataclasses.dataclass(frozen=True)
class TeacherRecords:
    """One batch's teacher records as the loader pads them: ``ids`` [R, T, K]; a top-k record's ``logps``
    [R, T, K] (-inf padding) and ``tail_logp`` [R, T], or a sampled record's ``counts`` [R, T, K] (0 padding).
    ``betas``: the divergences to compute at each position (:attr:`Objective.teacher_betas`)."""

    ids: torch.Tensor
    betas: tuple[float, ...]
    logps: torch.Tensor | None = None
    tail_logp: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def real(self) -> torch.Tensor:
        """[R, T] bool, the entries that are records, not padding: a top-k position's first log-prob is finite, a
        sampled position's counts add up to K > 0. (A row with an empty prompt has none at t = 0: no position
        predicts its first token.)"""
        if self.counts is not None:
            return self.counts.sum(dim=-1) > 0
        return torch.isfinite(self.logps[..., 0])  # type: ignore[index]

    def per_position(self, hidden: torch.Tensor, scored: torch.Tensor, head: Any, config: Any) -> torch.Tensor:
        """[M, len(betas)] divergences at the scored positions: `hidden` [M, H] are the hidden states that predict
        the scored tokens of `scored` [R, S] (bool), row-major, as :func:`dpo.logps.token_logps` gathers them; the
        records' real entries, row-major, are the same tokens in the same order."""
        real = self.real()
        if not torch.equal(real.sum(dim=1), scored.sum(dim=1).to(real.device)):
            raise ValueError("the teacher records do not cover the batch's scored tokens one to one")
        device = hidden.device

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[real].to(device)

        return head_divergences(hidden, head, config, flat(self.ids), logps=flat(self.logps),  # type: ignore[arg-type]
                                tail_logp=flat(self.tail_logp), counts=flat(self.counts), betas=self.betas)


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
    from . import distributed

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


def completion_refusal(store: Any, objective: Any) -> str | None:
    """Why `objective` cannot train on a completion store (one line), or None: it holds one completion per example
    and no pairs, so only distill reads it."""
    if store.kind.name != "completion":
        return None
    others = [t for t in getattr(objective, "loss_types", (getattr(objective, "loss_type", "?"),)) if t != "distill"]
    if not others:
        return None
    needs = {"a preference-pair store": [t for t in others if t not in TDPO_LOSSES + UNPAIRED_LOSS_TYPES],
             "a preference-pair store built with --top-k": [t for t in others if t in TDPO_LOSSES],
             "an unpaired store (prompt/completion/label data)": [t for t in others if t in UNPAIRED_LOSS_TYPES]}
    reasons = [f"{', '.join(types)} need{'s' if len(types) == 1 else ''} {store_kind}"
               for store_kind, types in needs.items() if types]
    return (f"{store.location.url} is a completion store (prompt/completion data, no pairs or labels): it trains "
            f"--loss distill alone; {'; '.join(reasons)}")


def teacher_metrics(pair: Any) -> dict[str, torch.Tensor]:
    """What the teacher terms add to a step's record: distill's loss, TDPO's sequential KL of each side."""
    out = {}
    if pair.distill is not None:
        out["distill/loss"] = pair.distill.detach()
    if pair.chosen_kl is not None:
        out["tdpo/seq_kl_chosen"] = pair.chosen_kl.detach().mean()
        out["tdpo/seq_kl_rejected"] = pair.rejected_kl.detach().mean()
    return out


def check_teacher(store: Any, objective: Objective) -> Objective:
    """Refuse a store whose records cannot serve `objective`, in one line; return it with distill's beta resolved
    for the store's record kind (:func:`dpo.objective.for_teacher`)."""
    from logitstore.errors import LogitstoreError
    from logitstore.loader import require_teacher

    from .objective import TEACHER_LOSSES, for_teacher

    if not objective.needs_teacher:
        return objective
    url = store.location.url
    names = ", ".join(t for t in objective.loss_types if t in TEACHER_LOSSES)
    refusal = completion_refusal(store, objective)
    if refusal is not None:
        raise LogitstoreError(refusal)
    if store.kind.name == "unpaired":
        raise LogitstoreError(f"--loss {names} trains on a preference-pair store's teacher records; {url} is an "
                              f"{store.kind.name} store (KTO, BCO)")
    require_teacher(store)  # the loader's one line for a store without records
    return for_teacher(objective, str(store.teacher["kind"]), url)


def check_teacher_vocabulary(store: Any, objective: Objective, vocab_size: int) -> None:
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
