"""Unpaired examples (prompt, completion, label: thumbs up or down): TRL's KTOTrainer's data and losses (KTO, its
APO-zero variant) and BCO.

Format version 3 (:data:`logitstore.kinds.UNPAIRED`). Each example scores two rows: prompt + completion and prompt +
its KL completion, the completion of its neighbour within chunks of the KL batch size (TRL's pairing,
:func:`logitstore.kinds.kl_rows`). KTO's KL term reads the chunk, so a KTO run trains the store's chunks in order,
one per rank, and its batch size is the chunk's.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from logitstore import kinds
from logitstore.content_key import content_keys
from logitstore.errors import InputDataError, LogitstoreError

from ..inputs import unpaired as data
from ..inputs.plan import Plan, tokenize_each
from ..inputs.tokenization import TokenizedPair
from ..objectives.objective import TEACHER_LOSSES, UnpairedObjective
from .base import SCORING, StoreKind, Task


class Unpaired(StoreKind):
    fields = kinds.UNPAIRED
    # Prompt + completion and prompt + KL completion are scored by the pairs' rule; the kind keeps the keys apart.
    scoring = dict(SCORING, kind="unpaired")

    def reads(self, record: Any) -> bool:
        return data.is_unpaired(record)

    def plan(self, cfg: Any, tokenizer: Any) -> Plan:
        """Tokenize every example, drop or refuse the unusable ones, then pair each with its KL completion within
        chunks of `kl_batch_size` of the examples kept (TRL pairs after dropping, too)."""
        if cfg.kl_batch_size < 2:
            raise InputDataError(f"--kl-batch-size {cfg.kl_batch_size}: KTO's KL term needs batches of at least 2 "
                                 "(TRL refuses a per-device batch size of 1)")
        if cfg.max_prompt_length is not None:
            raise InputDataError("--max-prompt-length does not apply to unpaired data (TRL's KTOTrainer has no such "
                                 "option: prompt + completion is cut at the end)")
        keep, skipped, tokenized = tokenize_each(cfg.data, cfg.skip_invalid, data.load_unpaired(cfg.data, cfg.split),
                                                 lambda ex: data.tokenize_example(tokenizer, ex, cfg.max_length),
                                                 "examples")
        if len(keep) < cfg.kl_batch_size:
            raise InputDataError(f"{cfg.data}: {len(keep)} examples are fewer than one KL batch of "
                                 f"{cfg.kl_batch_size} (--kl-batch-size); use a smaller --kl-batch-size, and train "
                                 "with that batch size")
        triples = data.pair_kl(tokenized, cfg.kl_batch_size, cfg.max_length)
        keys = content_keys([t.prompt_ids for t in triples], [t.chosen_ids for t in triples],
                            [t.rejected_ids for t in triples], self.scoring)
        cost = np.array([len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in triples],
                        dtype=np.int64)
        positions = np.array([2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in triples],
                             dtype=np.int64)
        return Plan(keep, skipped, keys, cost, positions=positions, tokenized=triples)

    def data_digest(self, examples: list[Any]) -> str:
        return data.data_digest(examples)

    def fingerprint(self, cfg: Any) -> dict[str, Any]:
        return {"name": self.name, "kl_batch_size": cfg.kl_batch_size}  # KL values depend on the chunks

    def writer_options(self, cfg: Any) -> dict[str, Any]:
        return {"kl_batch_size": cfg.kl_batch_size}

    def row_values(self, examples: list[Any], rows: range) -> dict[str, list[Any]]:
        return {"label": [int(examples[i].label) for i in rows]}  # from the data, computed and reused rows alike

    def sample_source(self, store: Any, cfg: Any, tokenizer: Any,
                      ) -> tuple[Callable[[str], TokenizedPair | None], list[str]]:
        """The KL completion is the one the store's KL pairing names, so a sample checks the pairing too."""
        import dataclasses

        plan = self.plan(dataclasses.replace(cfg, skip_invalid=True), tokenizer)
        if [ex.id for ex in plan.examples] != store.ids:
            return (lambda key: None), [f"{cfg.data} does not hold the store's examples in the store's order (the KL "
                                        "pairing follows the order)"]
        labels = store.row_values(np.arange(len(store)))["label"]
        wrong = [ex.id for ex, label in zip(plan.examples, labels.tolist()) if int(ex.label) != label]
        if wrong:
            return (lambda key: None), [f"example {wrong[0]!r}: stored label differs from the data ({len(wrong)} "
                                        "examples)"]
        tokenized = dict(zip((ex.id for ex in plan.examples), plan.tokenized))  # type: ignore[arg-type]
        return tokenized.get, []

    def export_records(self, store: Any, data_path: str, split: str | None) -> list[dict[str, Any]]:
        return data.export_records(data_path, split)

    def accept(self, store: Any, objective: Any, cfg: Any, world: int, *, evaluation: bool = False) -> Any:
        url = store.location.url
        if not isinstance(objective, UnpairedObjective):
            names = [t for t in objective.loss_types if t in TEACHER_LOSSES]
            if names:
                raise LogitstoreError(f"--loss {', '.join(names)} trains on the teacher records of a preference-pair "
                                      f"or completion store; {url} is an unpaired store (KTO, BCO: train it with "
                                      "--loss kto, apo_zero_unpaired or bco)")
            raise LogitstoreError(f"{url} is an unpaired store (KTO, BCO); train it with --loss kto, "
                                  "apo_zero_unpaired or bco")
        if evaluation or not objective.uses_kl:
            return objective
        chunk = store.kl_batch_size
        if cfg.batch_size != chunk * world:  # a KL loss trains in the chunks the store paired KL completions within
            raise LogitstoreError(
                f"{url} pairs KTO's KL completions within batches of {chunk}; train with --batch-size "
                f"{chunk * world}{f' ({chunk} per rank)' if world > 1 else ''}, or rebuild it with --kl-batch-size "
                f"{max(cfg.batch_size // world, 1)} for this batch size")
        if cfg.group_by_length:
            raise LogitstoreError("--group-by-length reorders the examples, and KTO's KL term needs the store's "
                                  "order (TRL trains KTO sequentially too)")
        return objective

    def task(self, cfg: Any, objective: Any) -> Task:
        return UnpairedTask(cfg, objective)


