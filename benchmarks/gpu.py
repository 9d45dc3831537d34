"""The workload logitstore is for, measured on one GPU: a model with Mistral-7B-v0.1's exact architecture (random
weights, nothing downloaded), its reference pass in bf16 and 4-bit, and a QLoRA DPO training step against TRL's
DPOTrainer + peft, which computes the reference with the adapter switched off.

    python benchmarks/gpu.py                      # on a CUDA machine: everything, results to --json
    python benchmarks/gpu.py --smoke              # anywhere: the same stages on a tiny model (the tests run this)
    python benchmarks/gpu.py --max-length-sweep   # the longest max length whose step fits in 12 GiB, both trainers
    python benchmarks/gpu.py --max-length-sweep --smoke   # the sweep's stages on a tiny model on CPU
    python benchmarks/gpu.py --render RESULTS     # write RESULTS (from a GPU run) into docs/benchmarks.md

The original report's setup: Mistral-7B in 4-bit NF4 (double quantisation, bf16 compute), LoRA r=16 on every
linear layer, sequences cut at 1,024 tokens, batch 2, gradient checkpointing, paged 8-bit AdamW. The pairs are
synthetic text long enough that every sequence reaches the 1,024-token limit, so peak memory is the worst case a
run of that setup meets. Each stage runs in its own process, so its peak GPU memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from report import write_section  # noqa: E402

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
    """Reference-pass throughput of one precision: model load, one warm-up batch, then every pair timed."""
    import torch

    from logitstore.dpo.model.loading import load_model, load_tokenizer, precision
    from logitstore.dpo.kinds import PAIRS
    from logitstore.dpo.reference import BuildConfig, build
    from logitstore.dpo.reference.scoring import score_rows

    cfg = BuildConfig(model=a["model"], data=a["data"], out=a["out"], dtype=a["dtype"], quantize=a["quantize"],
                      max_length=a["max_length"], batch_size=a["batch_size"], batch_tokens=a["batch_tokens"])
    tokenizer = load_tokenizer(cfg.model)
    examples = PAIRS.plan(cfg, tokenizer).examples
    from logitstore.dpo.inputs.tokenization import tokenize_pair

    pairs = [tokenize_pair(tokenizer, ex, cfg.max_length) for ex in examples]
    t = time.perf_counter()
    model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device="auto")
    model.eval()
    load_s = time.perf_counter() - t
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    kw = dict(sides=2, pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens)
    with torch.no_grad(), precision(device, cfg.dtype):
        score_rows(model, pairs[:cfg.batch_size], share_prompt=True, **kw)  # warm-up: kernels, allocator
        sync()
        t = time.perf_counter()
        (chosen, rejected), _ = score_rows(model, pairs, share_prompt=True, **kw)
        sync()
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        (chosen_full, rejected_full), _ = score_rows(model, pairs, share_prompt=False, **kw)
        sync()
        seconds_full = time.perf_counter() - t
    # How far the prompt-sharing path (KV cache) lands from one pass over prompt+completion: the noise floor of
    # the precision, since both compute the same sums.
    sums = [float(x.sum(dtype="float64")) for x in chosen + rejected]
    sums_full = [float(x.sum(dtype="float64")) for x in chosen_full + rejected_full]
    sharing_delta = max(abs(a - b) for a, b in zip(sums, sums_full))
    positions = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    scored = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
    conf = model.config
    head = conf.vocab_size * conf.hidden_size
    embed = conf.vocab_size * conf.hidden_size
    layer_params = a["parameters"] - head - embed  # every transformer layer (norms included, negligible)
    flops = _model_flops(pairs, conf.num_hidden_layers, conf.hidden_size, layer_params, head)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    result = {"device": name, "pairs": len(pairs), "positions": positions, "scored_tokens": scored,
              "load_seconds": load_s, "score_seconds": seconds, "positions_per_second": positions / seconds,
              "scored_tokens_per_second": scored / seconds, "model_tflops_per_second": flops / seconds / 1e12,
              "positions_per_second_no_sharing": positions / seconds_full,
              "model_tflops_per_second_no_sharing": flops / seconds_full / 1e12,
              "mfu_no_sharing": flops / seconds_full / peak if peak else None, "sharing_max_abs_delta": sharing_delta,
              "mean_abs_sequence_logp": sum(map(abs, sums)) / len(sums),
              "mfu": flops / seconds / peak if peak else None, **_gpu_memory()}
    del model
    if a.get("write_store"):  # the store the training stages read, made by the real build
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        built = build(cfg, progress=False, log=lambda s: None)
        result["build_seconds"] = time.perf_counter() - t
        result["store_bytes"] = built.store_bytes
    return result


def _cap_memory(a: dict) -> None:
    """Hold the process to `cap_gib` of the device (as on a card of that size, CUDA context aside)."""
    import torch

    if a.get("cap_gib") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a["cap_gib"] * GIB / total))


def _out_of_memory(exc: BaseException) -> dict:
    import torch

    return {"fits": False, "error": str(exc).splitlines()[0][:300],
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None}


def stage_train(a: dict) -> dict:
    """logitstore train: the policy alone in memory, the reference from the store."""
    import torch

    from logitstore.dpo.training.memory import OutOfMemoryError

    _cap_memory(a)
    recorder = _SnapshotRecorder(a.get("snapshot"))
    try:
        with recorder:
            result = _run_logitstore_train(a)
    except OutOfMemoryError as exc:
        return _out_of_memory(exc)
    steps = result["history"]
    timed = [h["step_seconds"] for h in steps[1:]] or [steps[0]["step_seconds"]]
    return {"step_seconds": statistics.median(timed), "first_step_seconds": steps[0]["step_seconds"],
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"], "steps": len(steps), "fits": True,
            "tokens_per_second": statistics.median(h["tokens_per_second"] for h in steps[1:] or steps),
            **_gpu_memory(), **({"peak_allocated_gib": max(h["peak_memory_gib"] for h in steps)}
                                if torch.cuda.is_available() else {}), **recorder.result()}


def _run_logitstore_train(a: dict) -> dict:
    from logitstore.dpo.training import TrainConfig, train

    return train(TrainConfig(model=a["model"], store=a["store"], out=a["out"], max_steps=a["steps"],
                               batch_size=a["batch_size"], lr=1e-4, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                               target_modules="all-linear", quantize=a["quantize"], dtype=a["dtype"],
                               gradient_checkpointing=a["gradient_checkpointing"], optimizer=a["optimizer"],
                               log_every=1, plot=False), progress=False, log=lambda s: None)


def stage_trl_train(a: dict) -> dict:
    """TRL 1.16 DPOTrainer + peft on the same model, data and settings; reference = the model with the adapter
    off, computed every step."""
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
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    _cap_memory(a)
    model = AutoModelForCausalLM.from_pretrained(a["model"], **kwargs)
    if not a["quantize"] and cuda:
        model.to("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = DPOConfig(output_dir=a["out"], max_length=a["max_length"], per_device_train_batch_size=a["batch_size"],
                       max_steps=a["steps"], learning_rate=1e-4, bf16=a["dtype"] == "bfloat16", use_cpu=not cuda,
                       report_to=[], save_strategy="no", logging_steps=1, dataset_num_proc=None,
                       gradient_checkpointing=a["gradient_checkpointing"],
                       optim=a["optimizer"] if a["optimizer"] != "adamw" else "adamw_torch")
    trainer = DPOTrainer(model=model, args=config, processing_class=load_tokenizer(a["model"]),
                         train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    recorder = _SnapshotRecorder(a.get("snapshot"))
    try:
        with recorder:
            trainer.train()
    except torch.OutOfMemoryError as exc:
        return _out_of_memory(exc)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": statistics.median(times[1:] or times), "first_step_seconds": times[0], "fits": True,
            "loss_first": losses[0], "loss_last": losses[-1], "steps": len(times), **_gpu_memory(),
            **recorder.result()}


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


STAGES = {"make-model": stage_make_model, "reference": stage_reference, "train": stage_train,
          "trl-train": stage_trl_train}


# ---------------------------------------------------------------------------------------------------------------
# The driver


def synthetic_pairs(n: int, words_prompt: int, words_completion: int, seed: int = 0) -> list[dict]:
    """Pairs of random lowercase words: long enough to reach the length limit, text so that both trainers
    tokenize it themselves."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]

    def text(k: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(k))

    return [{"id": f"pair-{i}", "prompt": text(words_prompt) + "\n", "chosen": text(words_completion),
             "rejected": text(words_completion)} for i in range(n)]


