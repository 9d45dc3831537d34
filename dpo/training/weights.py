"""The trained weights on disk: the adapter, or a whole model folder (weights, config, tokenizer) for
from_pretrained, published whole; a sharded model is gathered shard by shard and rank 0 writes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..distributed import group as distributed
from ..distributed import sharded_io
from ..model.loading import TOKENIZER_FILES, check_model_folder
from .files import publish_folder, staging_folder


def save_weights(model: Any, cfg: TrainConfig, folder: Path) -> Path:
    """The adapter, or with `lora=False` a whole model folder (weights, config, tokenizer) for from_pretrained,
    written whole or not at all (:func:`dpo.training.files.publish_folder`). In a distributed run every rank calls
    this (a sharded model is gathered shard by shard); rank 0 writes."""
    main = not distributed.is_distributed() or torch.distributed.get_rank() == 0
    staging = staging_folder(folder) if main else folder
    if distributed.is_sharded(model):
        sharded_io.save_gathered_model(model, staging)  # collective
    if not main:
        return folder
    if not distributed.is_sharded(model):
        distributed.unwrap(model).save_pretrained(str(staging))
    if not cfg.lora:
        source = check_model_folder(cfg.model, cfg.revision)
        # A sharded run's model was made from config.json alone: its generation settings come from the source too.
        extra = ("generation_config.json",) if distributed.is_sharded(model) else ()
        for name in (*TOKENIZER_FILES, *extra):
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
    return publish_folder(staging, folder)
