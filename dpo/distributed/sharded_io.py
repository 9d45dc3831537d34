"""A model sharded by FSDP2, in and out of files: the empty (meta) model that FSDP2 shards before any weight is
read, each rank's rows read straight from the safetensors files, and the final `from_pretrained` folder written
one gathered tensor at a time (no rank ever holds the whole model)."""

from __future__ import annotations

from typing import Any

from .group import DistributedSetupError, unwrap


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
