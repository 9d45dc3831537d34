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


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks transformers itself never splits across devices (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedSetupError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so "
                                    "it cannot be sharded per layer; train it with LoRA, or in one process")
    return layers


def empty_model(folder: Any, *, dtype: str, attn_implementation: str) -> Any:
    """The model of `folder` with its parameters on the meta device (no memory) and its buffers (rotary tables)
    computed on the CPU: FSDP2 shards it before any weight is read, and :func:`load_shards` fills each rank's
    part straight from the checkpoint files."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    model.tie_weights()
    return model


def _checkpoint_files(folder: Any) -> list[Any]:
    from pathlib import Path

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DistributedSetupError(f"{folder}: a sharded run reads safetensors weights, and there are none (convert "
                                    "the checkpoint, or train with LoRA)")
    return files


def load_shards(policy: Any, folder: Any) -> None:
    """Fill each rank's shard of every weight from the model folder's safetensors files, reading only the rows
    of its shard (FSDP2 shards dimension 0 in world-size chunks, as torch.chunk does)."""
    import torch
    from safetensors import safe_open

    model = unwrap(policy)
    wanted = dict(model.state_dict())  # sharded DTensors; tied names share one
    filled: set[int] = set()
    for path in _checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                target = wanted.get(name)
                if target is None:
                    continue
                local = target.to_local() if hasattr(target, "to_local") else target
                piece = f.get_slice(name)
                shape = list(piece.get_shape())
                if shape != list(target.shape):
                    raise DistributedSetupError(f"{path}: {name} has shape {shape}, the model expects "
                                                f"{list(target.shape)}")
                if hasattr(target, "to_local"):
                    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                    rows, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                         target.placements)
                    start = offset[0] if len(offset) else 0
                    values = piece[start:start + rows[0]] if shape else piece[:]
                else:
                    values = piece[:]
                with torch.no_grad():
                    local.copy_(values.to(local.dtype))
                filled.add(id(target))
    missing = [n for n, t in wanted.items() if id(t) not in filled]
    if missing:
        raise DistributedSetupError(f"{folder}: the checkpoint does not hold {len(missing)} of the model's weights "
                                    f"(first: {missing[0]}); train it with LoRA, or in one process")


def wrap_policy(model: Any, *, lora: bool, dtype: str, device: Any, weights_from: Any = None) -> Any:
    """In a distributed run, the policy wrapped for its engine (FSDP2 for every weight, DDP for an adapter); in one
    process, the model itself. For DDP `model` is on `device`. For FSDP2 it is on the CPU, or with `weights_from`
    (a model folder) on the meta device from :func:`empty_model`, and each rank then reads only its shards."""
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
    # Units: each decoder layer, and the input embeddings and the LM head on their own (at a 32k vocabulary they
    # hold half of a small model: in the root unit they would stay gathered for the whole step).
    units = decoder_layers(model)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:  # tied ones stay together in the root
        units += [embeddings, head]
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(scorer, mp_policy=mp)  # the root: what is left (the final norm)
    if weights_from is not None:
        buffers = {name: b.clone() for name, b in scorer.named_buffers()}  # computed on the CPU, not meta
        scorer.to_empty(device=device)
        with torch.no_grad():
            for name, b in scorer.named_buffers():
                b.copy_(buffers[name])
        scorer._logitstore_engine = "fsdp2"
        load_shards(scorer, weights_from)
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


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
MAX_FILE_BYTES = 5 << 30  # per safetensors file of a saved model, as Hugging Face's own sharded checkpoints


def save_gathered_model(policy: Any, folder: Any, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Save a model sharded by FSDP2 as one from_pretrained folder, holding one whole tensor at a time.

    Every rank calls this (each tensor is all-gathered in turn); rank 0 writes. The safetensors headers are laid
    out from the global shapes first, so each gathered tensor is written straight after the previous one and
    freed: no rank ever holds the whole model, which it may not fit."""
    import json
    import struct
    from pathlib import Path

    import torch
    import torch.distributed as dist

    folder = Path(folder)
    model = unwrap(policy)
    main = dist.get_rank() == 0
    tensors, seen = [], set()
    for name, t in model.state_dict().items():  # sharded DTensors; tied copies appear once (the first name)
        local = t.to_local() if hasattr(t, "to_local") else t
        ident = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape)) if local.numel() \
            else id(local)
        if ident in seen:
            continue
        seen.add(ident)
        tensors.append((name, t))
    files: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if files[-1] and size + nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append((name, t))
        size += nbytes
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for file_name, group in zip(names, files):
        header, offset = {}, 0
        for name, t in group:
            dtype = str(t.dtype).removeprefix("torch.")
            nbytes = t.numel() * t.element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        out = open(folder / file_name, "wb") if main else None
        try:
            if out is not None:
                out.write(struct.pack("<Q", len(raw)) + raw)
            for name, t in group:
                whole = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective: every rank, in order
                if out is not None:
                    out.write(whole.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                del whole
        finally:
            if out is not None:
                out.close()
    if main:
        if len(files) > 1:
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        model.config.save_pretrained(str(folder))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(folder))
