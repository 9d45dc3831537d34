"""What a training run refuses, in one line each: before anything loads (options that cannot train together), once
the store is open (another model's store), and at every batch (reference values that are not numbers, token ids
the model does not have, teacher records that do not fit); and the error that stops a step whose loss or
gradient is no number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import logitstore
from logitstore.errors import FingerprintMismatchError, InputDataError, LogitstoreError

from ..config import TrainConfig
from ..kinds.teacher import check_teacher_batch, per_example
from ..model.loading import check_model_extras, model_fingerprint
from .checkpoint import latest_checkpoint
from .memory import options_in_use


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


def check_memory_options(cfg: TrainConfig, world: int, device: str) -> None:
    """Refuse the activation-memory options where they cannot run: in a distributed run (each was measured and
    tested in one process), --offload-activations off a GPU, a chunk of no tokens."""
    asked = [flag for flag in options_in_use(cfg) if flag != "--gradient-checkpointing"]
    if world > 1 and asked:
        raise LogitstoreError(f"{asked[0]} runs in one process; a distributed run (DDP or FSDP2) trains without it")
    if cfg.mlp_chunk is not None and cfg.mlp_chunk < 1:
        raise LogitstoreError(f"--mlp-chunk must be a positive number of tokens, got {cfg.mlp_chunk}")
    if cfg.offload_activations and not device.startswith("cuda"):
        raise LogitstoreError("--offload-activations moves what the backward pass keeps from the GPU to CPU memory; "
                              "this run trains on the CPU, where it means nothing: drop it")


def example_names(store: logitstore.Store, rows: torch.Tensor) -> str:
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
        raise InputDataError(f"{store.location.url}: {example_names(store, rows[bad])} "
                             f"{'have' if int(bad.sum()) > 1 else 'has'} a non-finite reference log-prob "
                             f"({values}); the store cannot be trained on")
    ids = batch["input_ids"]
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        per_row = outside.any(dim=1)
        bad_rows = per_example(per_row, len(rows))  # chosen rows, then rejected rows (completion: one row each)
        token = int(ids[outside][0])
        raise InputDataError(f"{store.location.url}: {example_names(store, rows[bad_rows])} "
                             f"{'hold' if int(bad_rows.sum()) > 1 else 'holds'} token id {token}, outside the "
                             f"model's vocabulary of {vocab_size}; the store was built for another tokenizer")
    misfit = check_teacher_batch(batch, logits or vocab_size)
    if misfit is not None:
        bad_rows, why = misfit
        raise InputDataError(f"{store.location.url}: {example_names(store, rows[bad_rows])} "
                             f"{'hold' if int(bad_rows.sum()) > 1 else 'holds'} {why}")


class NonFiniteLossError(LogitstoreError, ArithmeticError):
    """The loss or its gradient stopped being a number; nothing from that step reached the weights."""


def last_good(out: Path) -> str:
    last = latest_checkpoint(out)
    return (f"nothing from this step was applied; the last good checkpoint is {last}" if last is not None
            else "nothing from this step was applied; no checkpoint had been saved (see --save-every)")
