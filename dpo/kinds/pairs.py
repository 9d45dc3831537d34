"""Preference pairs (prompt, chosen, rejected): DPO's data, TRL's DPOTrainer's losses, and with teacher records
(--top-k / --sample-k) distillation and TDPO on both sides of each pair.

Format version 2 (:data:`logitstore.kinds.PAIRS`). Each pair scores two rows, prompt + chosen and prompt + rejected;
its loss reads the two sums (and whatever the objective adds: token counts, the SFT term, WPO weights, teacher
terms, :mod:`dpo.objectives.pair_inputs`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from logitstore import kinds
from logitstore.content_key import content_keys
from logitstore.errors import LogitstoreError

from ..inputs import pairs as data
from ..inputs.plan import Plan, tokenize_each
from ..inputs.tokenization import TokenizedPair, tokenize_pair
from ..objectives.objective import Objective
from .base import SCORING, StoreKind, Task


class Pairs(StoreKind):
    fields = kinds.PAIRS
    scoring = SCORING  # no kind entry: pairs' content keys predate store kinds

    def reads(self, record: Any) -> bool:
        return True  # what no other kind reads: the pair reader then names what is wrong with it

    def plan(self, cfg: Any, tokenizer: Any) -> Plan:
        def tokenize(ex: data.PreferenceExample) -> TokenizedPair:
            return tokenize_pair(tokenizer, ex, cfg.max_length, cfg.max_prompt_length)

        def summary(ex: data.PreferenceExample) -> tuple[np.ndarray, int, int]:
            pair = tokenize(ex)  # not kept: a pair is tokenized again when its shard is scored
            p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            key = content_keys([pair.prompt_ids], [pair.chosen_ids], [pair.rejected_ids], self.scoring)[0]
            return key, p + max(c, r), 2 * p + c + r

        keep, skipped, summaries = tokenize_each(cfg.data, cfg.skip_invalid, data.load_examples(cfg.data, cfg.split),
                                                 summary, "pairs")
        keys, cost, positions = zip(*summaries)
        return Plan(keep, skipped, np.array(keys, dtype=np.uint8), np.array(cost, dtype=np.int64),
                    np.array(positions, dtype=np.int64), tokenize_row=tokenize)

    def data_digest(self, examples: list[Any]) -> str:
        return data.data_digest(examples)

    def sample_source(self, store: Any, cfg: Any, tokenizer: Any,
                      ) -> tuple[Callable[[str], TokenizedPair | None], list[str]]:
        by_id = {ex.id: ex for ex in data.load_examples(cfg.data, cfg.split)}

        def lookup(key: str) -> TokenizedPair | None:
            ex = by_id.get(key)
            return None if ex is None else tokenize_pair(tokenizer, ex, cfg.max_length, cfg.max_prompt_length)

        return lookup, []

    def export_records(self, store: Any, data_path: str, split: str | None) -> list[dict[str, Any]]:
        return data.export_records(data_path, split)

    def accept(self, store: Any, objective: Any, cfg: Any, world: int, *, evaluation: bool = False) -> Any:
        from logitstore.ld_dpo import require_per_token

        from .teacher import check_teacher

        if not isinstance(objective, Objective):  # an unpaired loss
            if evaluation:
                raise LogitstoreError(f"{cfg.eval_store} holds preference pairs; evaluate {objective.loss_type} on "
                                      "an unpaired store")
            raise LogitstoreError(f"--loss {objective.loss_type} trains on an unpaired store; {store.location.url} "
                                  "holds preference pairs (train it with a DPO loss, or build a store from "
                                  "prompt/completion/label data)")
        objective = check_teacher(store, objective)  # distill and TDPO: the records, distill's beta for them
        if objective.ld_alpha is not None:
            require_per_token(store)
        return objective

    def task(self, cfg: Any, objective: Any) -> Task:
        return PairsTask(cfg, objective)


class PairsTask(Task):

    def __init__(self, cfg: Any, objective: Objective):
        super().__init__(cfg, objective)
        if objective.needs_teacher and "distill" in objective.loss_types:  # its term next to the total
            self.panels = [("loss", "loss"), ("distill/loss", "distillation term (per token)"),
                           ("rewards/margins", "reward margin")]
        else:
            self.panels = [("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"),
                           ("rewards/margins", "reward margin")]

    def loader(self, path: str, *, rank: int, world: int, device: Any, evaluation: bool = False,
               digest: str | None = None) -> tuple[Any, Any]:
        from logitstore.loader import make_loader

        cfg, objective = self.cfg, self.objective
        order: dict[str, Any] = ({"shuffle": False, "drop_last": False} if evaluation else
                                 {"seed": cfg.seed, "group_by_length": cfg.group_by_length, "rank": rank,
                                  "world_size": world, "num_workers": cfg.num_workers, "digest": digest})
        return make_loader(path, cfg.batch_size, storage_options=cfg.storage_options, ld_alpha=objective.ld_alpha,
                           pin_memory=device.type == "cuda", teacher=objective.needs_teacher, **order)

    def step(self, policy: Any, batch: dict[str, Any], device: Any, *, training: bool = True,
             ) -> tuple[Any, dict[str, Any]]:
        """Mean DPO loss of one batch and its metrics (as tensors; averaged by the loop)."""
        from ..distributed.policy import score
        from ..model.loading import precision
        from ..objectives.pair_inputs import pair_logps
        from ..objectives.pair_losses import dpo_loss
        from .teacher import global_token_mean, teacher_metrics, teacher_records

        objective = self.objective
        ids = batch["input_ids"].to(device, non_blocking=True)  # from pinned memory (make_loader): asynchronous
        attention = batch["attention_mask"].to(device, non_blocking=True)
        completion = batch["completion_mask"].to(device, non_blocking=True)
        teacher = teacher_records(batch, objective, device)  # None unless distill or TDPO reads the teacher
        with precision(device, self.cfg.dtype):  # through DDP/FSDP2 in a distributed run (dpo/distributed)
            tokens = score(policy, ids, attention, completion, sum_sq=objective.use_weighting, teacher=teacher,
                           split=self.cfg.split_sequences)
        pair = pair_logps(tokens, completion, batch["ref_chosen_logps"].to(device, non_blocking=True),
                          batch["ref_rejected_logps"].to(device, non_blocking=True), objective)
        pair = global_token_mean(pair, tokens.scored)  # distill: TRL's mean over all ranks' tokens
        out = dpo_loss(pair, objective)
        metrics = {
            "loss": out.losses.detach().mean(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "logps/chosen": pair.chosen.detach().mean(),
            "logps/rejected": pair.rejected.detach().mean(),
            **teacher_metrics(pair),
        }
        return out.losses.mean(), metrics


KIND = Pairs()
