"""The policy a run trains and how: the model with a fresh or given LoRA adapter (or every weight), dropout and
activation checkpointing as asked, its optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from logitstore.errors import LogitstoreError

from ..config import TrainConfig
from ..distributed import sharded_io
from ..model.loading import check_model_folder, load_model, peft_wrapping


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
