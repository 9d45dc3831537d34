"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds the adapter (peft's own safetensors format), `optimizer.safetensors` (state tensors,
with the optimizer's non-tensor layout as JSON in the file's metadata), `rng.safetensors` and
`trainer_state.json`. It is written to a temporary folder and renamed, so a crash never leaves half of one.

A run sharded with FSDP2 (several processes, every weight trained) writes its weights and optimizer state through
torch.distributed.checkpoint instead, each rank its own shard, in safetensors files under `sharded/`
(torch's HuggingFaceStorageWriter: the shard offsets are JSON in each file's metadata, so nothing is pickled);
loading reshards them onto the running ranks. Each rank's RNG state is its own file (`rng.safetensors` for rank 0,
`rng-<rank>.safetensors` for the others).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from logitstore.errors import LogitstoreError

from .files import STAGING, publish_folder, staging_folder

STATE_FILE = "trainer_state.json"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        slot: dict[str, Any] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}/{name}"] = value.detach().contiguous().cpu()
                slot[name] = {"tensor": f"{pid}/{name}"}
            else:
                slot[name] = {"value": value}
        layout["state"][str(pid)] = slot
    return tensors, layout


def _optimizer_from_files(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, slot in layout["state"].items():
        state[int(pid)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in slot.items()}
    return {"state": state, "param_groups": layout["param_groups"]}


SHARDED = "sharded"


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-{rank}.safetensors"


def _flat_sharded_state(policy: Any, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's shards of the weights and of the optimizer state as one flat {name: tensor} dict (what the
    safetensors writer takes), and the optimizer state dict it was flattened from."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = {f"model/{k}": v for k, v in get_model_state_dict(policy).items()}
    optim = get_optimizer_state_dict(policy, optimizer)  # creates the state of a fresh optimizer, to load into
    for fqn, entries in optim["state"].items():
        for name, value in entries.items():
            if not torch.is_tensor(value):
                raise ValueError(f"optimizer state {fqn}.{name} is not a tensor; a sharded checkpoint holds tensors")
            flat[f"optim/{fqn}/{name}"] = value
    return flat, optim


def save_checkpoint(folder: str | os.PathLike[str], *, model: Any, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], sharded_policy: Any = None, rank: int = 0) -> Path:
    """Write a checkpoint. In a distributed run every rank calls this (it is collective): rank 0 writes the
    adapter or model and the optimizer state, or with `sharded_policy` (FSDP2) every rank writes its shards; every
    rank writes its RNG state; rank 0 then renames the finished folder into place."""
    from ..distributed import group as distributed

    folder = Path(folder)
    tmp = staging_folder(folder) if rank == 0 else folder.with_name(folder.name + STAGING)
    distributed.barrier()
    if sharded_policy is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        flat, _ = _flat_sharded_state(sharded_policy, optimizer)
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True))
    elif rank == 0:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tensors, layout = _optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"layout": json.dumps(layout)})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / _rng_file(rank)))
    distributed.barrier()
    if rank == 0:  # the state file marks the checkpoint complete: written last, the folder published whole
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        publish_folder(tmp, folder)
    distributed.barrier()
    return folder


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        if p.is_dir() and (p / STATE_FILE).is_file() and p.name.split("-")[-1].isdigit():
            found.append((int(p.name.split("-")[-1]), p))
    return max(found)[1] if found else None


def _load_full_model(model: Any, folder: Path) -> None:
    """Weights of a model saved whole (training without LoRA): every safetensors file but our own two."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in ("optimizer.safetensors", "rng.safetensors"):
            state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied copies (an output head sharing the embeddings); those may be missing.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"{folder}: the checkpoint's weights do not fit the model "
                         f"({len(unexpected)} unexpected, {len(untied)} missing)")


def _load_sharded(folder: Path, policy: Any, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    flat, optim = _flat_sharded_state(policy, optimizer)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / SHARDED)))  # into these tensors, resharded
    set_model_state_dict(policy, {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")})
    for fqn, entries in optim["state"].items():
        for name in entries:
            entries[name] = flat[f"optim/{fqn}/{name}"]
    set_optimizer_state_dict(policy, optimizer, optim)


def load_checkpoint(folder: str | os.PathLike[str], *, model: Any, optimizer: torch.optim.Optimizer,
                    sharded_policy: Any = None, rank: int = 0) -> dict[str, Any]:
    """Restore adapter weights (or the model's, or with `sharded_policy` this rank's shards), optimizer state and
    this rank's RNG; return the trainer state. Collective for a sharded checkpoint."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    was_sharded = (folder / SHARDED).is_dir()
    if was_sharded != (sharded_policy is not None):
        how = f"by a sharded run of {state.get('world_size', 'several')} processes" if was_sharded else \
            "by a run that was not sharded"
        raise LogitstoreError(f"{folder} was written {how}; resume it the same way (torchrun with as many processes, "
                         "--lora or --no-lora as before)")
    if sharded_policy is not None:
        _load_sharded(folder, sharded_policy, optimizer)
        _load_rng(folder, rank)
        return state
    if (folder / "adapter_model.safetensors").is_file():
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    else:
        _load_full_model(model, folder)
    from safetensors import safe_open

    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    optimizer.load_state_dict(_optimizer_from_files(tensors, layout))
    _load_rng(folder, rank)
    return state


def _load_rng(folder: Path, rank: int) -> None:
    path = folder / _rng_file(rank)
    if not path.is_file():
        raise LogitstoreError(f"{folder} holds no RNG state for rank {rank}; resume with as many processes as wrote it")
    rng = load_file(str(path))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))])
