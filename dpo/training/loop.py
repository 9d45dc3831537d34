"""Training from a logitstore store: only the policy is in memory; the reference lives in the store.

The loop reads top to bottom: refuse what cannot train (:func:`prepare`), load the policy and its optimizer, then
for each optimizer step: fetch micro-batches from the store, let the store kind's task turn each into a loss
(:mod:`dpo.kinds`), step, log, evaluate, checkpoint. Nothing here asks which kind of store it trains on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

import logitstore
from logitstore.errors import IncompleteStoreError, LogitstoreError
from logitstore.loader import Prefetcher

from .. import kinds
from ..config import TrainConfig
from ..distributed import group as distributed
from ..distributed.policy import accumulating, grad_norm_value, wrap_policy
from ..kinds.teacher import check_teacher_vocabulary
from ..model.mlp_chunks import chunk_mlps
from ..model.loading import check_model_folder, model_dtype, model_fingerprint, resolve_device
from ..objectives.objective import objective_of
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .checks import (NonFiniteLossError, check_batch, check_memory_options, check_setup, check_store_matches,
                     example_names, last_good)
from .evaluate import evaluate
from .files import cut_metrics
from .memory import PeakMeter, is_out_of_memory, options_in_use
from .policy import logits_width, lr_at, make_optimizer, setup_policy, vocabulary_size
from .trackers import open_trackers
from .weights import save_weights


@dataclasses.dataclass
class Run:
    """A run once checked: its store and tasks, where it writes, which rank this is."""

    cfg: TrainConfig
    store: Any
    task: kinds.Task
    eval_task: kinds.Task | None
    rank: int
    world: int
    out: Path
    checkpoint: Path | None  # the one --resume continues from

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:  # FSDP2: no rank ever holds the whole model
        return self.world > 1 and not self.cfg.lora


def prepare(cfg: TrainConfig) -> Run:
    """Everything refused before a weight loads, in one line each: options, the store (complete, built from this
    model, of a kind the loss trains on), the eval store, the launch, a checkpoint to resume."""
    objective = objective_of(cfg)
    check_setup(cfg)
    store = logitstore.open(cfg.store, storage_options=cfg.storage_options, digest=cfg.expect_digest)
    cfg = dataclasses.replace(cfg, dtype=model_dtype(cfg.model, cfg.dtype, cfg.device, cfg.revision))
    rank, world = distributed.rank_and_world()
    distributed.check_batch_size(cfg.batch_size, world)
    check_memory_options(cfg, world, resolve_device(cfg.device))
    if world > 1 and not cfg.lora and cfg.adapter is not None:
        raise distributed.DistributedSetupError(
            "--no-lora with --adapter merges the adapter into the whole model, which no rank of a sharded run holds; "
            "merge it into a model folder first (peft's merge_and_unload, then save_pretrained) and train that")
    if not store.complete:
        raise IncompleteStoreError(f"{cfg.store} is incomplete ({len(store.missing_shards)} shards missing); "
                                   "finish the build first")
    check_store_matches(store, cfg)
    kind = kinds.of_store(store)
    task = kind.task(cfg, kind.accept(store, objective, cfg, world))
    distributed.check_same_everywhere("store", store.digest)
    distributed.check_same_everywhere("model", json.dumps(model_fingerprint(
        cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, quantize=cfg.quantize, revision=cfg.revision,
        adapter_revision=cfg.adapter_revision, device=cfg.device), sort_keys=True))
    eval_task = None
    if cfg.eval_store:
        eval_store = logitstore.open(cfg.eval_store, storage_options=cfg.storage_options)
        check_store_matches(eval_store, cfg)
        eval_kind = kinds.of_store(eval_store)
        eval_task = eval_kind.task(cfg, eval_kind.accept(eval_store, objective, cfg, world, evaluation=True))
    out = Path(cfg.out)
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise LogitstoreError(f"--resume: no checkpoint in {out}")
    return Run(cfg, store, task, eval_task, rank, world, out, checkpoint)


def train(cfg: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train; running out of memory becomes one line with the peak reached and what lowers it (training/memory.py)."""
    meter = PeakMeter(in_use=frozenset(options_in_use(cfg)))
    try:
        return _train(prepare(cfg), meter, progress=progress, log=log)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise meter.out_of_memory(exc) from None


@dataclasses.dataclass
class Trainee:
    """The policy being trained, as every step needs it."""

    model: Any  # the Hugging Face (or peft) model
    policy: Any  # the model, or the DDP / FSDP2 module around it
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    device: torch.device
    vocab: int  # token ids it can embed and score
    width: int  # its logits' width, which teacher records are checked against


