"""Loading models and tokenizers from local folders or the Hugging Face Hub, and identifying them quickly for
fingerprints; choosing the dtype a device should run a checkpoint in."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Any

from logitstore.errors import ModelError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
# What from_pretrained reads from a Hub repository: configs, tokenizer files and one set of weights. Subfolders
# and Mistral's consolidated.* copies are other formats of the same weights.
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_IGNORE = ["*/*", "consolidated.*"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
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
            for name in TOKENIZER_FILES if (folder / name).is_file()}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model or adapter named on the command line lives: a local folder, and for a Hub name the
    repository and the commit its revision resolved to."""

    path: Path
    repo_id: str | None = None
    commit: str | None = None

    def record(self) -> dict[str, str] | None:
        return {"repo": self.repo_id, "commit": self.commit} if self.repo_id else None  # type: ignore[dict-item]


_RESOLVED: dict[tuple[Any, ...], ModelSource] = {}


def resolve_model(name: str | os.PathLike[str] | ModelSource, revision: str | None = None) -> ModelSource:
    """A local folder as it is, or a Hub repository name resolved through huggingface_hub's cache.

    A Hub name is resolved once per process (so the tokenizer, the fingerprint and the weights all come from one
    commit) with `snapshot_download`: it fetches what is missing, or with HF_HUB_OFFLINE=1 only looks in the cache.
    """
    if isinstance(name, ModelSource):
        return name
    path = Path(name)
    if path.is_dir():
        if revision is not None:
            raise ModelError(f"{path}: --revision applies to Hugging Face Hub names, not to a local folder")
        return ModelSource(path)
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise ModelError(f"{name}: no such model folder") from None
    key = (str(name), revision, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    if key not in _RESOLVED:
        _RESOLVED[key] = _from_hub(str(name), revision)
    return _RESOLVED[key]


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    rev = revision or "main"
    tried = f"{repo_id}: no such model folder, and"
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*_HUB_FILES, "*.safetensors"],
                                        ignore_patterns=_HUB_IGNORE))
        if not any(folder.glob("*.safetensors")):  # an older repository with only PyTorch .bin weights
            folder = Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=[*_HUB_FILES, "*.bin"],
                                            ignore_patterns=_HUB_IGNORE))
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id}: the Hugging Face Hub has no revision {rev!r} of it") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        kind = "is gated: accept its terms and log in (hf auth login)" if isinstance(exc, GatedRepoError) else \
            "is not on the Hugging Face Hub (or is private: log in with hf auth login)"
        raise ModelError(f"{tried} it {kind}") from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as exc:
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"{tried} revision {rev!r} is not in {where}; HF_HUB_OFFLINE is set, so nothing "
                             "was downloaded") from None
        cause = exc.__cause__ or exc
        raise ModelError(f"{tried} revision {rev!r} is not in {where} and the Hub could not be reached "
                         f"({type(cause).__name__}: {_first_line(cause)})") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"{tried} the Hugging Face Hub refused it ({type(exc).__name__}: {_first_line(exc)})") \
            from None
    return ModelSource(folder, repo_id, folder.name)  # the snapshot folder is named after its commit


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def model_source(name: str | os.PathLike[str] | ModelSource, revision: str | None = None) -> ModelSource:
    """A resolved model that has a config.json."""
    source = resolve_model(name, revision)
    if not (source.path / "config.json").is_file():
        raise ModelError(f"{source.repo_id or source.path}: not a Hugging Face model folder (no config.json)")
    return source


def check_model_folder(folder: str | os.PathLike[str] | ModelSource, revision: str | None = None) -> Path:
    return model_source(folder, revision).path


