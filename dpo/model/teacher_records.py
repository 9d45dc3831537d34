"""A batch's teacher records on the device, aligned with the positions the policy scores.

The loader pads the records per row and completion token, in :func:`logitstore.loader.pad_pairs`' row layout:
entry ``[i, t]`` is the teacher's distribution over row i's t-th scored completion token. The policy's token loop
(:func:`dpo.model.scoring.token_logps`) gathers the hidden states that predict those same tokens, row by row in
order, so the records' real entries, taken row-major, line up with them one to one.
:meth:`TeacherRecords.per_position` runs the LM head over those hidden states slice by slice
(:func:`dpo.model.head.head_divergences`), never holding [batch, sequence, vocab] logits, and returns each
position's divergence for every beta the objective reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .head import head_divergences

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
        the scored tokens of `scored` [R, S] (bool), row-major, as :func:`dpo.model.scoring.token_logps` gathers them; the
        records' real entries, row-major, are the same tokens in the same order."""
        real = self.real()
        if not torch.equal(real.sum(dim=1), scored.sum(dim=1).to(real.device)):
            raise ValueError("the teacher records do not cover the batch's scored tokens one to one")
        device = hidden.device

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[real].to(device)

        return head_divergences(hidden, head, config, flat(self.ids), logps=flat(self.logps),  # type: ignore[arg-type]
                                tail_logp=flat(self.tail_logp), counts=flat(self.counts), betas=self.betas)
