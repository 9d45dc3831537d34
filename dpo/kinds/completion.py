"""Plain prompt/completion examples (TRL's prompt-completion format, as its SFT and distillation trainers take it):
distillation from the stored teacher records, without pairs or labels.

Format version 4 (:data:`logitstore.kinds.COMPLETION`). Each example scores one row, prompt + completion, tokenized
as TRL 1.16's SFTTrainer does. Only ``--loss distill`` reads it: TRL's DistillationTrainer reduction, the mean of
each scored position's divergence over every scored completion token of the batch (all ranks').
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from logitstore import kinds
from logitstore.content_key import content_keys
from logitstore.errors import InputDataError, LogitstoreError

from ..inputs import completions as data
from ..inputs.plan import Plan, tokenize_each
from ..inputs.tokenization import TokenizedPair
from ..objectives.objective import TDPO_LOSSES, UNPAIRED_LOSS_TYPES
from .base import SCORING, StoreKind, Task

EMPTY = np.zeros(0, dtype=np.int64)


class Completion(StoreKind):
    fields = kinds.COMPLETION
    scoring = dict(SCORING, kind="completion")  # keys hash (prompt, completion, nothing)

    def reads(self, record: Any) -> bool:
        return (isinstance(record, dict) and "completion" in record and "label" not in record
                and not any(f in record for f in ("chosen", "rejected")))

    def plan(self, cfg: Any, tokenizer: Any) -> Plan:
        """Tokenize every example as TRL's SFTTrainer does, dropping or refusing the unusable ones."""
        if cfg.max_prompt_length is not None:
            raise InputDataError("--max-prompt-length does not apply to prompt/completion data (TRL's SFTTrainer has "
                                 "no such option: prompt + completion is cut at the end)")
        keep, skipped, tokenized = tokenize_each(cfg.data, cfg.skip_invalid, data.load_completions(cfg.data, cfg.split),
                                                 lambda ex: data.tokenize_completion(tokenizer, ex, cfg.max_length),
                                                 "examples")
        rows = [TokenizedPair(prompt, completion, EMPTY) for prompt, completion in tokenized]
        keys = content_keys(*kinds.key_parts(self.fields, [[r.prompt_ids for r in rows],
                                                           [r.chosen_ids for r in rows]]), self.scoring)
        cost = np.array([len(r.prompt_ids) + len(r.chosen_ids) for r in rows], dtype=np.int64)
        # Shards are sized as when each completion was scored twice, so that a store's layout does not change.
        return Plan(keep, skipped, keys, cost, positions=2 * cost, tokenized=rows)

    def data_digest(self, examples: list[Any]) -> str:
        return data.data_digest(examples)

    def fingerprint(self, cfg: Any) -> dict[str, Any]:
        return {"name": self.name}

    def sample_source(self, store: Any, cfg: Any, tokenizer: Any,
                      ) -> tuple[Callable[[str], TokenizedPair | None], list[str]]:
        plan = self.plan(dataclasses.replace(cfg, skip_invalid=True), tokenizer)
        return dict(zip((ex.id for ex in plan.examples), plan.tokenized)).get, []  # type: ignore[arg-type]

    def export_records(self, store: Any, data_path: str, split: str | None) -> list[dict[str, Any]]:
        raise LogitstoreError(f"{store.location.url} is a completion store: its values feed distillation (logitstore "
                              "train --loss distill), not a TRL reference column; nothing to export")

    def accept(self, store: Any, objective: Any, cfg: Any, world: int, *, evaluation: bool = False) -> Any:
        """Only distill reads a completion store: it holds one completion per example and no pairs or labels."""
        from .teacher import check_teacher

        types = getattr(objective, "loss_types", (getattr(objective, "loss_type", "?"),))
        others = [t for t in types if t != "distill"]
        if others:
            needs = {"a preference-pair store": [t for t in others if t not in TDPO_LOSSES + UNPAIRED_LOSS_TYPES],
                     "a preference-pair store built with --top-k": [t for t in others if t in TDPO_LOSSES],
                     "an unpaired store (prompt/completion/label data)": [t for t in others
                                                                          if t in UNPAIRED_LOSS_TYPES]}
            reasons = [f"{', '.join(names)} need{'s' if len(names) == 1 else ''} {what}"
                       for what, names in needs.items() if names]
            raise LogitstoreError(f"{store.location.url} is a completion store (prompt/completion data, no pairs or "
                                  f"labels): it trains --loss distill alone; {'; '.join(reasons)}")
        return check_teacher(store, objective)

    def task(self, cfg: Any, objective: Any) -> Task:
        return CompletionTask(cfg, objective)


@dataclasses.dataclass(frozen=True)
class CompletionTerms:
    """A completion batch's distill term (no pairs, so no TDPO sequential KL): what the teacher helpers
    (:func:`dpo.kinds.teacher.global_token_mean`, :func:`~dpo.kinds.teacher.teacher_metrics`) take in place of a
    pair's terms."""

    distill: Any
    chosen_kl: None = None


def completion_terms(tokens: Any, objective: Any) -> CompletionTerms:
    """TRL's DistillationTrainer reduction: the mean of each scored position's divergence (distill's beta) over
    every scored completion token of the batch, as for pairs."""
    if tokens.divergence is None:
        raise ValueError("distill needs token_logps(..., teacher=records)")
    per_position = tokens.divergence[..., objective.teacher_betas.index(objective.distill_divergence)]
    return CompletionTerms(per_position[tokens.scored].mean())


class CompletionTask(Task):
    panels = [("loss", "distillation loss (per token)"), ("logps", "completion log-prob")]

    def loader(self, path: str, *, rank: int, world: int, device: Any, evaluation: bool = False,
               digest: str | None = None) -> tuple[Any, Any]:
        from logitstore.completion_loader import make_completion_loader

        cfg = self.cfg
        order: dict[str, Any] = ({"shuffle": False, "drop_last": False} if evaluation else
                                 {"seed": cfg.seed, "group_by_length": cfg.group_by_length, "rank": rank,
                                  "world_size": world, "num_workers": cfg.num_workers, "digest": digest})
        return make_completion_loader(path, cfg.batch_size, storage_options=cfg.storage_options,
                                      pin_memory=device.type == "cuda", teacher=True, **order)

    def step(self, policy: Any, batch: dict[str, Any], device: Any, *, training: bool = True,
             ) -> tuple[Any, dict[str, Any]]:
        """distill on one batch: one row per example, the mean divergence over its scored completion tokens."""
        from ..distributed.policy import score
        from ..model.loading import precision
        from .teacher import global_token_mean, teacher_metrics, teacher_records

        objective = self.objective
        ids = batch["input_ids"].to(device, non_blocking=True)
        attention = batch["attention_mask"].to(device, non_blocking=True)
        completion = batch["completion_mask"].to(device, non_blocking=True)
        teacher = teacher_records(batch, objective, device)
        with precision(device, self.cfg.dtype):
            tokens = score(policy, ids, attention, completion, teacher=teacher, split=self.cfg.split_sequences)
        terms = global_token_mean(completion_terms(tokens, objective), tokens.scored)  # TRL's mean over all ranks
        metrics = {"loss": terms.distill.detach(), "logps": tokens.per_token.detach().sum(dim=1).mean(),
                   **teacher_metrics(terms)}
        return terms.distill, metrics


KIND = Completion()