def checkpoint_dtype(folder: str | os.PathLike[str]) -> str | None:
    """The dtype config.json says the weights were saved in (`dtype`, or `torch_dtype` before transformers 5)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    value = value.removeprefix("torch.") if isinstance(value, str) else None
    return value if value in DTYPES else None


def resolve_dtype(requested: str, *, checkpoint: str | None, device_type: str, bf16_supported: bool) -> str:
    """The dtype to run a model in: `requested` unless it is "auto".

    auto: float32 on a CPU (no half-precision speed to win, and exact); on a GPU the checkpoint's own half
    precision where the GPU computes it natively (bfloat16 from Ampere on; float16 everywhere), else float32.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelError(f"unknown dtype {requested!r}; choose auto or one of {', '.join(DTYPES)}")
        return requested
    if device_type != "cuda":
        return "float32"
    if checkpoint == "bfloat16":
        return "bfloat16" if bf16_supported else "float32"
    return "float16" if checkpoint == "float16" else "float32"


def model_dtype(folder: str | os.PathLike[str] | ModelSource, requested: str = "auto", device: str = "auto",
                revision: str | None = None) -> str:
    """:func:`resolve_dtype` for this model on this device."""
    import torch

    path = check_model_folder(folder, revision)
    device_type = torch.device(resolve_device(device)).type
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return resolve_dtype(requested, checkpoint=checkpoint_dtype(path), device_type=device_type, bf16_supported=bf16)


