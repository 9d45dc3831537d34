"""What a build refuses before any data is read or weights load, in one line each: --device-map and --max-memory
where they cannot apply, and teacher records (--top-k / --sample-k) that cannot be stored or combined."""

from __future__ import annotations

from typing import Any

from logitstore.errors import LogitstoreError
from logitstore.teacher import TeacherError

from ..config import BuildConfig
from ..model.loading import DEVICE_MAPS, parse_max_memory


def placement(model: Any) -> str:
    """Where accelerate put the model's modules: "12 modules on 0, 3 on cpu, 2 on disk" (in placement order)."""
    counts: dict[str, int] = {}
    for where in getattr(model, "hf_device_map", {}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    parts = [f"{n} module{'s' if n > 1 else ''} on {where}" for where, n in counts.items()]
    return ", ".join(parts) or "one device"


def check_device_map(cfg: BuildConfig) -> None:
    """--device-map and --max-memory: refused where they cannot apply, before anything is read or written."""
    if cfg.max_memory and cfg.device_map is None:
        raise LogitstoreError("--max-memory limits what --device-map places on each device; pass --device-map auto")
    if cfg.device_map is None:
        return
    if cfg.device_map not in DEVICE_MAPS:
        raise LogitstoreError(f"unknown --device-map {cfg.device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
    if cfg.device != "auto":
        raise LogitstoreError(f"--device-map places the layers itself; drop --device {cfg.device}")
    if cfg.share_prompt:
        raise LogitstoreError("--prompt-sharing runs on one device; drop it with --device-map")
    parse_max_memory(cfg.max_memory)


def check_teacher(cfg: BuildConfig) -> dict[str, Any] | None:
    """The header's teacher entry of a build with --top-k or --sample-k (None without), after refusing in one line
    what cannot be stored or combined: read from the model's config, before any data is read or weights load."""
    if cfg.top_k is None and cfg.sample_k is None:
        return None
    from .teacher import model_vocab, teacher_entry

    entry = teacher_entry(top_k=cfg.top_k, sample_k=cfg.sample_k, codec=cfg.topk_codec, seed=cfg.seed,
                          vocab=model_vocab(cfg.model, cfg.revision))
    flag = "--top-k" if cfg.top_k is not None else "--sample-k"
    if cfg.reuse:
        raise TeacherError(f"{flag} needs the model's logits at every row; --reuse copies values without them: "
                           "drop one")
    if cfg.share_prompt:
        raise TeacherError(f"{flag} takes records in the one-pass scoring; drop --prompt-sharing")
    return entry