def load_trainee(run: Run) -> Trainee:
    """The policy on its device (FSDP2: each rank's shards only), wrapped for the run's engine, and its optimizer."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    model = setup_policy(dataclasses.replace(cfg, device="meta") if run.sharded else cfg)
    if cfg.mlp_chunk:
        chunk_mlps(model, cfg.mlp_chunk)
    device = torch.device(resolve_device(cfg.device)) if run.sharded else next(model.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    width = logits_width(model)
    check_teacher_vocabulary(run.store, run.task.objective, width)
    # One process: the model itself. Several: DDP (LoRA) or FSDP2 (every weight) around it, averaging gradients.
    policy = wrap_policy(model, lora=cfg.lora, dtype=cfg.dtype, device=device,
                         weights_from=check_model_folder(cfg.model, cfg.revision) if run.sharded else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    return Trainee(model, policy, params, make_optimizer(cfg, params), device, vocabulary_size(model), width)


class Cursor:
    """Where a run is in its data: the epoch, the batches of it consumed, and the batches coming. Every rank sees
    the same global order (the sampler's, a pure function of the seed and the epoch) and takes its own share."""

    def __init__(self, loader: Any, sampler: Any, num_workers: int):
        self.loader, self.sampler, self.num_workers = loader, sampler, num_workers
        self.epoch, self.position = 0, 0
        self.batches: Any = None

    def start(self) -> None:
        self.sampler.set_epoch(self.epoch)
        # Without worker processes, a background thread keeps the next batches ready while the model computes.
        self.batches = iter(Prefetcher(self.loader)) if self.num_workers == 0 else iter(self.loader)

    def resume(self, epoch: int, sampler_state: dict[str, int]) -> None:
        self.epoch, self.position = epoch, sampler_state["position"]
        self.sampler.load_state_dict(sampler_state)  # the rest of that epoch's order
        self.batches = iter(Prefetcher(self.loader)) if self.num_workers == 0 else iter(self.loader)

    def next(self) -> dict[str, Any]:
        batch = next(self.batches, None)
        if batch is None:  # epoch boundary: a fresh, deterministic order
            self.epoch, self.position = self.epoch + 1, 0
            self.start()
            batch = next(self.batches)
        self.position += 1  # counted here, not in the sampler: worker processes fetch ahead
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict(batches_consumed=self.position)


class RunLog:
    """Where logged steps go, on the main rank: metrics.jsonl (cut back to the checkpoint a run resumes from, and on
    disk before a checkpoint names its step), the experiment trackers, and the history the run returns."""

    def __init__(self, run: Run, resumed_at: int | None, *, quiet: bool):
        self.history: list[dict[str, Any]] = []
        self.file = None
        if run.main:
            path = run.out / "metrics.jsonl"
            if resumed_at is not None:
                cut_metrics(path, resumed_at)  # the steps after the checkpoint are logged again
            self.file = open(path, "a" if resumed_at is not None else "w")
        self.trackers = open_trackers(run.cfg.report_to, run.out, dataclasses.asdict(run.cfg), main=run.main,
                                      quiet=quiet)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.trackers.log(record, record["step"])
            self.history.append(record)

    def sync(self) -> None:
        if self.file is not None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.trackers.close()


def resume(run: Run, t: Trainee, cursor: Cursor, log: Callable[[str], None]) -> tuple[int, float]:
    """(steps done, best eval loss): a fresh start, or where --resume's checkpoint left the weights, the optimizer,
    the data order and the task's state."""
    if run.checkpoint is None:
        cursor.start()
        return 0, float("inf")
    state = load_checkpoint(run.checkpoint, model=t.model, optimizer=t.optimizer,
                            sharded_policy=t.policy if run.sharded else None, rank=run.rank)
    cursor.resume(state["epoch"], state["sampler"])
    run.task.load_state_dict(state)
    if run.main:
        log(f"Resumed from {run.checkpoint} at step {state['step']}.")
    return state["step"], state["best_eval_loss"]


def _train(run: Run, meter: PeakMeter, *, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm import tqdm

    cfg, task = run.cfg, run.task
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
    t = load_trainee(run)
    loader, sampler = task.loader(cfg.store, rank=run.rank, world=run.world, device=t.device, digest=cfg.expect_digest)
    steps_per_epoch = len(sampler) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise LogitstoreError(f"{len(run.store)} pairs make no full step of batch {cfg.batch_size} x accumulation "
                              f"{cfg.grad_accum}")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    cursor = Cursor(loader, sampler, cfg.num_workers)
    step, best = resume(run, t, cursor, log)
    meter.start(t.device)  # on a GPU the peak logged below is the training steps' own, not the model load's
    logged = RunLog(run, step if run.checkpoint else None, quiet=not progress)
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (progress and run.main), desc="train")
    t.policy.train()

    while step < total_steps:
        meter.step = step + 1
        t_step = time.perf_counter()
        lr = lr_at(step, cfg, total_steps)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        sums, tokens, loader_s = accumulate(run, t, cursor, step)
        # Gradients are already averaged over the ranks: DDP all-reduces them and FSDP2 reduce-scatters them in
        # backward(); FSDP2's norm is a DTensor over the shards.
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(t.params, cfg.grad_clip if cfg.grad_clip > 0
                                                                   else 1e12))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"training stopped at step {step + 1}: the gradient norm is {grad_norm}; "
                                     f"{last_good(run.out)}")
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

        step += 1  # optimizer steps done: what the record, evaluation and checkpoint names count
        names = sorted(sums)
        elapsed = time.perf_counter() - t_step
        record = {"step": step, "epoch": cursor.epoch,
                  **dict(zip(names, distributed.all_reduce_mean([sums[k] for k in names]))),
                  "learning_rate": lr, "grad_norm": grad_norm, "tokens_per_second": tokens * run.world / elapsed,
                  "step_seconds": elapsed, "loader_seconds": loader_s, **meter.record()}
        eval_due = bool(run.eval_task and cfg.eval_every and step % cfg.eval_every == 0)
        if eval_due:  # after this step's update; kept as the best weights if its loss is the lowest yet
            record.update(evaluate_now(run, t.policy, t.device))
            if record["eval/loss"] < best:
                best = record["eval/loss"]
                save_weights(t.policy, cfg, run.out / "best")
        if eval_due or step == 1 or step % cfg.log_every == 0 or step == total_steps:
            logged.write(record)
        bar.update(1)
        bar.set_postfix(**progress_postfix(record))
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:  # every rank: collective
            logged.sync()  # the steps a checkpoint names are on disk before it is
            save_checkpoint(run.out / f"checkpoint-{step}", model=t.model, optimizer=t.optimizer,
                            sharded_policy=t.policy if run.sharded else None, rank=run.rank,
                            state={"step": step, "epoch": cursor.epoch, "best_eval_loss": best,
                                   "world_size": run.world, "sampler": cursor.state_dict(),
                                   "config": dataclasses.asdict(cfg), **task.state_dict()})
        distributed.barrier()
    bar.close()
    logged.close()
    return finish(run, t, best, step, logged.history, meter)