def precision(device: Any, dtype: str) -> Any:
    """Mixed precision in the model's dtype for its forward pass, on any device; nothing for float32.

    Both the reference pass and training run under it, so that at step 0 they compute the same numbers.
    """
    import torch

    device_type = torch.device(device).type
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def load_tokenizer(folder: str | os.PathLike[str] | ModelSource, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = check_model_folder(folder, revision)
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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def input_device(model: Any) -> Any:
    """Where a batch goes: the model's device, or for a model spread by `device_map` the first GPU it uses (the
    CPU if none); accelerate's hooks move activations between the layers' devices, and run layers offloaded to
    the CPU or disk there."""
    import torch

    placed = getattr(model, "hf_device_map", None)
    if placed and len(set(placed.values())) > 1:
        gpus = [d for d in placed.values() if d not in ("cpu", "disk")]
        return torch.device("cuda", gpus[0]) if gpus and isinstance(gpus[0], int) else \
            torch.device(gpus[0] if gpus else "cpu")
    return next(model.parameters()).device


def parse_max_memory(items: tuple[str, ...] | list[str]) -> dict[int | str, str]:
    """`--max-memory` values ("0=20GiB", "cuda:1=70GiB", "cpu=60GiB", "disk=1TB") as accelerate's max_memory."""
    from accelerate.utils import convert_file_size_to_int

    limits: dict[int | str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("cuda:")
        if not sep or not (key.isdigit() or key in ("cpu", "disk")):
            raise ModelError(f"--max-memory {item!r}: write DEVICE=SIZE, DEVICE a GPU index (0, cuda:0), cpu or disk")
        try:
            convert_file_size_to_int(value.strip())
        except (ValueError, TypeError):
            raise ModelError(f"--max-memory {item!r}: {value.strip()!r} is not a size (20GiB, 500MB)") from None
        limits[int(key) if key.isdigit() else key] = value.strip()
    return limits


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_attention(attn_implementation: str, *, device: str, dtype: str) -> None:
    if attn_implementation not in ATTENTION:
        raise ModelError(f"unknown attention implementation {attn_implementation!r}; choose one of "
                         f"{', '.join(ATTENTION)}")
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError("--attn-implementation flash_attention_2 needs the flash-attn package, which is not "
                         "installed (pip install flash-attn --no-build-isolation); sdpa needs nothing")
    if not device.startswith("cuda"):
        raise ModelError(f"flash_attention_2 runs on CUDA GPUs only, not on {device}; use sdpa")
    if dtype == "float32":
        raise ModelError("flash_attention_2 computes in bfloat16 or float16, not float32; pass --dtype bfloat16")


@contextlib.contextmanager
def peft_wrapping() -> Any:
    """peft (0.21) asks a transformers (5.x) model `is_gradient_checkpointing`, which transformers deprecated in
    favour of `is_activation_checkpointing` and warns about at every wrap: the user can do nothing about it, so that
    one warning is dropped (every other warning still shows)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_model_extras(*, quantize: str | None = None, adapter: Any = None, optimizer: str | None = None) -> None:
    """Refuse, before anything is written, a run whose model options need a package that is not installed."""
    if quantize is not None and quantize != "4bit":
        raise ModelError(f"unknown quantization {quantize!r}; the supported one is 4bit")
    needs = [("bitsandbytes", "--quantize 4bit", "quantize")] if quantize else []
    if optimizer is not None and "8bit" in optimizer:
        needs.append(("bitsandbytes", f"--optimizer {optimizer}", "quantize"))
    if adapter is not None:
        needs.append(("peft", "--adapter", "train"))
    for module, option, extra in needs:
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"{option} needs {module}, which is not installed: pip install 'logitstore[{extra}]'")


def load_model(folder: str | os.PathLike[str] | ModelSource, *, dtype: str = "auto", quantize: str | None = None,
               device: str = "auto", adapter: str | os.PathLike[str] | ModelSource | None = None,
               trainable_adapter: bool = False, revision: str | None = None, adapter_revision: str | None = None,
               attn_implementation: str = "sdpa", device_map: str | None = None,
               max_memory: dict[int | str, str] | None = None, offload_folder: str | None = None) -> Any:
    """A causal LM from a local folder or the Hub, optionally 4-bit (bitsandbytes NF4, computing in `dtype`) and
    with a peft adapter applied. `dtype` "auto" is :func:`model_dtype`'s choice.

    `device_map` ("auto", "balanced", "sequential", ...) spreads the layers over the machine's GPUs with accelerate's
    big-model inference, then the CPU, then `offload_folder` on disk, within `max_memory` per device
    ({0: "20GiB", "cpu": "60GiB"}); for a reference model larger than one device."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_folder(folder, revision)
    dtype = model_dtype(path, dtype, device)
    torch_dtype = getattr(torch, dtype)
    device = resolve_device(device)
    check_attention(attn_implementation, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if quantize is not None:
        check_model_extras(quantize=quantize)  # 4bit only, and bitsandbytes installed
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load a causal LM ({str(exc).splitlines()[0][:200]})") from None
    if quantize is None and device_map is None:
        model.to(device)
    # A 4-bit model keeps its norms, embeddings and head in `dtype`: no float32 copies as peft's
    # prepare_model_for_kbit_training makes (TRL makes none either). A float32 embedding carries a float32 residual
    # stream through every layer, twice the activation memory of bfloat16. The reference pass and the policy both
    # load through here, so they still compute the same numbers at step 0.
    if adapter is not None:
        from peft import PeftModel

        adapter_path = adapter_folder(adapter, adapter_revision)
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable_adapter)
    return model


def adapter_folder(adapter: str | os.PathLike[str] | ModelSource, revision: str | None = None) -> Path:
    path = resolve_model(adapter, revision).path
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a peft adapter folder (no adapter_config.json)")
    return path


def model_fingerprint(folder: str | os.PathLike[str] | ModelSource, *,
                      adapter: str | os.PathLike[str] | ModelSource | None, dtype: str, quantize: str | None,
                      revision: str | None = None, adapter_revision: str | None = None,
                      device: str = "auto") -> dict[str, Any]:
    """Identity of the model, adapter and tokenizer files, and the precision (`dtype` resolved: "auto" is
    recorded as what it chose). Hub names add the repository and the commit they resolved to."""
    source = model_source(folder, revision)
    adapter_source = resolve_model(adapter, adapter_revision) if adapter else None
    config = json.loads((source.path / "config.json").read_text())
    fingerprint = {
        "model": {"type": config.get("model_type"), **folder_identity(source.path)},
        "adapter": folder_identity(adapter_folder(adapter_source)) if adapter_source else None,
        "precision": {"dtype": model_dtype(source, dtype, device), "quantize": quantize},
        "tokenizer": tokenizer_identity(source.path),
    }
    hub = {name: s.record() for name, s in (("model", source), ("adapter", adapter_source)) if s and s.repo_id}
    if hub:
        fingerprint["hub"] = hub
    return fingerprint
