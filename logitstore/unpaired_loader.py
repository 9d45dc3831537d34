"""Feeding KTO-style training from an unpaired store: dataset, collate and the batch order TRL 1.16 trains in.

KTO's KL term compares each example's KL completion, which the store paired within chunks of the KL batch size
(`Store.kl_batch_size`) in row order. TRL's KTOTrainer trains those chunks as its per-device batches, in order
(its sequential sampler), so every batch holds exactly the completions its KL completions were drawn from. The
sampler here does the same: without `shuffle`, each global batch is `world_size` consecutive chunks and rank r takes
the r-th; losses without a KL term may shuffle.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .loader import PairBatchSampler, PairDataset, pad_pairs, torch_loader

if TYPE_CHECKING:
    import torch

def collate_unpaired(batch: dict[str, Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch as tensors: prompt+completion rows first, then prompt+KL completion rows (:func:`pad_pairs`'s
    layout), the reference sums of both, the labels and the rows."""
    import torch

    out = pad_pairs(batch["prompt_ids"], batch["completion_ids"], batch["kl_completion_ids"], pad_token_id)
    out.update({
        "ref_logps": torch.from_numpy(np.asarray(batch["completion_logps"], dtype=np.float32)),
        "ref_kl_logps": torch.from_numpy(np.asarray(batch["kl_logps"], dtype=np.float32)),
        "label": torch.from_numpy(np.asarray(batch["label"], dtype=np.int64) == 1),
        "rows": torch.from_numpy(np.asarray(batch["rows"], dtype=np.int64)),
    })
    return out


class ChunkBatchSampler(PairBatchSampler):
    """Global batches of `batch_size` rows of which rank r takes the r-th contiguous slice (a whole KL chunk when
    `batch_size` is the chunk times the world size), so a per-device batch is a chunk as TRL trains it."""

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        per_rank = self.batch_size // self.world_size
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()


def make_unpaired_loader(path: str, batch_size: int, *, seed: int = 0, shuffle: bool = False,
                         drop_last: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                         prefetch: int = 2, storage_options: dict[str, Any] | None = None,
                         digest: str | None = None, pin_memory: bool | None = None) -> tuple[Any, ChunkBatchSampler]:
    """A DataLoader over the unpaired store at `path` and its sampler; see the module's docstring for the order."""
    dataset = PairDataset(path, storage_options=storage_options, digest=digest)
    sampler = ChunkBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                                rank=rank, world_size=world_size)
    return torch_loader(dataset, sampler, functools.partial(collate_unpaired, pad_token_id=dataset.pad_token_id),
                        seed=seed, num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory), sampler
