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
from .objective import Objective

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

    @property
    def kind(self) -> str:
        return "sampled" if self.counts is not None else "top_k"

    def entries(self) -> torch.Tensor:
        """[R] the real (unpadded) positions of each row: a top-k position's first log-prob is finite, a sampled
        position's counts add up to K > 0."""
        if self.counts is not None:
            real = self.counts.sum(dim=-1) > 0
        else:
            real = torch.isfinite(self.logps[..., 0])  # type: ignore[index]
        return real.sum(dim=1)

    def per_position(self, hidden: torch.Tensor, scored: torch.Tensor, head: Any, config: Any) -> torch.Tensor:
        """[M, len(betas)] divergences at the scored positions: `hidden` [M, H] are the hidden states that predict
        the scored tokens of `scored` [R, S] (bool), row-major, as :func:`dpo.logps.token_logps` gathers them."""
        counts = scored.sum(dim=1).to(self.ids.device)
        width = self.ids.shape[1]
        if counts.numel() and int(counts.max()) > width:
            raise ValueError(f"the teacher records cover {width} completion tokens per row, the batch scores "
                             f"{int(counts.max())}")
        real = torch.arange(width, device=self.ids.device)[None, :] < counts[:, None]  # [R, T]
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


def teacher_metrics(pair: Any) -> dict[str, torch.Tensor]:
    """What the teacher terms add to a step's record: distill's loss, TDPO's sequential KL of each side."""
    out = {}
    if pair.distill is not None:
        out["distill/loss"] = pair.distill.detach()
    if pair.chosen_kl is not None:
        out["tdpo/seq_kl_chosen"] = pair.chosen_kl.detach().mean()
        out["tdpo/seq_kl_rejected"] = pair.rejected_kl.detach().mean()
    return out


def teacher_header(store: Any) -> dict[str, Any] | None:
    """The store's teacher entry (``{"kind": "top_k" | "sampled", "k": K, ...}``), or None without records."""
    info = getattr(store, "teacher", None)
    if info is None or isinstance(info, dict):
        return info
    return {name: getattr(info, name) for name in ("kind", "k") if hasattr(info, name)}


def check_teacher(store: Any, objective: Objective) -> Objective:
    """Refuse a store whose records cannot serve `objective`, in one line; return it with distill's beta resolved
    for the store's record kind (:func:`dpo.objective.for_teacher`)."""
    from logitstore.errors import LogitstoreError

    from .objective import for_teacher

    if not objective.needs_teacher:
        return objective
    url = store.location.url
    names = ", ".join(t for t in objective.loss_types if t in ("distill", "tdpo1", "tdpo2"))
    if store.kind.name != "pairs":
        raise LogitstoreError(f"--loss {names} trains on a preference-pair store's teacher records; {url} is an "
                              f"{store.kind.name} store (KTO, BCO)")
    info = teacher_header(store)
    if not info:
        raise LogitstoreError(f"{url} holds no top-k teacher records; rebuild with --top-k K")
    return for_teacher(objective, str(info.get("kind")), url)


def check_teacher_vocabulary(store: Any, objective: Objective, vocab_size: int) -> None:
    """A record of more tokens per position than the model's vocabulary was made with another tokenizer."""
    from logitstore.errors import LogitstoreError

    info = teacher_header(store) if objective.needs_teacher else None
    if info and info.get("kind") == "top_k" and int(info.get("k", 0)) > vocab_size:
        raise LogitstoreError(f"{store.location.url} holds the teacher's top {info['k']} tokens per position, more "
                              f"than the model's vocabulary of {vocab_size}; the store was built for another "
                              "tokenizer")


def check_teacher_batch(batch: dict[str, torch.Tensor], vocab_size: int) -> tuple[torch.Tensor, str] | None:
    """The rows (of ``batch["rows"]``, a bool mask) whose teacher records do not fit the batch, and why: ids
    outside the model's vocabulary, or another number of positions than the row scores. None if all fit."""
    if "teacher_ids" not in batch:
        return None
    ids = batch["teacher_ids"]
    records = TeacherRecords(ids, (0.0,), logps=batch.get("teacher_logps"), counts=batch.get("teacher_counts"))
    n = batch["rows"].numel()
    outside = ((ids < 0) | (ids >= vocab_size)).flatten(1).any(dim=1)
    if outside.any():
        token = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        return outside[:n] | outside[n:], (f"a teacher token id {token}, outside the model's vocabulary of "
                                           f"{vocab_size}; the store was built for another tokenizer")
    scored = batch["completion_mask"][:, 1:].sum(dim=1)
    differ = records.entries() != scored
    if differ.any():
        i = int(differ.nonzero()[0, 0])
        return differ[:n] | differ[n:], (f"teacher records for {int(records.entries()[i])} positions of a "
                                         f"completion that scores {int(scored[i])} tokens; the store is damaged")
    return None