def accumulate(run: Run, t: Trainee, cursor: Cursor, step: int) -> tuple[dict[str, float], int, float]:
    """One optimizer step's micro-batches, forward and backward: the gradients accumulate in the parameters.
    Returns each metric's mean over the micro-batches, the tokens seen and the seconds spent waiting for data."""
    cfg = run.cfg
    sums: dict[str, float] = {}
    tokens, loader_s = 0, 0.0
    for micro in range(cfg.grad_accum):
        t_fetch = time.perf_counter()
        batch = cursor.next()
        loader_s += time.perf_counter() - t_fetch
        check_batch(batch, run.store, t.vocab, t.width)
        with accumulating(t.policy, last=micro == cfg.grad_accum - 1):  # DDP: one all-reduce a step
            with offloaded(cfg.offload_activations):
                loss, metrics = run.task.step(t.policy, batch, t.device)
            if not torch.isfinite(loss):  # stop before it reaches the weights
                raise NonFiniteLossError(f"training stopped at step {step + 1}: the loss is "
                                         f"{float(loss.detach())} on {example_names(run.store, batch['rows'])}; "
                                         f"{last_good(run.out)}")
            (loss / cfg.grad_accum).backward()
        tokens += int(batch["attention_mask"].sum())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        del batch, loss, metrics  # the next micro-batch's forward does not need this one's inputs or graph
    return sums, tokens, loader_s


def offloaded(on: bool) -> Any:
    """--offload-activations: what the forward pass saves for backward (the layer-boundary checkpoints under
    --gradient-checkpointing) waits in pinned CPU memory, copied back when the backward pass needs it; as TRL's
    activation_offloading, without its side streams."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if on else contextlib.nullcontext()


def evaluate_now(run: Run, policy: Any, device: Any) -> dict[str, float]:
    """Every rank evaluates its share of the eval store (FSDP2's forward passes are collective), with the training
    task's state as it is now (BCO's running mean); rank 0 records."""
    run.eval_task.load_state_dict(run.task.state_dict())  # type: ignore[union-attr]
    return evaluate(policy, run.cfg.eval_store, run.eval_task, device)  # type: ignore[arg-type]


def progress_postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's numbers: the loss, and the pairs' reward accuracy or the unpaired KL estimate."""
    shown = {"loss": f"{record['loss']:.4f}"}
    if "rewards/accuracies" in record:
        shown["acc"] = f"{record['rewards/accuracies']:.2f}"
    elif "kl" in record:
        shown["kl"] = f"{record['kl']:.3f}"
    return shown


def finish(run: Run, t: Trainee, best: float, steps: int, history: list[dict[str, Any]],
           meter: PeakMeter) -> dict[str, Any]:
    """The final evaluation (kept as the best weights if it beats them), the weights, the plot, the summary."""
    cfg = run.cfg
    result: dict[str, Any] = {"steps": steps, "out": str(run.out)}
    if run.eval_task is not None:  # every rank: evaluation and a sharded model's save are collective
        final = evaluate_now(run, t.policy, t.device)
        result["eval"] = final
        if final["eval/loss"] < best:
            save_weights(t.policy, cfg, run.out / "best")
    weights = save_weights(t.policy, cfg, run.out / ("adapter" if cfg.lora else "model"))
    if run.main:
        result["weights"] = str(weights)
        if cfg.plot:
            from .plot import plot_metrics

            result["plot"] = str(plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png", run.task.panels))
        result["history"] = history
    result["peak_memory"], result["peak_memory_gib"] = meter.summary(), meter.peak_bytes() / 2**30  # the run's
    distributed.barrier()
    distributed.shutdown()  # every rank done: the process group this run made ends here, as torch asks
    return result
