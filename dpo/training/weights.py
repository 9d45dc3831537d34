"""The trained weights on disk: the adapter, or a whole model folder (weights, config, tokenizer) for
from_pretrained; a sharded model is gathered shard by shard and rank 0 writes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..distributed import group as distributed
from ..distributed import sharded_io
from ..model.loading import TOKENIZER_FILES, check_model_folder


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
