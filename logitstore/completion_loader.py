"""Feeding distillation from a completion store: one row per example, prompt + completion right-padded, with the
store's reference values and (with `teacher`) its teacher records under the pair loader's names.

A batch holds ``input_ids``, ``attention_mask``, ``completion_mask`` [B, L] (TRL's layout, one row per example),
``ref_logps`` and ``completion_tokens`` [B], ``rows`` [B], and with teacher records ``teacher_ids`` [B, T, K] with
``teacher_logps`` [B, T, K] and ``teacher_tail_logp`` [B, T] (top-k) or ``teacher_counts`` [B, T, K] (sampled), T
the batch's longest completion (:func:`logitstore.loader.pad_teacher`, whose padding and order rules hold here).
The dataset, sampler and their resumable order are the pair loader's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputDataError
from .loader import PairBatchSampler, PairDataset, pad_teacher, torch_loader

if TYPE_CHECKING:
    import torch


def pad_completions(prompts: Sequence[Any], completions: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `completion_mask` [B, L] of prompt + completion rows, right-padded."""
    import torch

    width = max((len(p) + len(c) for p, c in zip(prompts, completions)), default=0)
    n = len(prompts)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    completion = np.zeros((n, width), dtype=np.int64)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        lp, end = len(p), len(p) + len(c)
        input_ids[i, :lp], input_ids[i, lp:end] = p, c
        attention[i, :end] = 1
        completion[i, lp:end] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "completion_mask": torch.from_numpy(completion)}


def collate_completion(batch: dict[str, Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of completion-store rows as tensors (see the module's docstring)."""
    import torch

    out = pad_completions(batch["prompt_ids"], batch["completion_ids"], pad_token_id)
    out.update({
        "ref_logps": torch.from_numpy(np.asarray(batch["completion_logps"], dtype=np.float32)),
        "completion_tokens": torch.from_numpy(np.asarray(batch["completion_tokens"], dtype=np.int64)),
        "rows": torch.from_numpy(np.asarray(batch["rows"], dtype=np.int64)),
    })
    if "teacher" in batch:
        out.update(pad_teacher([batch["teacher"]["completion"]], batch["prompt_ids"], [batch["completion_ids"]]))
    return out


def make_completion_loader(path: str, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                           drop_last: bool = True, group_by_length: bool = False, rank: int = 0, world_size: int = 1,
                           num_workers: int = 0, prefetch: int = 2, storage_options: dict[str, Any] | None = None,
                           digest: str | None = None, pin_memory: bool | None = None,
                           teacher: bool = False) -> tuple[Any, PairBatchSampler]:
    """A DataLoader over the completion store at `path` and its sampler; `teacher` adds the store's teacher records
    (a store without them is refused in one line), as :func:`logitstore.loader.make_loader` does for pairs."""
    dataset = PairDataset(path, storage_options=storage_options, digest=digest, teacher=teacher)
    if dataset.store.kind.name != "completion":
        raise InputDataError(f"{dataset.store.location.url} is a {dataset.store.kind.name} store; this loader reads "
                             "completion stores (prompt/completion data)")
    sampler = PairBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                               lengths=dataset.lengths() if group_by_length else None,
                               group_size=50 if group_by_length else 0, rank=rank, world_size=world_size)
    return torch_loader(dataset, sampler, functools.partial(collate_completion, pad_token_id=dataset.pad_token_id),
                        seed=seed, num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory), sampler
