"""Evaluation on --eval-store: each metric's mean over its examples, in the store's order, with the run's task (the
kind's loader and step). In a distributed run each rank evaluates whole batches in turn and the ranks add up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..distributed import group as distributed
from ..model.scoring import exact_4bit
from .checks import check_batch
from .policy import logits_width, vocabulary_size


def evaluate(policy: Any, path: str, task: Any, device: Any) -> dict[str, float]:
    """The run's metrics on the store at `path`, as ``eval/<name>`` (``/`` in a name becomes ``_``); BCO's δ is
    read, not updated."""
    loader, sampler = task.loader(path, rank=0, world=1, device=device, evaluation=True)
    store = loader.dataset.store  # the loader's own open store
    model = distributed.unwrap(policy)
    vocab, width = vocabulary_size(model), logits_width(model)

    def metrics(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_batch(batch, store, vocab, width)
        return task.step(policy, batch, device, training=False)[1]

    return evaluated(policy, *distributed.this_ranks_batches(loader, sampler), metrics)


def evaluated(model: Any, loader: Any, counted: int, metrics: Callable[[dict], dict[str, torch.Tensor]],
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
