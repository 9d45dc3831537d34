"""DPO training from a logitstore store: only the policy is in memory; the reference lives in the store.

The loop reads top to bottom: set up, then for each optimizer step: fetch micro-batches from the store, score
them with the policy, take the DPO loss against the stored reference log-probs, step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

import logitstore
from logitstore.errors import FingerprintMismatchError, IncompleteStoreError, InputDataError, LogitstoreError
from logitstore.ld_dpo import require_per_token
from logitstore.loader import Prefetcher, make_loader
from logitstore.unpaired_loader import make_unpaired_loader
from logitstore.completion_loader import make_completion_loader

from . import distributed, sharded_io
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distill_step import completion_refusal, completion_terms, per_example
from .distill_step import (check_teacher, check_teacher_batch, check_teacher_vocabulary, global_token_mean,
                           teacher_metrics, teacher_records)
from .logps import exact_4bit, pair_logps
from .losses import dpo_loss
from .memory import PeakMeter, is_out_of_memory
from .models import (TOKENIZER_FILES, check_model_extras, check_model_folder, load_model, model_dtype,
                     model_fingerprint, peft_wrapping, precision, resolve_device)
from .objective import Objective, UnpairedObjective, unpaired_objective
from .trackers import open_trackers
from .unpaired_losses import RunningMean, bco_loss, kl_estimate, kto_loss


@dataclasses.dataclass
class TrainConfig:
    model: str
    store: str
    out: str
    eval_store: str | None = None
    adapter: str | None = None  # continue training this peft adapter instead of a fresh LoRA
    revision: str | None = None  # of a Hub model name
    adapter_revision: str | None = None
    lora: bool = True  # False: train every weight (the reference is in the store, so no second model copy)
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    schedule: str = "linear"  # or "cosine", "constant"
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "paged_adamw_8bit" (bitsandbytes)
    grad_clip: float = 1.0
    beta: float = 0.1
    loss: str | list[str] = "sigmoid"  # a loss type, or several ("sigmoid,sft") summed with loss_weights
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha_coef: float | None = None
    ld_alpha: float | None = None  # LD-DPO; the reference comes from the store's per-token values
    use_weighting: bool = False  # WPO
    discopop_tau: float | None = None
    distill_beta: float | None = None  # distill: 0 forward KL, 1 reverse KL (TRL's default), between JSD
    tdpo_alpha: float | None = None  # TDPO2's α (default 0.5)
    desirable_weight: float = 1.0  # unpaired losses (kto, apo_zero_unpaired, bco), as TRL's KTOConfig
    undesirable_weight: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05  # in effect only with disable_dropout=False
    disable_dropout: bool = True  # TRL's DPOConfig default: every dropout in the policy off, LoRA's included
    target_modules: str = "all-linear"
    quantize: str | None = None
    dtype: str = "auto"  # resolved by dpo.models.resolve_dtype when training starts
    device: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    allow_fingerprint_mismatch: bool = False
    expect_digest: str | None = None  # refuse a training store with other contents (docs/FORMAT.md, digest)
    plot: bool = True
    storage_options: dict[str, Any] | None = None
    report_to: tuple[str, ...] = ()  # trackers each logged step also goes to (dpo/trackers.py)


def objective_of(cfg: TrainConfig) -> Objective | UnpairedObjective:
    """The objective a config asks for: a DPO objective (refusing what TRL 1.16 refuses, and options without
    effect), or an unpaired one (kto, apo_zero_unpaired, bco) for an unpaired store."""
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


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Warmup then linear/cosine decay to 0 (a pure function of the step, so nothing to checkpoint)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * max(0.0, 1 - progress)


def check_store_matches(store: logitstore.Store, cfg: TrainConfig) -> None:
    """The store's reference must come from the policy's base model and tokenizer."""
    ours = model_fingerprint(cfg.model, adapter=None, dtype=cfg.dtype, quantize=cfg.quantize, revision=cfg.revision,
                             device=cfg.device)
    theirs = store.fingerprint
    differ = [k for k in ("model", "tokenizer") if theirs.get(k) != ours[k]]
    if differ and not cfg.allow_fingerprint_mismatch:
        raise FingerprintMismatchError(
            f"{store.location.url} was built with a different {' and '.join(differ)} than {cfg.model}; "
            "train with the model the store was built from, or pass --allow-fingerprint-mismatch")


def check_kind(store: logitstore.Store, objective: Objective | UnpairedObjective, cfg: TrainConfig,
               world: int) -> None:
    """The store's kind must fit the loss, and a KL loss must train in the chunks the store paired KL completions
    within (TRL's per-device batches)."""
    url = store.location.url
    refusal = completion_refusal(store, objective)
    if refusal is not None:
        raise LogitstoreError(refusal)
    if store.kind.name == "completion":
        return
    if isinstance(objective, UnpairedObjective):
        if store.kind.name != "unpaired":
            raise LogitstoreError(f"--loss {objective.loss_type} trains on an unpaired store; {url} holds preference "
                                  "pairs (train it with a DPO loss, or build a store from prompt/completion/label data)")
        chunk = store.kl_batch_size
        if objective.uses_kl and cfg.batch_size != chunk * world:  # type: ignore[operator]
            raise LogitstoreError(
                f"{url} pairs KTO's KL completions within batches of {chunk}; train with --batch-size "
                f"{chunk * world}{f' ({chunk} per rank)' if world > 1 else ''}, or rebuild it with --kl-batch-size "
                f"{max(cfg.batch_size // world, 1)} for this batch size")
        if objective.uses_kl and cfg.group_by_length:
            raise LogitstoreError("--group-by-length reorders the examples, and KTO's KL term needs the store's "
                                  "order (TRL trains KTO sequentially too)")
    elif store.kind.name != "pairs":
        raise LogitstoreError(f"{url} is an unpaired store (KTO, BCO); train it with --loss kto, apo_zero_unpaired "
                              "or bco")


def check_setup(cfg: TrainConfig) -> None:
    """Refuse combinations that cannot train, before anything is loaded or written."""
    if not cfg.lora and cfg.quantize:
        raise LogitstoreError("--no-lora trains every weight, and 4-bit weights cannot be trained; drop --quantize "
                              "4bit, or train a LoRA adapter on the 4-bit model")
    check_model_extras(quantize=cfg.quantize, adapter=cfg.adapter, optimizer=cfg.optimizer)


def enable_checkpointing(model: Any, cfg: TrainConfig) -> None:
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def setup_policy(cfg: TrainConfig) -> Any:
    """The policy: the base model (4-bit if asked) with a fresh LoRA, the given adapter, or every weight trainable
    (`lora=False`; a given adapter is then merged into the weights first)."""
    if cfg.device == "meta":  # to be sharded by FSDP2 (dpo/fsdp2.py); dpo/sharded_io.py reads each rank's part
        model = sharded_io.empty_model(check_model_folder(cfg.model, cfg.revision), dtype=cfg.dtype,
                                       attn_implementation=cfg.attn_implementation)
        enable_checkpointing(model, cfg)
        return model.requires_grad_(True)
    model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device=cfg.device, adapter=cfg.adapter,
                       trainable_adapter=cfg.lora, revision=cfg.revision, adapter_revision=cfg.adapter_revision,
                       attn_implementation=cfg.attn_implementation)
    # Not peft's prepare_model_for_kbit_training: its float32 copies of norms, embeddings and LM head would make
    # the policy compute other numerics than the reference pass did (step-0 loss off ln 2 in bf16) and cost memory.
    if cfg.quantize:
        model.enable_input_require_grads()  # every 4-bit layer on bitsandbytes' float32 path (see exact_4bit)
    enable_checkpointing(model, cfg)
    if not cfg.lora:
        if cfg.adapter is not None:
            model = model.merge_and_unload()
        return without_dropout(model.requires_grad_(True), cfg)
    if cfg.adapter is None:
        # Imported here: peft brings in bitsandbytes (155 MiB resident on CPU), which training every weight never uses.
        from peft import LoraConfig, get_peft_model

        targets: Any = cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(",")
        with peft_wrapping():
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    return without_dropout(model, cfg)


