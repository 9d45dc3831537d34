"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds the adapter (peft's own safetensors format), `optimizer.safetensors` (state tensors,
with the optimizer's non-tensor layout as JSON in the file's metadata), `rng.safetensors` and
`trainer_state.json`. It is written to a temporary folder and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def save_checkpoint(folder: str | os.PathLike[str], *, model: Any, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tensors, layout = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"layout": json.dumps(layout)})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
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


def load_checkpoint(folder: str | os.PathLike[str], *, model: Any, optimizer: torch.optim.Optimizer,
                    ) -> dict[str, Any]:
    """Restore adapter weights, optimizer state and RNG; return the trainer state."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    else:
        _load_full_model(model, folder)
    from safetensors import safe_open

    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    optimizer.load_state_dict(_optimizer_from_files(tensors, layout))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))])
    return json.loads((folder / STATE_FILE).read_text())
