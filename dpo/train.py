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

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .logps import exact_4bit, pair_logps, token_logps
from .losses import dpo_loss
from .memory import PeakMeter, is_out_of_memory
from .models import (TOKENIZER_FILES, check_model_extras, check_model_folder, load_model, model_dtype,
                     model_fingerprint, peft_wrapping, precision)
from .objective import Objective


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


def objective_of(cfg: TrainConfig) -> Objective:
    """The DPO objective a config asks for (refusing what TRL 1.16 refuses, and options without effect)."""
    return Objective(loss_types=cfg.loss, loss_weights=cfg.loss_weights, beta=cfg.beta,
                     label_smoothing=cfg.label_smoothing, f_divergence=cfg.f_divergence, f_alpha_coef=cfg.f_alpha_coef,
                     ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting, discopop_tau=cfg.discopop_tau)


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


def check_setup(cfg: TrainConfig) -> None:
    """Refuse combinations that cannot train, before anything is loaded or written."""
    if not cfg.lora and cfg.quantize:
        raise LogitstoreError("--no-lora trains every weight, and 4-bit weights cannot be trained; drop --quantize "
                              "4bit, or train a LoRA adapter on the 4-bit model")
    check_model_extras(quantize=cfg.quantize, adapter=cfg.adapter, optimizer=cfg.optimizer)


