"""Training on several processes with torch's own engines (launched by torchrun or accelerate, WORLD_SIZE > 1).

- Full fine-tuning (`--no-lora`): FSDP2 (`torch.distributed.fsdp.fully_shard`) per decoder layer and at the root,
  so each rank keeps 1/world of the weights, gradients and optimizer state; on a GPU in the model's dtype, with
  gradients reduced in float32.
- LoRA: DistributedDataParallel. The trainable adapter is small and the frozen base model must be whole on every
  rank anyway for DDP, which is the simplest engine that averages gradients; a base model too large for one
  device needs FSDP (not wired for adapters: peft's frozen/trainable mix would need FSDP2's per-parameter
  grouping, and QLoRA's 4-bit weights cannot be sharded by it).

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


def init() -> None:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank: LOCAL_RANK picks it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


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

        def forward(self, input_ids: Any, attention_mask: Any, completion_mask: Any, sum_sq: bool = False) -> Any:
            t = token_logps(self.model, input_ids, attention_mask, completion_mask, sum_sq=sum_sq)
            return t.per_token, t.scored, t.log_sum_sq

    return _Scorer


def score(policy: Any, input_ids: Any, attention_mask: Any, completion_mask: Any, *, sum_sq: bool = False) -> Any:
    """`token_logps` through the wrapped policy where there is one, else on the model itself."""
    from .logps import TokenLogps, token_logps

    if is_wrapped(policy):
        return TokenLogps(*policy(input_ids, attention_mask, completion_mask, sum_sq))
    return token_logps(policy, input_ids, attention_mask, completion_mask, sum_sq=sum_sq)


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


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks transformers itself never splits across devices (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedSetupError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so "
                                    "it cannot be sharded per layer; train it with LoRA, or in one process")
    return layers


def wrap_policy(model: Any, *, lora: bool, dtype: str, device: Any) -> Any:
    """In a distributed run, the policy wrapped for its engine (FSDP2 for every weight, DDP for an adapter); in one
    process, the model itself. `model` is on the CPU for FSDP2 (sharding happens there) and on `device` for DDP."""
    import torch

    if not is_distributed():
        return model
    scorer = _scorer_class()(model)
    if lora:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        # Buffers (rotary tables) are computed identically on every rank: no broadcast before each forward, which
        # would also make evaluation on rank 0 alone a collective.
        wrapped = DistributedDataParallel(scorer, device_ids=ids, broadcast_buffers=False)
        wrapped._logitstore_engine = "ddp"
        return wrapped
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On a GPU, parameters are gathered and computed in the model's dtype, gradients reduced in float32; on a CPU
    # (gloo) in float32 as in one process.
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(scorer, mp_policy=mp)  # the root: embeddings, final norm, LM head
    scorer.to(device)  # only this rank's shards reach the device
    scorer._logitstore_engine = "fsdp2"
    return scorer


def grad_norm_value(norm: Any) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor over FSDP2's sharded gradients)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(policy: Any) -> dict[str, Any]:
    """The whole model's weights on the CPU of rank 0 (empty elsewhere), gathered shard by shard; collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}
