"""The stages of benchmarks/gpu.py, each run in a child process of its own (`python gpu.py --stage NAME ARGS_JSON`)
so that its peak GPU memory is its own: make the model, check the environment, the reference pass (build a store,
measure its throughput), logitstore train and TRL's DPOTrainer + peft. Each prints one JSON line; an out-of-memory
failure is a result ({"fits": false, ...}), not a crash."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

# config.json of mistralai/Mistral-7B-v0.1, as published.
MISTRAL_7B_V01 = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                      sliding_window=4096, hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False,
                      vocab_size=32000, bos_token_id=1, eos_token_id=2)
TINY = dict(MISTRAL_7B_V01, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# NVIDIA's dense bf16 figures (SXM parts), the denominator of model-FLOPs utilisation.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
GIB = 1 << 30


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ---------------------------------------------------------------------------------------------------------------
# Stages (each runs in a child process: `python gpu.py --stage NAME ARGS_JSON`)


def stage_make_model(a: dict) -> dict:
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = LlamaTokenizer.from_pretrained(a["tokenizer"])
    config = MistralConfig(**(TINY if a["smoke"] else MISTRAL_7B_V01), pad_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    t = time.perf_counter()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # random init where it is fast
        model = MistralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(a["model"])
    tokenizer.save_pretrained(a["model"])
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "init_seconds": init_s, "save_seconds": time.perf_counter() - t,
            "dtype": str(dtype).removeprefix("torch.")}


def _gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "device_used_at_end_gib": (total - free) / GIB}


def _model_flops(pairs: list, n_layers: int, d_model: int, layer_params: int, head_params: int) -> float:
    """Forward FLOPs of the useful (unpadded) work: 2 x parameters per position through the layers, the LM head
    only at scored positions (the scorer never computes the others), causal attention 2 x T^2 x d per layer."""
    flops = 0.0
    for p in pairs:
        for completion in (p.chosen_ids, p.rejected_ids):
            t = len(p.prompt_ids) + len(completion)
            flops += 2 * layer_params * t + 2 * head_params * len(completion) + 2 * n_layers * t * t * d_model
    return flops


def stage_reference(a: dict) -> dict:
    """The reference pass of one precision: with `measure`, its throughput (model load, one warm-up batch, then
    every pair timed, once in one pass and once with prompt sharing); with `write_store`, the store the training
    stages read, made by the real build."""
    import torch

    from logitstore.dpo.reference import BuildConfig, build

    cfg = BuildConfig(model=a["model"], data=a["data"], out=a["out"], dtype=a["dtype"], quantize=a["quantize"],
                      max_length=a["max_length"], batch_size=a["batch_size"], batch_tokens=a["batch_tokens"])
    result = _measure_reference(cfg, a["parameters"]) if a.get("measure", True) else {}
    if a.get("write_store"):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t = time.perf_counter()
        built = build(cfg, progress=False, log=lambda s: None)
        result["build_seconds"] = time.perf_counter() - t
        result["store_bytes"] = built.store_bytes
        result.setdefault("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return result


def _measure_reference(cfg: Any, parameters: int) -> dict:
    import torch

    from logitstore.dpo.inputs.tokenization import tokenize_pair
    from logitstore.dpo.kinds import PAIRS
    from logitstore.dpo.model.loading import load_model, load_tokenizer, precision
    from logitstore.dpo.reference.scoring import score_rows

    tokenizer = load_tokenizer(cfg.model)
    pairs = [tokenize_pair(tokenizer, ex, cfg.max_length) for ex in PAIRS.plan(cfg, tokenizer).examples]
    t = time.perf_counter()
    model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device="auto")
    model.eval()
    load_s = time.perf_counter() - t
    device = next(model.parameters()).device

    def timed(share_prompt: bool) -> tuple[list, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        sides, _ = score_rows(model, pairs, share_prompt=share_prompt, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return sides[0] + sides[1], time.perf_counter() - t

    kw = dict(sides=2, pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens)
    with torch.no_grad(), precision(device, cfg.dtype):
        score_rows(model, pairs[:cfg.batch_size], share_prompt=True, **kw)  # warm-up: kernels, allocator
        rows, seconds = timed(True)
        rows_full, seconds_full = timed(False)
    sums = [float(x.sum(dtype="float64")) for x in rows]
    sums_full = [float(x.sum(dtype="float64")) for x in rows_full]
    result = _throughput(pairs, sum(map(len, rows)), model.config, parameters, seconds, seconds_full,
                         torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    # How far the prompt-sharing path (KV cache) lands from one pass over prompt+completion: the noise floor of
    # the precision, since both compute the same sums.
    result.update(load_seconds=load_s, sharing_max_abs_delta=max(abs(x - y) for x, y in zip(sums, sums_full)),
                  mean_abs_sequence_logp=sum(map(abs, sums)) / len(sums), **_gpu_memory())
    del model
    return result


def _throughput(pairs: list, scored: int, conf: Any, parameters: int, seconds: float, seconds_full: float, name: str) -> dict:
    positions = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    head = embed = conf.vocab_size * conf.hidden_size
    layer_params = parameters - head - embed  # every transformer layer (norms included, negligible)
    flops = _model_flops(pairs, conf.num_hidden_layers, conf.hidden_size, layer_params, head)
    peak = peak_flops(name) if name != "cpu" else None
    return {"device": name, "pairs": len(pairs), "positions": positions, "scored_tokens": scored,
            "score_seconds": seconds, "positions_per_second": positions / seconds,
            "scored_tokens_per_second": scored / seconds, "model_tflops_per_second": flops / seconds / 1e12,
            "positions_per_second_no_sharing": positions / seconds_full,
            "model_tflops_per_second_no_sharing": flops / seconds_full / 1e12,
            "mfu_no_sharing": flops / seconds_full / peak if peak else None,
            "mfu": flops / seconds / peak if peak else None}


def _cap_memory(a: dict) -> dict:
    """Hold the process to `cap_gib` of the device (as on a card of that size, CUDA context aside): the caching
    allocator refuses to grow past that fraction of the device and raises torch.OutOfMemoryError."""
    import torch

    if not (a.get("cap_gib") and torch.cuda.is_available()):
        return {}
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, a["cap_gib"] * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"cap_gib": a["cap_gib"], "cap_fraction": fraction}


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's, logitstore's (dpo.training.memory), or bitsandbytes' / a CUDA kernel's RuntimeError."""
    import torch

    from logitstore.dpo.training.memory import OutOfMemoryError

    return isinstance(exc, (torch.OutOfMemoryError, OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _out_of_memory(exc: BaseException) -> dict:
    import torch

    return {"fits": False, "status": "out of memory", "error": (str(exc).splitlines() or [type(exc).__name__])[0][:300],
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None}


def stage_train(a: dict) -> dict:
    """logitstore train: the policy alone in memory, the reference from the store; the run is configured by the
    CLI's own option parsing (`logitstore train ARGS`), so `options` are the command line's flags."""
    import torch

    cap = _cap_memory(a)
    recorder = _SnapshotRecorder(a.get("snapshot"))
    try:
        with recorder:
            result = _run_logitstore_train(a)
    except Exception as exc:  # noqa: BLE001 - only out of memory is a result; anything else is re-raised
        if _is_out_of_memory(exc):
            return {**_out_of_memory(exc), **cap, "options": a.get("options", [])}
        raise
    steps = result["history"]
    timed = [h["step_seconds"] for h in steps[1:]] or [steps[0]["step_seconds"]]
    return {"step_seconds": statistics.median(timed), "first_step_seconds": steps[0]["step_seconds"],
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"], "steps": len(steps), "fits": True,
            "status": "ok", "options": a.get("options", []), **cap,
            "tokens_per_second": statistics.median(h["tokens_per_second"] for h in steps[1:] or steps),
            **_gpu_memory(), **({"peak_allocated_gib": max(h["peak_memory_gib"] for h in steps)}
                                if torch.cuda.is_available() else {}), **recorder.result()}


def train_arguments(a: dict) -> list[str]:
    """`logitstore train`'s command line for the seed's setting, then the stage's extra `options`."""
    args = ["--model", a["model"], "--store", a["store"], "--out", a["out"], "--max-steps", str(a["steps"]),
            "--batch-size", str(a["batch_size"]), "--lr", "1e-4", "--lora-r", "16", "--lora-alpha", "32",
            "--lora-dropout", "0.05", "--target-modules", "all-linear", "--dtype", a["dtype"],
            "--optimizer", a["optimizer"], "--log-every", "1"]
    if a["quantize"]:
        args += ["--quantize", a["quantize"]]
    if a["gradient_checkpointing"]:
        args.append("--gradient-checkpointing")
    return args + list(a.get("options", []))


def _run_logitstore_train(a: dict) -> dict:
    import dataclasses

    from logitstore.cli.main import train as train_command
    from logitstore.dpo.training import TrainConfig, train

    params = dict(train_command.make_context("train", train_arguments(a)).params)
    params.pop("quiet", None)
    cfg = dataclasses.replace(TrainConfig(**params), plot=False)
    return train(cfg, progress=False, log=lambda s: None)


def trl_options(a: dict) -> dict:
    """DPOConfig's memory settings of a TRL stage: its default (gradient checkpointing, as DPOConfig's own default
    and the seed's setting) or its most frugal, which adds the reference log-probs computed once before training
    (in batches of the training batch, so never more than a step's own reference pass) and, on a GPU, activations
    offloaded to CPU memory (TRL's offloading needs an accelerator)."""
    frugal = bool(a.get("frugal"))
    return {"gradient_checkpointing": a["gradient_checkpointing"], "precompute_ref_log_probs": frugal,
            **({"precompute_ref_batch_size": a["batch_size"]} if frugal else {}),
            "activation_offloading": frugal and bool(a.get("cuda"))}


def stage_trl_train(a: dict) -> dict:
    """TRL 1.16 DPOTrainer + peft on the same model, data and settings; reference = the model with the adapter
    off, computed every step (or once before training, `frugal`)."""
    import torch

    times: list[float] = []
    cap = _cap_memory(a)
    recorder = _SnapshotRecorder(a.get("snapshot"))
    try:
        trainer = _trl_trainer(a, times)
        with recorder:
            trainer.train()
    except Exception as exc:  # noqa: BLE001 - only out of memory is a result; anything else is re-raised
        if _is_out_of_memory(exc):
            return {**_out_of_memory(exc), **cap, "trl_options": trl_options(a)}
        raise
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    memory = _gpu_memory() if torch.cuda.is_available() else {}
    return {"step_seconds": statistics.median(times[1:] or times), "first_step_seconds": times[0], "fits": True,
            "status": "ok", "loss_first": losses[0], "loss_last": losses[-1], "steps": len(times), **memory, **cap,
            "trl_options": trl_options(a), **recorder.result()}


def _trl_trainer(a: dict, times: list[float]) -> Any:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    cuda = torch.cuda.is_available()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a["dtype"]]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if a["quantize"]:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype,
                                                           bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    rows = [json.loads(line) for line in Path(a["data"]).read_text().splitlines()]

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    model = AutoModelForCausalLM.from_pretrained(a["model"], **kwargs)
    if not a["quantize"] and cuda:
        model.to("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = DPOConfig(output_dir=a["out"], max_length=a["max_length"], per_device_train_batch_size=a["batch_size"],
                       max_steps=a["steps"], learning_rate=1e-4, bf16=a["dtype"] == "bfloat16", use_cpu=not cuda,
                       report_to=[], save_strategy="no", logging_steps=1, dataset_num_proc=None,
                       optim=a["optimizer"] if a["optimizer"] != "adamw" else "adamw_torch", **trl_options(a))
    return DPOTrainer(model=model, args=config, processing_class=load_tokenizer(a["model"]),
                      train_dataset=datasets.Dataset.from_list(rows),
                      peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"),
                      callbacks=[Timer()])


def stage_env(a: dict) -> dict:
    """What the run stands on: the device, and the libraries' versions; bitsandbytes imported here first, so that
    a broken install is one clear line before any model is made."""
    import importlib.metadata as metadata

    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"cuda": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
                           "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda
                           else None, "torch": torch.__version__}
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import is the one line the run reports
        out["bitsandbytes_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    for name in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class _SnapshotRecorder:
    """With `enabled` on a GPU: torch.cuda.memory._record_memory_history over the run, then the breakdown of its
    largest instant (benchmarks/memprofile.py's pieces, told apart by each allocation's Python frames). The
    snapshot is read in-process (`_snapshot()`), never written as a pickle."""

    def __init__(self, enabled: bool | None) -> None:
        import torch

        self.on = bool(enabled) and torch.cuda.is_available()
        self.breakdown: dict = {}

    def __enter__(self) -> "_SnapshotRecorder":
        if self.on:
            import torch

            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.on:
            return
        import torch

        from memprofile import snapshot_breakdown

        try:
            self.breakdown = snapshot_breakdown(torch.cuda.memory._snapshot())
        except Exception as e:  # noqa: BLE001 - a failed breakdown must not lose the run's figures
            self.breakdown = {"error": f"{type(e).__name__}: {e}"}
        torch.cuda.memory._record_memory_history(enabled=None)

    def result(self) -> dict:
        return {"breakdown": self.breakdown} if self.breakdown else {}



def stage_sleep(a: dict) -> dict:
    """A stage that only waits (the tests stop it at a budget)."""
    time.sleep(a["seconds"])
    return {}


STAGES = {"sleep": stage_sleep, "env": stage_env, "make-model": stage_make_model, "reference": stage_reference, "train": stage_train,
          "trl-train": stage_trl_train}