class UnpairedTask(Task):
    panels = [("loss", "loss"), ("kl", "KL estimate (KTO's z0)"), ("rewards/chosen", "desirable reward")]

    def __init__(self, cfg: Any, objective: UnpairedObjective):
        super().__init__(cfg, objective)
        self.running: Any = None  # BCO's running reward mean δ: saved with the run
        if objective.loss_type == "bco":
            from ..objectives.unpaired_losses import RunningMean

            self.running = RunningMean()

    def loader(self, path: str, *, rank: int, world: int, device: Any, evaluation: bool = False,
               digest: str | None = None) -> tuple[Any, Any]:
        """KTO trains the store's KL chunks in order, one per rank (TRL's sequential per-device batches), and is
        evaluated in the store's chunks (each rank its own whole chunks)."""
        import logitstore
        from logitstore.unpaired_loader import make_unpaired_loader

        cfg, uses_kl = self.cfg, self.objective.uses_kl
        pin = device.type == "cuda"
        if evaluation:
            chunk = logitstore.open(path, storage_options=cfg.storage_options).kl_batch_size or cfg.batch_size
            return make_unpaired_loader(path, chunk if uses_kl else cfg.batch_size, drop_last=False,
                                        storage_options=cfg.storage_options, pin_memory=pin)
        return make_unpaired_loader(path, cfg.batch_size, seed=cfg.seed, shuffle=not uses_kl, rank=rank,
                                    world_size=world, num_workers=cfg.num_workers,
                                    storage_options=cfg.storage_options, digest=digest, pin_memory=pin)

    def step(self, policy: Any, batch: dict[str, Any], device: Any, *, training: bool = True,
             ) -> tuple[Any, dict[str, Any]]:
        """Mean KTO / APO-zero / BCO loss of one batch, as TRL 1.16's KTOTrainer takes it; BCO's δ is updated in
        training and only read in evaluation."""
        import torch

        from ..distributed import group as distributed
        from ..distributed.policy import score
        from ..model.loading import precision
        from ..objectives.unpaired_losses import bco_loss, kl_estimate, kto_loss

        objective = self.objective
        ids = batch["input_ids"].to(device, non_blocking=True)  # n completion rows, then n KL rows
        attention = batch["attention_mask"].to(device, non_blocking=True)
        completion = batch["completion_mask"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        ref = batch["ref_logps"].to(device, non_blocking=True)
        n = labels.numel()

        def half(rows: slice) -> tuple[torch.Tensor, ...]:  # each half without the other half's padding columns
            width = int(attention[rows].sum(dim=1).max())
            return ids[rows, :width], attention[rows, :width], completion[rows, :width]

        with precision(device, self.cfg.dtype):
            policy_logps = score(policy, *half(slice(0, n)), split=self.cfg.split_sequences).per_token.sum(dim=1)
        weights = {"beta": objective.beta, "desirable_weight": objective.desirable_weight,
                   "undesirable_weight": objective.undesirable_weight}
        if objective.loss_type == "bco":
            reduce = distributed.all_reduce_sum if distributed.is_distributed() else None
            out = bco_loss(policy_logps, ref, labels, self.running, update=training, reduce=reduce, **weights)
        else:
            kl = torch.zeros((), device=device)
            if objective.uses_kl:  # the reference point: no gradient flows through it (TRL scores it without)
                with torch.no_grad(), precision(device, self.cfg.dtype):
                    policy_kl = score(policy, *half(slice(n, 2 * n)),
                                      split=self.cfg.split_sequences).per_token.sum(dim=1)
                # Averaged over the ranks' chunks in training; in evaluation each rank's chunk is its own.
                kl = kl_estimate(policy_kl, batch["ref_kl_logps"].to(device, non_blocking=True),
                                 distributed.gather if training and distributed.is_distributed() else None)
            out = kto_loss(policy_logps, ref, labels, kl, loss_type=objective.loss_type, **weights)
        nan = torch.tensor(float("nan"), device=device)
        metrics = {
            "loss": out.losses.detach().nanmean(),
            "kl": out.kl.detach().reshape(()),
            "rewards/chosen": out.chosen_rewards.mean() if out.chosen_rewards.numel() else nan,
            "rewards/rejected": out.rejected_rewards.mean() if out.rejected_rewards.numel() else nan,
            "logps": policy_logps.detach().mean(),
        }
        if out.delta is not None:
            metrics["delta"] = out.delta.detach()
        return out.losses.nanmean(), metrics

    def state_dict(self) -> dict[str, Any]:
        return {"bco_running": self.running.state_dict()} if self.running is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.running is not None:
            self.running.load_state_dict(state["bco_running"])


KIND = Unpaired()