def run_stage(name: str, args: dict, log: Any) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--stage", name, json.dumps(args)], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        log(f"[{name}] failed after {wall:.0f} s:\n  " + "\n  ".join(tail))
        return {"error": tail[-1] if tail else f"exit {done.returncode}", "wall_seconds": wall}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = wall
    log(f"[{name}] {json.dumps(out)}")
    return out


def default_tokenizer() -> str:
    import shutil

    import mistral_common

    folder = Path(tempfile.mkdtemp(prefix="mistral-tok-"))
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return str(folder)


def run(smoke: bool, work: Path, tokenizer: str | None, results_path: Path | None, log: Any = print) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if not smoke and not cuda:
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use --smoke to run the stages on a tiny model here")
    tokenizer = tokenizer or default_tokenizer()
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "mistral-7b-architecture", work / "pairs.jsonl"
    max_length, batch, steps = (128, 2, 3) if smoke else (1024, 2, 12)
    n_pairs = 8 if smoke else 64
    rows = synthetic_pairs(n_pairs, 10 if smoke else 75, 30 if smoke else 250)  # ~3.4 tokens a word
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dtype = "bfloat16" if cuda else "float32"
    results: dict[str, Any] = {"smoke": smoke, "device": torch.cuda.get_device_name() if cuda else "cpu",
                               "torch": torch.__version__, "setup": {
                                   "max_length": max_length, "batch_size": batch, "steps": steps, "pairs": n_pairs,
                                   "lora": "r=16, alpha=32, dropout 0.05, all linear layers",
                                   "quantization": "NF4, double quantisation, compute " + dtype,
                                   "gradient_checkpointing": True,
                                   "optimizer": "paged_adamw_8bit" if cuda else "adamw"}}
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        if results_path is not None:
            results_path.write_text(json.dumps(results, indent=1) + "\n")

    results["make_model"] = run_stage("make-model", {"tokenizer": tokenizer, "model": str(model), "smoke": smoke}, log)
    save()
    if "error" in results["make_model"]:
        return results
    params = results["make_model"]["parameters"]
    common = {"model": str(model), "data": str(data), "max_length": max_length, "parameters": params,
              "batch_size": 8, "batch_tokens": 16384}
    results["reference_bf16"] = run_stage("reference", {**common, "dtype": dtype, "quantize": None,
                                                        "out": str(work / "bf16.lstore")}, log)
    save()
    store = work / "nf4.lstore"
    results["reference_4bit"] = run_stage("reference", {**common, "dtype": dtype, "quantize": "4bit",
                                                        "out": str(store), "write_store": True}, log)
    save()
    train_args = {"model": str(model), "data": str(data), "max_length": max_length, "batch_size": batch,
                  "steps": steps, "dtype": dtype, "quantize": "4bit", "gradient_checkpointing": True,
                  "optimizer": "paged_adamw_8bit" if cuda else "adamw"}
    if "error" not in results["reference_4bit"]:
        results["train_logitstore"] = run_stage("train", {**train_args, "store": str(store),
                                                          "out": str(work / "run-logitstore")}, log)
        save()
    results["train_trl"] = run_stage("trl-train", {**train_args, "out": str(work / "run-trl")}, log)
    save()
    # Where each trainer's peak goes: two steps each under torch.cuda.memory's allocation history (a GPU only;
    # recording slows the step, so these runs are not the timed ones above).
    if cuda:
        snap = {**train_args, "steps": 2, "snapshot": True}
        if "error" not in results["reference_4bit"]:
            results["breakdown_logitstore"] = run_stage("train", {**snap, "store": str(store),
                                                                  "out": str(work / "snap-logitstore")}, log)
            save()
        results["breakdown_trl"] = run_stage("trl-train", {**snap, "out": str(work / "snap-trl")}, log)
        save()
    return results


