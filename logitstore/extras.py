"""Which optional extra provides a module, so a command that needs one says what to install.

The core install (numpy, zarr, numcodecs, click) opens, verifies, describes and exports stores; everything else
comes with an extra declared in pyproject.toml.
"""

from __future__ import annotations

# Top-level module -> the extra whose install provides it.
MODULE_EXTRAS = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "safetensors": "train",
    "tqdm": "train",
    "matplotlib": "train",
    "datasets": "data",
    "pyarrow": "data",
    "bitsandbytes": "quantize",
    "fsspec": "remote",
    "s3fs": "remote",
    "trl": "trl",
    "yaml": "train",  # --config FILE
    "tensorboard": "tensorboard",  # --report-to
    "trackio": "trackio",
    "wandb": "wandb",
}

# A module whose distribution has another name: what the message names (and pyproject.toml lists).
DISTRIBUTIONS = {"yaml": "pyyaml"}


def missing_extra(exc: ImportError) -> str | None:
    """When `exc` is a missing optional module, the end of a one-line message naming the extra that installs it
    ("needs torch, ...: pip install 'logitstore[train]'"); otherwise None."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:  # fsspec raises "Install s3fs ..." from the ModuleNotFoundError
        name = (getattr(cause, "name", None) or "").split(".")[0]
        extra = MODULE_EXTRAS.get(name)
        if isinstance(cause, ModuleNotFoundError) and extra is not None:
            return (f"needs {DISTRIBUTIONS.get(name, name)}, which this install leaves out: "
                    f"pip install 'logitstore[{extra}]'")
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None