def setup_policy(cfg: TrainConfig) -> Any:
    """The policy: the base model (4-bit if asked) with a fresh LoRA, the given adapter, or every weight trainable
    (`lora=False`; a given adapter is then merged into the weights first)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device=cfg.device, adapter=cfg.adapter,
                       trainable_adapter=cfg.lora, revision=cfg.revision, adapter_revision=cfg.adapter_revision,
                       attn_implementation=cfg.attn_implementation)
    # Not peft's prepare_model_for_kbit_training: its float32 copies of norms, embeddings and LM head would make
    # the policy compute other numerics than the reference pass did (step-0 loss off ln 2 in bf16) and cost memory.
    if cfg.quantize:
        model.enable_input_require_grads()  # every 4-bit layer on bitsandbytes' float32 path (see exact_4bit)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not cfg.lora:
        if cfg.adapter is not None:
            model = model.merge_and_unload()
        return without_dropout(model.requires_grad_(True), cfg)
    if cfg.adapter is None:
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


def _examples(store: logitstore.Store, rows: torch.Tensor) -> str:
    names = [repr(store.id_of(int(r))) for r in rows[:3]]
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    return f"example{'s' if len(rows) > 1 else ''} {', '.join(names)}{more}"


def check_batch(batch: dict[str, torch.Tensor], store: logitstore.Store, vocab_size: int) -> None:
    """Refuse a batch whose reference values are not finite or whose token ids the model does not have, naming
    the examples (a NaN reference would turn every weight NaN; an id past the vocabulary fails deep in torch)."""
    rows = batch["rows"]
    refs = torch.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], dim=1)
    bad = ~torch.isfinite(refs).all(dim=1)
    if bad.any():
        first = refs[bad][0]
        raise InputDataError(f"{store.location.url}: {_examples(store, rows[bad])} "
                             f"{'have' if int(bad.sum()) > 1 else 'has'} a non-finite reference log-prob "
                             f"(chosen {float(first[0])}, rejected {float(first[1])}); the store cannot be trained on")
    ids = batch["input_ids"]
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        per_row = outside.any(dim=1)
        bad_rows = per_row[:len(rows)] | per_row[len(rows):]  # chosen rows, then rejected rows
        token = int(ids[outside][0])
        raise InputDataError(f"{store.location.url}: {_examples(store, rows[bad_rows])} "
                             f"{'hold' if int(bad_rows.sum()) > 1 else 'holds'} token id {token}, outside the "
                             f"model's vocabulary of {vocab_size}; the store was built for another tokenizer")


def dpo_batch(model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, device: Any,
              objective: Objective) -> tuple[torch.Tensor, dict]:
    """Mean DPO loss of one batch and its metrics (as tensors; averaged later)."""
    ids = batch["input_ids"].to(device, non_blocking=True)  # from pinned memory (make_loader): asynchronous
    attention = batch["attention_mask"].to(device, non_blocking=True)
    completion = batch["completion_mask"].to(device, non_blocking=True)
    with precision(device, cfg.dtype):
        tokens = token_logps(model, ids, attention, completion, sum_sq=objective.use_weighting)
    pair = pair_logps(tokens, completion, batch["ref_chosen_logps"].to(device, non_blocking=True),
                      batch["ref_rejected_logps"].to(device, non_blocking=True), objective)
    out = dpo_loss(pair, objective)
    metrics = {
        "loss": out.losses.detach().mean(),
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
        "logps/chosen": pair.chosen.detach().mean(),
        "logps/rejected": pair.rejected.detach().mean(),
    }
    return out.losses.mean(), metrics


def evaluate(model: Any, path: str, cfg: TrainConfig, device: Any) -> dict[str, float]:
    objective = objective_of(cfg)
    loader, _ = make_loader(path, cfg.batch_size, shuffle=False, drop_last=False, storage_options=cfg.storage_options,
                            ld_alpha=objective.ld_alpha, pin_memory=device.type == "cuda")
    store, vocab = loader.dataset.store, vocabulary_size(model)  # the loader's own open store
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch in loader:
        n = batch["rows"].numel()
        check_batch(batch, store, vocab)
        with torch.no_grad(), exact_4bit(model):
            _, metrics = dpo_batch(model, batch, cfg, device, objective)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    model.train()
    return {f"eval/{k.replace('/', '_') if k != 'loss' else k}": v / count for k, v in totals.items()}


class NonFiniteLossError(LogitstoreError, ArithmeticError):
    """The loss or its gradient stopped being a number; nothing from that step reached the weights."""


def _last_good(out: Path) -> str:
    last = latest_checkpoint(out)
    return (f"nothing from this step was applied; the last good checkpoint is {last}" if last is not None
            else "nothing from this step was applied; no checkpoint had been saved (see --save-every)")
def save_weights(model: Any, cfg: TrainConfig, folder: Path) -> Path:
    """The adapter, or with `lora=False` a whole model folder (weights, config, tokenizer) for from_pretrained."""
    model.save_pretrained(str(folder))
    if not cfg.lora:
        source = check_model_folder(cfg.model, cfg.revision)
        for name in TOKENIZER_FILES:
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
    main = rank == 0
    out = Path(cfg.out)
    if not store.complete:
        raise IncompleteStoreError(f"{cfg.store} is incomplete ({len(store.missing_shards)} shards missing); "
                                   "finish the build first")
    check_store_matches(store, cfg)
    if objective.ld_alpha is not None:
        require_per_token(store)
    if cfg.eval_store:
        eval_store = logitstore.open(cfg.eval_store, storage_options=cfg.storage_options)
        check_store_matches(eval_store, cfg)
        if objective.ld_alpha is not None:
            require_per_token(eval_store)
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise LogitstoreError(f"--resume: no checkpoint in {out}")
    if main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model = setup_policy(cfg)
    device = next(model.parameters()).device
    vocab = vocabulary_size(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)

    # Every rank sees the same global batch order and takes its own slice of each batch.
    loader, sampler = make_loader(cfg.store, cfg.batch_size, seed=cfg.seed, group_by_length=cfg.group_by_length,
                                  rank=rank, world_size=world, num_workers=cfg.num_workers,
                                  storage_options=cfg.storage_options, ld_alpha=objective.ld_alpha,
                                  digest=cfg.expect_digest, pin_memory=device.type == "cuda")
    steps_per_epoch = len(sampler) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise LogitstoreError(f"{len(store)} pairs make no full step of batch {cfg.batch_size} x accumulation "
                              f"{cfg.grad_accum}")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    step, epoch, position, best = 0, 0, 0, float("inf")  # position: batches of this epoch consumed
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer)
        step, epoch, best = state["step"], state["epoch"], state["best_eval_loss"]
        position = state["sampler"]["position"]
        sampler.load_state_dict(state["sampler"])
        if main:
            log(f"Resumed from {checkpoint} at step {step}.")
    else:
        sampler.set_epoch(0)
    meter.start(device)  # on a GPU the peak logged below is the training steps' own, not the model load's
    metrics_file = open(out / "metrics.jsonl", "a" if checkpoint else "w") if main else None
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (progress and main), desc="train")
    model.train()
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
        for _ in range(cfg.grad_accum):
            t_fetch = time.perf_counter()
            batch = next(batches, None)
            if batch is None:  # epoch boundary: a fresh, deterministic order
                epoch, position = epoch + 1, 0
                sampler.set_epoch(epoch)
                batches = fetch()
                batch = next(batches)
            position += 1  # counted here, not in the sampler: worker processes fetch ahead
            loader_s += time.perf_counter() - t_fetch
            check_batch(batch, store, vocab)
            loss, metrics = dpo_batch(model, batch, cfg, device, objective)
            if not torch.isfinite(loss):  # stop before it reaches the weights
                raise NonFiniteLossError(f"training stopped at step {step + 1}: the loss is {float(loss.detach())} on "
                                         f"{_examples(store, batch['rows'])}; {_last_good(out)}")
            (loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            del batch, loss, metrics  # the next micro-batch's forward does not need this one's inputs or graph
        if world > 1:  # data parallel: average LoRA gradients across ranks (small, so one all-reduce each)
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else 1e12))
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
        eval_due = bool(main and cfg.eval_store and cfg.eval_every and step % cfg.eval_every == 0)
        if eval_due:  # after this step's update; kept as the best adapter if its loss is the lowest yet
            record.update(evaluate(model, cfg.eval_store, cfg, device))  # type: ignore[arg-type]
            if record["eval/loss"] < best:
                best = record["eval/loss"]
                save_weights(model, cfg, out / "best")
        if main and (eval_due or step == 1 or step % cfg.log_every == 0 or step == total_steps):
            metrics_file.write(json.dumps(record) + "\n")  # type: ignore[union-attr]
            metrics_file.flush()  # type: ignore[union-attr]
            history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps and main:
            save_checkpoint(out / f"checkpoint-{step}", model=model, optimizer=optimizer,
                            state={"step": step, "epoch": epoch, "best_eval_loss": best,
                                   "sampler": sampler.state_dict(batches_consumed=position),
                                   "config": dataclasses.asdict(cfg)})
        distributed.barrier()
    bar.close()

    result: dict[str, Any] = {"steps": step, "out": str(out)}
    if main:
        if cfg.eval_store:
            final = evaluate(model, cfg.eval_store, cfg, device)
            result["eval"] = final
            if final["eval/loss"] < best:
                save_weights(model, cfg, out / "best")
        result["weights"] = str(save_weights(model, cfg, out / ("adapter" if cfg.lora else "model")))
        metrics_file.close()  # type: ignore[union-attr]
        if cfg.plot:
            from .plot import plot_metrics

            result["plot"] = str(plot_metrics(out / "metrics.jsonl", out / "metrics.png"))
        result["history"] = history
    result["peak_memory"], result["peak_memory_gib"] = meter.summary(), meter.peak_bytes() / 2**30  # the run's
    distributed.barrier()
    return result