SWEEP_LENGTHS = (1024, 2048, 3072, 4096, 6144, 8192)
SWEEP_CAP_GIB = 12


def sweep(smoke: bool, work: Path, tokenizer: str | None, results_path: Path | None, log: Any = print) -> dict:
    """The longest max length whose training step fits in 12 GiB at batch 2, ours and TRL's: each length's step
    runs in its own process held to 12 GiB of the device (`set_per_process_memory_fraction`), lengths in rising
    order until one does not fit. --smoke runs the same stages on a tiny model on CPU, without a cap."""
    import torch

    cuda = torch.cuda.is_available()
    if not smoke and not cuda:
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use --smoke to run the stages on a tiny model here")
    tokenizer = tokenizer or default_tokenizer()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "mistral-7b-architecture"
    lengths = (64, 128) if smoke else SWEEP_LENGTHS
    dtype = "bfloat16" if cuda else "float32"
    results: dict[str, Any] = {"smoke": smoke, "device": torch.cuda.get_device_name() if cuda else "cpu",
                               "torch": torch.__version__, "sweep": {
                                   "cap_gib": SWEEP_CAP_GIB if cuda else None, "lengths": list(lengths),
                                   "batch_size": 2, "steps": 2, "logitstore": {}, "trl": {}}}

    def save() -> None:
        if results_path is not None:
            results_path.write_text(json.dumps(results, indent=1) + "\n")

    if not (model / "config.json").exists():
        results["make_model"] = run_stage("make-model", {"tokenizer": tokenizer, "model": str(model),
                                                         "smoke": smoke}, log)
        save()
        if "error" in results["make_model"]:
            return results
    fits = {"logitstore": True, "trl": True}
    for length in lengths:
        data = work / f"pairs-{length}.jsonl"
        # ~3.4 tokens a word: every sequence reaches the limit, so the step meets the worst case of that length.
        rows = synthetic_pairs(4, max(4, length * 75 // 1024), max(8, length * 250 // 1024), seed=length)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train_args = {"model": str(model), "data": str(data), "max_length": length, "batch_size": 2, "steps": 2,
                      "dtype": dtype, "quantize": "4bit", "gradient_checkpointing": True,
                      "optimizer": "paged_adamw_8bit" if cuda else "adamw", "cap_gib": SWEEP_CAP_GIB if cuda else None}
        if fits["logitstore"]:
            store = work / f"nf4-{length}.lstore"
            built = run_stage("reference", {"model": str(model), "data": str(data), "max_length": length,
                                            "parameters": 0, "batch_size": 2, "batch_tokens": 2 * length,
                                            "dtype": dtype, "quantize": "4bit", "out": str(store),
                                            "write_store": True}, log)
            ours = run_stage("train", {**train_args, "store": str(store), "out": str(work / f"run-ours-{length}")},
                             log) if "error" not in built else {"fits": False, "error": "build: " + built["error"]}
            results["sweep"]["logitstore"][str(length)] = ours
            fits["logitstore"] = bool(ours.get("fits"))
            save()
        if fits["trl"]:
            trl = run_stage("trl-train", {**train_args, "out": str(work / f"run-trl-{length}")}, log)
            results["sweep"]["trl"][str(length)] = trl
            fits["trl"] = bool(trl.get("fits"))
            save()
    for name in ("logitstore", "trl"):
        ok = [int(k) for k, v in results["sweep"][name].items() if v.get("fits")]
        results["sweep"][f"longest_{name}"] = max(ok) if ok else None
    save()
    return results


# ---------------------------------------------------------------------------------------------------------------
# The report section

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def _f(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def render(results: dict) -> str:
    s = results["setup"]
    ref16, ref4 = results.get("reference_bf16", {}), results.get("reference_4bit", {})
    ours, trl = results.get("train_logitstore", {}), results.get("train_trl", {})
    lines = [
        BEGIN,
        f"## On a GPU: Mistral-7B-v0.1's architecture on one {results['device']}",
        "",
        f"Measured by `python benchmarks/gpu.py` (torch {results['torch']}, transformers "
        f"{results.get('transformers', '?')}): a model with Mistral-7B-v0.1's exact config "
        f"({results['make_model'].get('parameters', 0) / 1e9:.2f} B parameters, random weights, nothing downloaded), "
        f"{s['pairs']} synthetic pairs whose every sequence reaches the {s['max_length']}-token limit. Each stage "
        "ran in its own process; memory is PyTorch's peak for that process (allocated / reserved by its caching "
        "allocator) and the device memory in use at its end (CUDA context included).",
        "",
        "**Reference pass** (`score_rows`: batches of up to 8 pairs / 16,384 tokens; one pass over prompt+completion, "
        "the default, and with prompt sharing through the KV cache; model FLOPs count only unpadded positions and "
        "the LM head at scored ones; MFU against the GPU's dense bf16 peak):",
        "",
        "| precision | load s | positions/s | scored tokens/s | model TFLOP/s | MFU | positions/s, prompt sharing "
        "| peak alloc GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in (("bf16", ref16), ("4-bit NF4", ref4)):
        if "error" in r or not r:
            lines.append(f"| {label} | failed: {r.get('error', 'not run')} | | | | | | |")
            continue
        speedup = r["positions_per_second_no_sharing"] / r["positions_per_second"]  # same work, other time
        tflops = r.get("model_tflops_per_second_no_sharing", r["model_tflops_per_second"] * speedup)
        mfu = r.get("mfu_no_sharing", r["mfu"] and r["mfu"] * speedup)
        lines.append(f"| {label} | {r['load_seconds']:.1f} | {r['positions_per_second_no_sharing']:,.0f} | "
                     f"{r['scored_tokens_per_second'] * speedup:,.0f} | {tflops:.1f} | "
                     f"{_f(mfu and 100 * mfu, '.1f')}% | {r['positions_per_second']:,.0f} | "
                     f"{_f(r.get('peak_allocated_gib'))} |")
    lines += [
        "",
        f"**Training step**, the original report's setup ({s['quantization']}; LoRA {s['lora']}; max length "
        f"{s['max_length']}; batch {s['batch_size']}; gradient checkpointing; {s['optimizer']}), median of steps "
        f"2-{s['steps']}:",
        "",
        "| trainer | step s | peak alloc GiB | peak reserved GiB | device used GiB | fits 12 GiB | step-0 loss |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for label, r in (("logitstore train (reference from the store)", ours),
                     ("TRL DPOTrainer + peft (reference = adapter off)", trl)):
        if "error" in r or not r:
            lines.append(f"| {label} | failed: {r.get('error', 'not run')} | | | | | |")
            continue
        fits = "yes" if r.get("device_used_at_end_gib", 99) <= 12 and r.get("peak_reserved_gib", 99) <= 12 else "no"
        lines.append(f"| {label} | {r['step_seconds']:.3f} | {_f(r.get('peak_allocated_gib'))} | "
                     f"{_f(r.get('peak_reserved_gib'))} | {_f(r.get('device_used_at_end_gib'))} | {fits} | "
                     f"{r['loss_first']:.4f} |")
    if "error" not in ours and "error" not in trl and ours and trl:
        lines += ["", f"logitstore's step takes {ours['step_seconds'] / trl['step_seconds']:.2f}x TRL's time at "
                      f"{ours['peak_allocated_gib'] / trl['peak_allocated_gib']:.2f}x its peak allocated memory."]
    b_ours = results.get("breakdown_logitstore", {}).get("breakdown", {})
    b_trl = results.get("breakdown_trl", {}).get("breakdown", {})
    if b_ours.get("pieces") and b_trl.get("pieces"):
        names = sorted(set(b_ours["pieces"]) | set(b_trl["pieces"]))
        lines += ["", "**Where the peak goes** (`torch.cuda.memory._record_memory_history` over two steps; the "
                      "allocations live at the largest instant of the trace, by the Python frames they were made "
                      "under; GiB):", "", "| piece | logitstore | TRL + peft |", "|---|---:|---:|",
                  f"| held before the steps (weights, adapter) | {b_ours['before_recording_bytes'] / GIB:.2f} | "
                  f"{b_trl['before_recording_bytes'] / GIB:.2f} |"]
        lines += [f"| {n} | {b_ours['pieces'].get(n, 0) / GIB:.2f} | {b_trl['pieces'].get(n, 0) / GIB:.2f} |"
                  for n in names]
    if ref4 and "error" not in ref4 and "sharing_max_abs_delta" in ref4:
        delta, mean = ref4["sharing_max_abs_delta"], ref4["mean_abs_sequence_logp"]
        lines += ["", f"Precision noise floor: scoring the same 4-bit pairs with prompt sharing (KV cache) and in one pass "
                      f"gives sums up to {delta:.2f} nats apart (bf16: {ref16.get('sharing_max_abs_delta', 0):.2f}), "
                      f"on sequence sums averaging {mean:,.0f} nats ({delta / mean:.1e} relative; random weights make "
                      "every token cost about ln 32000). That is the bf16 floor between any two batchings; the "
                      f"step-0 loss of {ours.get('loss_first', float('nan')):.4f} against ln 2 = 0.6931 lies within it "
                      "(beta 0.1 turns a few nats of margin into a few hundredths of loss). TRL reaches ln 2 exactly "
                      "because it scores the reference on the same batch with the same kernels in every step. In "
                      "float32 the step-0 loss is ln 2 within 1e-5 (tests/test_train.py)."]
    if "build_seconds" in ref4:
        lines += ["", f"The 4-bit store of the {s['pairs']} pairs was built end to end by `build` in "
                      f"{ref4['build_seconds']:.1f} s (model load included)."]
    lines.append(END)
    return "\n".join(lines) + "\n"


SWEEP_BEGIN, SWEEP_END = "<!-- gpu-sweep:begin -->", "<!-- gpu-sweep:end -->"


def render_sweep(results: dict) -> str:
    sw = results["sweep"]
    lines = [SWEEP_BEGIN, f"**Length headroom** on one {results['device']} held to {sw['cap_gib']} GiB "
             "(`torch.cuda.set_per_process_memory_fraction`; a 12 GB card less its CUDA context), the training "
             f"step's setup above at batch {sw['batch_size']}, {sw['steps']} steps per length, every sequence at the "
             "limit; `python benchmarks/gpu.py --max-length-sweep`. Lengths rise until one does not fit.", "",
             "| max length | logitstore: peak alloc GiB | TRL + peft: peak alloc GiB |", "|---:|---:|---:|"]

    def cell(r: dict | None) -> str:
        if r is None:
            return "not run"
        if r.get("fits"):
            return f"{_f(r.get('peak_allocated_gib'))}"
        return "out of memory" if "memory" in r.get("error", "").lower() else f"failed: {r.get('error', '?')[:60]}"

    for length in sw["lengths"]:
        lines.append(f"| {length:,} | {cell(sw['logitstore'].get(str(length)))} | {cell(sw['trl'].get(str(length)))} |")
    ours, trl = sw.get("longest_logitstore"), sw.get("longest_trl")
    ratio = f" ({ours / trl:.1f}x)" if ours and trl else ""
    lines += ["", f"Longest that fits: logitstore {ours or 'none'}, TRL {trl or 'none'}{ratio}.", SWEEP_END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few pairs and steps; runs on CPU")
    parser.add_argument("--max-length-sweep", action="store_true",
                        help="find the longest max length whose step fits in 12 GiB, ours and TRL's")
    parser.add_argument("--work", type=Path, help="folder for the model, data and stores (default: a temp dir)")
    parser.add_argument("--tokenizer", help="folder holding Mistral's tokenizer.model (default: mistral-common's)")
    parser.add_argument("--json", type=Path, help="write the measurements here as they come in")
    parser.add_argument("--render", type=Path, metavar="RESULTS", help="write a GPU run's RESULTS into the docs")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--stage", nargs=2, metavar=("NAME", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(STAGES[args.stage[0]](json.loads(args.stage[1]))))
        return 0
    if args.render:
        results = json.loads(args.render.read_text())
        if results.get("smoke"):
            raise SystemExit("benchmarks/gpu.py: a --smoke run is not a measurement; render a GPU run")
        if "sweep" in results:
            write_section(args.doc, render_sweep(results), SWEEP_BEGIN, SWEEP_END)
        else:
            write_section(args.doc, render(results), BEGIN, END)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="logitstore-gpu-"))
    if args.max_length_sweep:
        results = sweep(args.smoke, work, args.tokenizer, args.json)
        print(render_sweep(results) if not args.smoke else json.dumps(results, indent=1))
        return 0 if "error" not in results.get("make_model", {}) else 1
    results = run(args.smoke, work, args.tokenizer, args.json)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    print(render(results) if not args.smoke else json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