def without_dropout(model: Any, cfg: TrainConfig) -> Any:
    """As TRL's DPOTrainer does by default (disable_dropout): p = 0 in every dropout module, which then returns its
    input as is, so the forward keeps no dropped copy of each adapted layer's input and no mask for backward."""
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "adamw":
        raise LogitstoreError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or paged_adamw_8bit")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def vocabulary_size(model: Any) -> int:
    """Token ids the model can embed and score."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    return min(embed.num_embeddings, getattr(head, "out_features", embed.num_embeddings))


def logits_width(model: Any) -> int:
    """Next-token logits the model computes (its LM head's rows): what teacher records are compared with."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def _examples(store: logitstore.Store, rows: torch.Tensor) -> str:
    names = [repr(store.id_of(int(r))) for r in rows[:3]]
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    return f"example{'s' if len(rows) > 1 else ''} {', '.join(names)}{more}"


def check_batch(batch: dict[str, torch.Tensor], store: logitstore.Store, vocab_size: int,
                logits: int | None = None) -> None:
    """Refuse a batch whose reference values are not finite or whose token ids the model does not have, naming
    the examples (a NaN reference would turn every weight NaN; an id past the vocabulary fails deep in torch);
    teacher records are checked against the model's `logits` width (default `vocab_size`)."""
    rows = batch["rows"]
    names = ("ref_chosen_logps", "ref_rejected_logps") if "ref_chosen_logps" in batch else ("ref_logps", "ref_kl_logps")
    sides = [side.logps.rsplit("_", 1)[0] for side in store.kind.sides]  # chosen/rejected, completion/kl, completion
    refs = torch.stack([batch[name] for name in names if name in batch], dim=1)
    bad = ~torch.isfinite(refs).all(dim=1)
    if bad.any():
        first = refs[bad][0]
        values = ", ".join(f"{side} {float(v)}" for side, v in zip(sides, first))
        raise InputDataError(f"{store.location.url}: {_examples(store, rows[bad])} "
                             f"{'have' if int(bad.sum()) > 1 else 'has'} a non-finite reference log-prob "
                             f"({values}); the store cannot be trained on")
    ids = batch["input_ids"]
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        per_row = outside.any(dim=1)
        bad_rows = per_example(per_row, len(rows))  # chosen rows, then rejected rows (completion: one row each)
        token = int(ids[outside][0])
        raise InputDataError(f"{store.location.url}: {_examples(store, rows[bad_rows])} "
                             f"{'hold' if int(bad_rows.sum()) > 1 else 'holds'} token id {token}, outside the "
                             f"model's vocabulary of {vocab_size}; the store was built for another tokenizer")
    misfit = check_teacher_batch(batch, logits or vocab_size)
    if misfit is not None:
        bad_rows, why = misfit
        raise InputDataError(f"{store.location.url}: {_examples(store, rows[bad_rows])} "
                             f"{'hold' if int(bad_rows.sum()) > 1 else 'holds'} {why}")


def dpo_batch(model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, device: Any,
              objective: Objective) -> tuple[torch.Tensor, dict]:
    """Mean DPO loss of one batch and its metrics (as tensors; averaged later)."""
    ids = batch["input_ids"].to(device, non_blocking=True)  # from pinned memory (make_loader): asynchronous
    attention = batch["attention_mask"].to(device, non_blocking=True)
    completion = batch["completion_mask"].to(device, non_blocking=True)
    teacher = teacher_records(batch, objective, device)  # None unless distill or TDPO reads the teacher
    with precision(device, cfg.dtype):  # through DDP/FSDP2 in a distributed run (dpo/distributed.py)
        tokens = distributed.score(model, ids, attention, completion, sum_sq=objective.use_weighting, teacher=teacher)
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


def completion_batch(model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, device: Any,
                     objective: Objective) -> tuple[torch.Tensor, dict]:
    """distill on one batch of a completion store: one row per example, the mean divergence over its scored
    completion tokens (dpo/distill_step.py), as TRL's DistillationTrainer reduces it."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    attention = batch["attention_mask"].to(device, non_blocking=True)
    completion = batch["completion_mask"].to(device, non_blocking=True)
    teacher = teacher_records(batch, objective, device)
    with precision(device, cfg.dtype):
        tokens = distributed.score(model, ids, attention, completion, teacher=teacher)
    terms = global_token_mean(completion_terms(tokens, objective), tokens.scored)  # TRL's mean over all ranks
    metrics = {"loss": terms.distill.detach(), "logps": tokens.per_token.detach().sum(dim=1).mean(),
               **teacher_metrics(terms)}
    return terms.distill, metrics


def unpaired_batch(model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, device: Any,
                   objective: UnpairedObjective, running: RunningMean | None = None,
                   training: bool = True) -> tuple[torch.Tensor, dict]:
    """Mean KTO / APO-zero / BCO loss of one batch of an unpaired store, as TRL 1.16's KTOTrainer takes it."""
    ids = batch["input_ids"].to(device, non_blocking=True)  # n completion rows, then n KL rows
    attention = batch["attention_mask"].to(device, non_blocking=True)
    completion = batch["completion_mask"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    ref = batch["ref_logps"].to(device, non_blocking=True)
    n = labels.numel()

    def half(rows: slice) -> tuple[torch.Tensor, ...]:  # each half without the other half's padding columns
        width = int(attention[rows].sum(dim=1).max())
        return ids[rows, :width], attention[rows, :width], completion[rows, :width]

    with precision(device, cfg.dtype):
        policy = distributed.score(model, *half(slice(0, n))).per_token.sum(dim=1)
    weights = {"beta": objective.beta, "desirable_weight": objective.desirable_weight,
               "undesirable_weight": objective.undesirable_weight}
    if objective.loss_type == "bco":
        assert running is not None
        reduce = distributed.all_reduce_sum if distributed.is_distributed() else None
        out = bco_loss(policy, ref, labels, running, update=training, reduce=reduce, **weights)
    else:
        kl = torch.zeros((), device=device)
        if objective.uses_kl:  # the reference point: no gradient flows through it (TRL scores it without)
            with torch.no_grad(), precision(device, cfg.dtype):
                policy_kl = distributed.score(model, *half(slice(n, 2 * n))).per_token.sum(dim=1)
            # Averaged over the ranks' chunks in training; in evaluation each rank's chunk is its own (as alone).
            kl = kl_estimate(policy_kl, batch["ref_kl_logps"].to(device, non_blocking=True),
                             distributed.gather if training and distributed.is_distributed() else None)
        out = kto_loss(policy, ref, labels, kl, loss_type=objective.loss_type, **weights)
    nan = torch.tensor(float("nan"), device=device)
    metrics = {
        "loss": out.losses.detach().nanmean(),
        "kl": out.kl.detach().reshape(()),
        "rewards/chosen": out.chosen_rewards.mean() if out.chosen_rewards.numel() else nan,
        "rewards/rejected": out.rejected_rewards.mean() if out.rejected_rewards.numel() else nan,
        "logps": policy.detach().mean(),
    }
    if out.delta is not None:
        metrics["delta"] = out.delta.detach()
    return out.losses.nanmean(), metrics


def evaluate(model: Any, path: str, cfg: TrainConfig, device: Any, running: RunningMean | None = None,
             ) -> dict[str, float]:
    objective = objective_of(cfg)
    if isinstance(objective, UnpairedObjective):
        return _evaluate_unpaired(model, path, cfg, device, objective, running)
    completion_store = logitstore.open(path, storage_options=cfg.storage_options).kind.name == "completion"
    if completion_store:  # distill alone (check_teacher refuses the rest)
        loader, sampler = make_completion_loader(path, cfg.batch_size, shuffle=False, drop_last=False,
                                                 storage_options=cfg.storage_options,
                                                 pin_memory=device.type == "cuda", teacher=True)
    else:
        loader, sampler = make_loader(path, cfg.batch_size, shuffle=False, drop_last=False,
                                      storage_options=cfg.storage_options, ld_alpha=objective.ld_alpha,
                                      pin_memory=device.type == "cuda", teacher=objective.needs_teacher)
    store, vocab = loader.dataset.store, vocabulary_size(distributed.unwrap(model))  # the loader's own open store
    width = logits_width(distributed.unwrap(model))
    objective = check_teacher(store, objective)
    step = completion_batch if completion_store else dpo_batch

    def metrics(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_batch(batch, store, vocab, width)
        return step(model, batch, cfg, device, objective)[1]

    return _evaluated(model, *distributed.this_ranks_batches(loader, sampler), metrics)


def _evaluated(model: Any, loader: Any, counted: int, metrics: Callable[[dict], dict[str, torch.Tensor]],
               ) -> dict[str, float]:
    """Each metric's mean over the examples of every rank's first `counted` batches (ranks split the batches, then
    add up); the batches past `counted` run only to keep FSDP2's collectives matched across ranks."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(loader):
        n = batch["rows"].numel() if i < counted else 0
        with torch.no_grad(), exact_4bit(distributed.unwrap(model)):
            values = metrics(batch)
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + (float(v) * n if n else 0.0)
        count += n
    totals, count = distributed.sum_over_ranks(totals, count)
    model.train()
    return {f"eval/{k.replace('/', '_') if k != 'loss' else k}": v / count for k, v in totals.items()}


def _evaluate_unpaired(model: Any, path: str, cfg: TrainConfig, device: Any, objective: UnpairedObjective,
                       running: RunningMean | None) -> dict[str, float]:
    """Unpaired evaluation in the store's order and KL chunks; BCO's δ is read, not updated."""
    store = logitstore.open(path, storage_options=cfg.storage_options)
    chunk = store.kl_batch_size or cfg.batch_size
    loader, sampler = make_unpaired_loader(path, chunk if objective.uses_kl else cfg.batch_size, drop_last=False,
                                           storage_options=cfg.storage_options, pin_memory=device.type == "cuda")
    running = running or RunningMean()
    return _evaluated(model, *distributed.this_ranks_batches(loader, sampler),  # whole KL chunks: each rank its own
                      lambda batch: unpaired_batch(model, batch, cfg, device, objective, running, False)[1])


class NonFiniteLossError(LogitstoreError, ArithmeticError):
    """The loss or its gradient stopped being a number; nothing from that step reached the weights."""


def _last_good(out: Path) -> str:
    last = latest_checkpoint(out)
    return (f"nothing from this step was applied; the last good checkpoint is {last}" if last is not None
            else "nothing from this step was applied; no checkpoint had been saved (see --save-every)")


def save_weights(model: Any, cfg: TrainConfig, folder: Path) -> Path:
    """The adapter, or with `lora=False` a whole model folder (weights, config, tokenizer) for from_pretrained.
    In a distributed run every rank calls this (a sharded model is gathered shard by shard); rank 0 writes."""
    if distributed.is_sharded(model):
        sharded_io.save_gathered_model(model, folder)  # collective
    if distributed.is_distributed() and torch.distributed.get_rank() != 0:
        return folder
    if not distributed.is_sharded(model):
        distributed.unwrap(model).save_pretrained(str(folder))
    if not cfg.lora:
        source = check_model_folder(cfg.model, cfg.revision)
        # A sharded run's model was made from config.json alone: its generation settings come from the source too.
        extra = ("generation_config.json",) if distributed.is_sharded(model) else ()
        for name in (*TOKENIZER_FILES, *extra):
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    return folder


def train(cfg: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train; running out of memory becomes one line with the peak reached and what lowers it (dpo/memory.py)."""
    meter = PeakMeter()
    try:
        return _train(cfg, meter, progress=progress, log=log)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise meter.out_of_memory(exc) from None


def _train(cfg: TrainConfig, meter: PeakMeter, *, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm import tqdm

    objective = objective_of(cfg)
    check_setup(cfg)
    store = logitstore.open(cfg.store, storage_options=cfg.storage_options, digest=cfg.expect_digest)
    cfg = dataclasses.replace(cfg, dtype=model_dtype(cfg.model, cfg.dtype, cfg.device, cfg.revision))
    rank, world = distributed.rank_and_world()
    distributed.check_batch_size(cfg.batch_size, world)
    if world > 1 and not cfg.lora and cfg.adapter is not None:
        raise distributed.DistributedSetupError(
            "--no-lora with --adapter merges the adapter into the whole model, which no rank of a sharded run holds; "
            "merge it into a model folder first (peft's merge_and_unload, then save_pretrained) and train that")
    main = rank == 0
    out = Path(cfg.out)
    if not store.complete:
        raise IncompleteStoreError(f"{cfg.store} is incomplete ({len(store.missing_shards)} shards missing); "
                                   "finish the build first")
    check_store_matches(store, cfg)
    if isinstance(objective, Objective):  # distill and TDPO: the store's teacher records, distill's beta for them
        objective = check_teacher(store, objective)
    check_kind(store, objective, cfg, world)
    distributed.check_same_everywhere("store", store.digest)
    distributed.check_same_everywhere("model", json.dumps(model_fingerprint(
        cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, quantize=cfg.quantize, revision=cfg.revision,
        adapter_revision=cfg.adapter_revision, device=cfg.device), sort_keys=True))
    unpaired = isinstance(objective, UnpairedObjective)
    completions = store.kind.name == "completion"  # distill without pairs (check_kind refused every other loss)
    running = RunningMean() if unpaired and objective.loss_type == "bco" else None  # BCO's δ: saved with the run
    if objective.ld_alpha is not None:
        require_per_token(store)
    if cfg.eval_store:
        eval_store = logitstore.open(cfg.eval_store, storage_options=cfg.storage_options)
        check_store_matches(eval_store, cfg)
        if completion_refusal(eval_store, objective) is not None:
            raise LogitstoreError(completion_refusal(eval_store, objective))
        if unpaired and eval_store.kind.name != "unpaired":
            raise LogitstoreError(f"{cfg.eval_store} holds preference pairs; evaluate {objective.loss_type} on an "
                                  "unpaired store")
        if objective.ld_alpha is not None:
            require_per_token(eval_store)
        if isinstance(objective, Objective):
            check_teacher(eval_store, objective)
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise LogitstoreError(f"--resume: no checkpoint in {out}")
    if main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    sharded = world > 1 and not cfg.lora  # FSDP2: no rank ever holds the whole model
    model = setup_policy(dataclasses.replace(cfg, device="meta") if sharded else cfg)
    device = torch.device(resolve_device(cfg.device)) if sharded else next(model.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    vocab, width = vocabulary_size(model), logits_width(model)
    if isinstance(objective, Objective):
        check_teacher_vocabulary(store, objective, width)
    # One process: the model itself. Several: DDP (LoRA) or FSDP2 (every weight) around it, averaging gradients.
    policy = distributed.wrap_policy(model, lora=cfg.lora, dtype=cfg.dtype, device=device,
                                     weights_from=check_model_folder(cfg.model, cfg.revision) if sharded else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)

    # Every rank sees the same global batch order and takes its own slice of each batch. KTO trains the store's KL
    # chunks in order, one per rank (TRL's sequential per-device batches).
    if unpaired:
        loader, sampler = make_unpaired_loader(
            cfg.store, cfg.batch_size, seed=cfg.seed, shuffle=not objective.uses_kl, rank=rank,  # type: ignore[union-attr]
            world_size=world, num_workers=cfg.num_workers, storage_options=cfg.storage_options,
            digest=cfg.expect_digest, pin_memory=device.type == "cuda")
    elif completions:
        loader, sampler = make_completion_loader(
            cfg.store, cfg.batch_size, seed=cfg.seed, group_by_length=cfg.group_by_length, rank=rank,
            world_size=world, num_workers=cfg.num_workers, storage_options=cfg.storage_options,
            digest=cfg.expect_digest, pin_memory=device.type == "cuda", teacher=True)
    else:
        loader, sampler = make_loader(cfg.store, cfg.batch_size, seed=cfg.seed,
                                      group_by_length=cfg.group_by_length, rank=rank, world_size=world,
                                      num_workers=cfg.num_workers, storage_options=cfg.storage_options,
                                      ld_alpha=objective.ld_alpha, digest=cfg.expect_digest,
                                      pin_memory=device.type == "cuda",
                                      teacher=objective.needs_teacher)
    steps_per_epoch = len(sampler) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise LogitstoreError(f"{len(store)} pairs make no full step of batch {cfg.batch_size} x accumulation "
                              f"{cfg.grad_accum}")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    step, epoch, position, best = 0, 0, 0, float("inf")  # position: batches of this epoch consumed
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer,
                                sharded_policy=policy if sharded else None, rank=rank)
        step, epoch, best = state["step"], state["epoch"], state["best_eval_loss"]
        position = state["sampler"]["position"]
        sampler.load_state_dict(state["sampler"])
        if running is not None:
            running.load_state_dict(state["bco_running"])
        if main:
            log(f"Resumed from {checkpoint} at step {step}.")
    else:
        sampler.set_epoch(0)
    meter.start(device)  # on a GPU the peak logged below is the training steps' own, not the model load's
    metrics_file = open(out / "metrics.jsonl", "a" if checkpoint else "w") if main else None
    trackers = open_trackers(cfg.report_to, out, dataclasses.asdict(cfg), main=main, quiet=not progress)
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (progress and main), desc="train")
    policy.train()
    # Without worker processes, a background thread keeps the next batches ready while the model computes.
    fetch = (lambda: iter(Prefetcher(loader))) if cfg.num_workers == 0 else (lambda: iter(loader))
    batches = fetch()
    history: list[dict[str, Any]] = []

    while step < total_steps:
        meter.step = step + 1
        t_step = time.perf_counter()
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        tokens, loader_s = 0, 0.0
        for micro in range(cfg.grad_accum):
            t_fetch = time.perf_counter()
            batch = next(batches, None)
            if batch is None:  # epoch boundary: a fresh, deterministic order
                epoch, position = epoch + 1, 0
                sampler.set_epoch(epoch)
                batches = fetch()
                batch = next(batches)
            position += 1  # counted here, not in the sampler: worker processes fetch ahead
            loader_s += time.perf_counter() - t_fetch
            check_batch(batch, store, vocab, width)
            with distributed.accumulating(policy, last=micro == cfg.grad_accum - 1):  # DDP: one all-reduce a step
                if unpaired:
                    loss, metrics = unpaired_batch(policy, batch, cfg, device, objective, running)  # type: ignore[arg-type]
                elif completions:
                    loss, metrics = completion_batch(policy, batch, cfg, device, objective)  # type: ignore[arg-type]
                else:
                    loss, metrics = dpo_batch(policy, batch, cfg, device, objective)  # type: ignore[arg-type]
                if not torch.isfinite(loss):  # stop before it reaches the weights
                    raise NonFiniteLossError(f"training stopped at step {step + 1}: the loss is "
                                             f"{float(loss.detach())} on {_examples(store, batch['rows'])}; "
                                             f"{_last_good(out)}")
                (loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            del batch, loss, metrics  # the next micro-batch's forward does not need this one's inputs or graph
        # Gradients are already averaged over the ranks: DDP all-reduces them and FSDP2 reduce-scatters them in
        # backward(); FSDP2's norm is a DTensor over the shards.
        grad_norm = distributed.grad_norm_value(
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else 1e12))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"training stopped at step {step + 1}: the gradient norm is {grad_norm}; "
                                     f"{_last_good(out)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1  # optimizer steps done: what the record, evaluation and checkpoint names count
        names = sorted(sums)
        averaged = dict(zip(names, distributed.all_reduce_mean([sums[k] for k in names])))
        elapsed = time.perf_counter() - t_step
        record = {"step": step, "epoch": epoch, **averaged, "learning_rate": lr, "grad_norm": grad_norm,
                  "tokens_per_second": tokens * world / elapsed, "step_seconds": elapsed, "loader_seconds": loader_s}
        record.update(meter.record())
        eval_due = bool(cfg.eval_store and cfg.eval_every and step % cfg.eval_every == 0)
        if eval_due:  # after this step's update; kept as the best adapter if its loss is the lowest yet
            # Every rank evaluates its share of the batches (FSDP2's forward passes are collective); rank 0 records.
            record.update(evaluate(policy, cfg.eval_store, cfg, device, running))  # type: ignore[arg-type]
            if record["eval/loss"] < best:
                best = record["eval/loss"]
                save_weights(policy, cfg, out / "best")
        if main and (eval_due or step == 1 or step % cfg.log_every == 0 or step == total_steps):
            metrics_file.write(json.dumps(record) + "\n")  # type: ignore[union-attr]
            metrics_file.flush()  # type: ignore[union-attr]
            trackers.log(record, step)
            history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", **({"acc": f"{record['rewards/accuracies']:.2f}"}
                                                         if "rewards/accuracies" in record
                                                         else {"kl": f"{record['kl']:.3f}"} if "kl" in record else {}))
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:  # every rank: collective
            save_checkpoint(out / f"checkpoint-{step}", model=model, optimizer=optimizer,
                            sharded_policy=policy if sharded else None, rank=rank,
                            state={"step": step, "epoch": epoch, "best_eval_loss": best, "world_size": world,
                                   "sampler": sampler.state_dict(batches_consumed=position),
                                   "config": dataclasses.asdict(cfg),
                                   **({"bco_running": running.state_dict()} if running is not None else {})})
        distributed.barrier()
    bar.close()

    result: dict[str, Any] = {"steps": step, "out": str(out)}
    if cfg.eval_store:  # every rank: evaluation and a sharded model's save are collective
        final = evaluate(policy, cfg.eval_store, cfg, device, running)
        result["eval"] = final
        if final["eval/loss"] < best:
            save_weights(policy, cfg, out / "best")
    weights = save_weights(policy, cfg, out / ("adapter" if cfg.lora else "model"))
    if main:
        result["weights"] = str(weights)
        metrics_file.close()  # type: ignore[union-attr]
        trackers.close()
        if cfg.plot:
            from .plot import plot_metrics

            result["plot"] = str(plot_metrics(out / "metrics.jsonl", out / "metrics.png"))
        result["history"] = history
    result["peak_memory"], result["peak_memory_gib"] = meter.summary(), meter.peak_bytes() / 2**30  # the run's
    distributed.barrier()
    distributed.shutdown()  # every rank done: the process group this run made ends here, as torch asks
    return result
