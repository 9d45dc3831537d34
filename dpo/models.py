"""Loading models and tokenizers from local folders, and identifying them quickly for fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from logitstore.errors import ModelError

DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "spiece.model")
_SAMPLES = 16
_SAMPLE_BYTES = 1 << 16


def _file_identity(path: Path) -> dict[str, Any]:
    """Size plus a hash of the safetensors header and 16 evenly spaced 64 KiB samples.

    Reads about 1 MiB per file whatever its size, so a 7B checkpoint is identified in well under a second.
    Any change of tensor names, shapes or dtypes changes the header; a retrained checkpoint changes the samples.
    """
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, 100 << 20)))
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * i // max(_SAMPLES - 1, 1)))
            h.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "sample_sha256": h.hexdigest()}


def folder_identity(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a model or adapter folder: its config and the identity of each weight file."""
    folder = Path(folder)
    configs = {}
    for name in ("config.json", "adapter_config.json", "generation_config.json"):
        p = folder / name
        if p.is_file():
            configs[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    weights = {p.name: _file_identity(p) for p in sorted(folder.iterdir())
               if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)}
    return {"configs": configs, "weights": weights}


def tokenizer_identity(folder: str | os.PathLike[str]) -> dict[str, str]:
    folder = Path(folder)
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in _TOKENIZER_FILES if (folder / name).is_file()}


def check_model_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    return path


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    path = check_model_folder(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        tokenizer = _declared_tokenizer(path)  # AutoTokenizer may insist on a fast tokenizer the model type implies
        if tokenizer is None:
            raise ModelError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.eos_token is None:
        raise ModelError(f"{path}: the tokenizer has no EOS token, which DPO needs to end completions")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as TRL does
    return tokenizer


def _declared_tokenizer(path: Path) -> Any:
    """The tokenizer class named in tokenizer_config.json, loaded directly (None if that fails too)."""
    import transformers

    try:
        name = json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"]
        return getattr(transformers, name).from_pretrained(str(path))
    except Exception:  # noqa: BLE001
        return None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(folder: str | os.PathLike[str], *, dtype: str = "float32", quantize: str | None = None,
               device: str = "auto", adapter: str | os.PathLike[str] | None = None,
               trainable_adapter: bool = False) -> Any:
    """A causal LM from a local folder, optionally 4-bit (bitsandbytes NF4) and with a peft adapter applied."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_folder(folder)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    device = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantize is not None:
        if quantize != "4bit":
            raise ModelError(f"unknown quantization {quantize!r}; the supported one is 4bit")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError("--quantize 4bit needs bitsandbytes: pip install 'logitstore[quantize]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load a causal LM ({str(exc).splitlines()[0][:200]})") from None
    if quantize is None:
        model.to(device)
    if adapter is not None:
        from peft import PeftModel

        adapter_path = Path(adapter)
        if not (adapter_path / "adapter_config.json").is_file():
            raise ModelError(f"{adapter_path}: not a peft adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable_adapter)
    return model


def model_fingerprint(folder: str | os.PathLike[str], *, adapter: str | os.PathLike[str] | None, dtype: str,
                      quantize: str | None) -> dict[str, Any]:
    path = check_model_folder(folder)
    config = json.loads((path / "config.json").read_text())
    return {
        "model": {"type": config.get("model_type"), **folder_identity(path)},
        "adapter": folder_identity(adapter) if adapter else None,
        "precision": {"dtype": dtype, "quantize": quantize},
        "tokenizer": tokenizer_identity(path),
    }
