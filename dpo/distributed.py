"""torch.distributed, only when launched by torchrun or accelerate (WORLD_SIZE > 1); a no-op otherwise."""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        init()
    return int(os.environ.get("RANK", "0")), world


def init() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(values: list[float]) -> list[float]:
    if not is_distributed():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def gather(value):  # noqa: ANN001, ANN201 - a tensor in, a tensor out
    """Every rank's copy of a scalar tensor, stacked (accelerate's gather_for_metrics on a scalar): [world]."""
    import torch

    if not is_distributed():
        return value.reshape(1)
    import torch.distributed as dist

    parts = [torch.zeros_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value.contiguous())
    return torch.stack(parts)


def all_reduce_sum(value):  # noqa: ANN001, ANN201
    """The sum over ranks of a tensor (itself on one process)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    out = value.clone()
    dist.all_reduce(out)
    return out
