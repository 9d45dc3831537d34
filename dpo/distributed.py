"""Training on several processes with torch's own engines (launched by torchrun or accelerate, WORLD_SIZE > 1):
the process group, what the ranks exchange, the checks of a launch, and the policy as the trainer sees it.

- Full fine-tuning (`--no-lora`): FSDP2, so each rank keeps 1/world of the weights, gradients and optimizer state
  (the units and the CPU gradient reduction: dpo/fsdp2.py; the weights read and saved shard by shard:
  dpo/sharded_io.py).
- LoRA: DistributedDataParallel. The trainable adapter is small, DDP is the simplest engine that averages its
  gradients, and the frozen base model is whole on every rank: it must fit one device (not wired for adapters:
  QLoRA's 4-bit bitsandbytes weights cannot be sharded by FSDP2; docs/scaling.md, "Adapters past one device").
- Evaluation: each rank evaluates whole batches in turn and the ranks add up their sums.

The trainer scores batches through :class:`Scorer`, one module whose forward is `token_logps`, so both engines see
every forward pass (they hook the module that is called; `token_logps` calls the backbone and the LM head
separately). Everything here is a no-op in one process.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from logitstore.errors import LogitstoreError


class DistributedSetupError(LogitstoreError):
    """The ranks of one run disagree, or the run cannot be split over them."""


def rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        init()
    return int(os.environ.get("RANK", "0")), world


_CREATED = False  # whether init() made the process group (then shutdown() ends it)


def init() -> None:
    global _CREATED
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank: LOCAL_RANK picks it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        _CREATED = True


def shutdown() -> None:
    """End the process group init() made, as torch asks before a process exits (every rank, once all are done);
    a group made by someone else (accelerate, a user's script) is theirs to end."""
    global _CREATED
    if _CREATED and is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
    _CREATED = False


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

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu().tolist()


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


def eval_share(count: int, rank: int, world: int) -> tuple[list[int], int]:
    """Which of `count` evaluation batches this rank computes (round robin: rank, rank + world, ...), and how many
    forward passes every rank makes: the most any rank has, so that FSDP2's collective forwards pair up."""
    return list(range(rank, count, world)), -(-count // world)


def this_ranks_batches(loader: Any, sampler: Any) -> tuple[Any, int]:
    """The evaluation loader of this rank: its share of the batches of `loader` (whole batches, so each is the one a
    single process evaluates, and batch-level losses and KTO's KL chunks come out the same), padded with repeats
    of the first batch to the common number of forward passes; and how many of its batches count. In one process,
    `loader` and all of its batches."""
    import torch

    if not is_distributed():
        return loader, len(sampler)
    import torch.distributed as dist

    batches = list(sampler)
    mine, rounds = eval_share(len(batches), dist.get_rank(), dist.get_world_size())
    share = [batches[i] for i in mine] + [batches[0]] * (rounds - len(mine))
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=share, collate_fn=loader.collate_fn,
                                       pin_memory=loader.pin_memory), len(mine)


def sum_over_ranks(totals: dict[str, float], count: int) -> tuple[dict[str, float], int]:
    """Per-metric sums and the example count added up over the ranks (float64; every rank has the same keys)."""
    if not is_distributed():
        return totals, count
    import torch
    import torch.distributed as dist

    names = sorted(totals)
    t = torch.tensor([totals[k] for k in names] + [float(count)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    values = t.cpu().tolist()
    return dict(zip(names, values[:-1])), int(values[-1])


def _comm_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_batch_size(batch_size: int, world: int) -> None:
    """`--batch-size` is the global batch: every rank takes an equal part of it."""
    if world > 1 and batch_size % world:
        raise DistributedSetupError(f"--batch-size {batch_size} is the global batch and must be a multiple of the "
                                    f"{world} processes (each takes an equal part); pass a multiple of {world}")


def check_same_everywhere(what: str, value: str) -> None:
    """Refuse, on every rank, a run whose ranks see different `value`s (a store, a model): compared as SHA-256
    digests gathered from all ranks (plain tensors, no pickled objects)."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as dist

    mine = torch.tensor(list(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8, device=_comm_device())
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    differ = [r for r, d in enumerate(everyone) if not torch.equal(d, everyone[0])]
    if differ:
        raise DistributedSetupError(f"the processes of this run do not see the same {what}: rank {differ[0]}'s "
                                    f"differs from rank 0's; every rank must train from the same files")


def _scorer_class() -> type:
    import torch

    from .logps import token_logps

    class _Scorer(torch.nn.Module):
        """The policy as one module whose forward is `token_logps` (what DDP and FSDP2 hook)."""

        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, completion_mask: Any, sum_sq: bool = False,
                    teacher: Any = None) -> Any:
            t = token_logps(self.model, input_ids, attention_mask, completion_mask, sum_sq=sum_sq, teacher=teacher)
            return t.per_token, t.scored, t.log_sum_sq, t.divergence

    return _Scorer


def score(policy: Any, input_ids: Any, attention_mask: Any, completion_mask: Any, *, sum_sq: bool = False,
          teacher: Any = None) -> Any:
    """`token_logps` through the wrapped policy where there is one, else on the model itself."""
    from .logps import TokenLogps, token_logps

    if is_wrapped(policy):
        return TokenLogps(*policy(input_ids, attention_mask, completion_mask, sum_sq, teacher))
    return token_logps(policy, input_ids, attention_mask, completion_mask, sum_sq=sum_sq, teacher=teacher)


def is_wrapped(policy: Any) -> bool:
    return getattr(policy, "_logitstore_engine", None) is not None


def is_sharded(policy: Any) -> bool:
    return getattr(policy, "_logitstore_engine", None) == "fsdp2"


def unwrap(policy: Any) -> Any:
    """The Hugging Face (or peft) model inside a wrapped policy."""
    if not is_wrapped(policy):
        return policy
    scorer = policy.module if hasattr(policy, "module") else policy
    return scorer.model


def wrap_policy(model: Any, *, lora: bool, dtype: str, device: Any, weights_from: Any = None) -> Any:
    """In a distributed run, the policy wrapped for its engine (FSDP2 for every weight, DDP for an adapter); in one
    process, the model itself. For DDP `model` is on `device`. For FSDP2 it is on the CPU, or with `weights_from`
    (a model folder) on the meta device from :func:`sharded_io.empty_model`, and each rank then reads only its
    shards."""
    import torch

    if not is_distributed():
        return model
    scorer = _scorer_class()(model)
    if lora:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        # Buffers (rotary tables) are computed identically on every rank: no broadcast before each forward, which
        # would make every forward a collective (evaluation's included). torch 2.13 renamed the switch (the old name
        # warns on every rank).
        import inspect

        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        wrapped = DistributedDataParallel(scorer, device_ids=ids, **no_sync)
        wrapped._logitstore_engine = "ddp"
        return wrapped
    from . import fsdp2, sharded_io

    fsdp2.shard(scorer, model, dtype=dtype, device=device)
    if weights_from is not None:
        buffers = {name: b.clone() for name, b in scorer.named_buffers()}  # computed on the CPU, not meta
        scorer.to_empty(device=device)
        with torch.no_grad():
            for name, b in scorer.named_buffers():
                b.copy_(buffers[name])
        scorer._logitstore_engine = "fsdp2"
        sharded_io.load_shards(scorer, weights_from)
    scorer.to(device)  # only this rank's shards reach the device
    scorer._logitstore_engine = "fsdp2"
    return scorer


def accumulating(policy: Any, last: bool) -> Any:
    """Context for one micro-batch's forward and backward: under DDP, no all-reduce but on the step's last
    micro-batch (gradients accumulate locally, then one all-reduce averages their sums). FSDP2 reduce-scatters
    every micro-batch: skipping it would keep a whole unsharded gradient on every rank."""
    import contextlib

    if not last and getattr(policy, "_logitstore_engine", None) == "ddp":
        return policy.no_sync()
    return contextlib.nullcontext()


def grad_norm_value(norm: Any) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor over FSDP2's sharded gradients)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


