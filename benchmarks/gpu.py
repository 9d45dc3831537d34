"""Everything logitstore measures on a GPU, in one script: a model with Mistral-7B-v0.1's exact architecture (random
weights, nothing downloaded) in the seed's setting, logitstore train against TRL's DPOTrainer + peft (which computes
the reference with the adapter switched off), the longest max length each trains within 12 GiB, and the reference
pass's throughput.

    python benchmarks/gpu.py --all                # on one GPU: everything below, in priority order, within --budget
    python benchmarks/gpu.py                      # (1) and (3): the seed's step and peak, the reference pass's MFU
    python benchmarks/gpu.py --max-length-sweep   # (2) alone: the 12 GiB length sweep
    python benchmarks/gpu.py --all --smoke        # anywhere: the same stages on a tiny model on CPU (the tests run it)
    python benchmarks/gpu.py --render RESULTS     # write RESULTS (from a GPU run) into docs/benchmarks.md

--all runs, in this order, until its --budget (default 480 s, model set-up included) runs out:
  (1) the seed's step and peak at max length 1,024, batch 2: logitstore train, TRL's default, TRL at its most frugal
      (precompute_ref_log_probs, gradient checkpointing, activation_offloading), logitstore with its memory options;
  (2) the 12 GiB length sweep at batch 1: each side's longest max length that trains within a 12 GiB cap, by binary
      search (logitstore up to 32,768 with its memory options, TRL at its most frugal up to 16,384), probes of the
      two sides taking turns; a fifth of the time left when it starts is kept for (3);
  (3) the reference pass's throughput and MFU, 4-bit and bf16;
  then, on a GPU with time left, where each trainer's peak goes (torch.cuda.memory's allocation history).

The seed's setting: NF4 4-bit (double quantisation, bf16 compute), LoRA r=16 on every linear layer, gradient
checkpointing, paged 8-bit AdamW; synthetic pairs long enough that every sequence reaches the length limit, so peak
memory is the worst case a run of that setting meets. Each stage runs in its own process (its peak GPU memory is its
own) with a timeout of the budget left; a stage that cannot start in what is left is recorded as "skipped: budget",
one stopped by it as "stopped: budget", one out of memory as "out of memory". The results go to one JSON file,
rewritten after every stage (under --out DIR: $OUT if set, else benchmarks/results/), with the docs/benchmarks.md
table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import children  # noqa: E402
from report import write_section  # noqa: E402

from gpu_render import (BEGIN, END, SWEEP_BEGIN, SWEEP_END, render, render_all,  # noqa: E402,F401
                        render_sweep, targets)
from gpu_stages import GIB, MISTRAL_7B_V01, STAGES, TINY, trl_options  # noqa: E402,F401

# logitstore train's options that trade step time for memory, passed to "ours" in the length sweep and in the
# seed's "+ memory options" run; an option `logitstore train --help` does not list is left out (and recorded).
OURS_MEMORY_OPTIONS = ["--split-sequences", "--mlp-chunk", "2048", "--offload-activations"]
OURS_GPU_ONLY_OPTIONS = ("--offload-activations",)  # pinned CPU memory behind a GPU: nothing to offload from on CPU
DEFAULT_BUDGET = {False: 480.0, True: 3600.0}  # seconds (GPU run, --smoke: a CPU's stages take longer)
STAGE_FLOOR = {False: 20.0, True: 1.0}  # seconds: no stage starts with less left (GPU run, --smoke)
SWEEP_CAP_GIB = 12
SWEEP_BATCH, SWEEP_STEPS = 1, 2
# Each side's candidate max lengths: multiples of the step up to the top (GPU run, --smoke).
SWEEP_RANGE = {False: {"logitstore": (2048, 32768), "trl": (512, 16384)},
               True: {"logitstore": (64, 64), "trl": (64, 64)}}  # --smoke: one probe a side (bisect: its own tests)
ENV_TIMEOUT = 300.0
LATER_SHARE = 0.2  # of the time left when the sweep starts, kept for the stages after it
PRELOAD = (*children.WORKLOAD_MODULES, "bitsandbytes")  # what a smoke run's stages import
MODES = {"all": ("seed", "sweep", "mfu", "breakdown"), "seed": ("seed", "mfu", "breakdown"), "sweep": ("sweep",)}


def synthetic_pairs(n: int, words_prompt: int, words_completion: int, seed: int = 0) -> list[dict]:
    """Pairs of random lowercase words: long enough to reach the length limit, text so that both trainers
    tokenize it themselves."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]

    def text(k: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(k))

    return [{"id": f"pair-{i}", "prompt": text(words_prompt) + "\n", "chosen": text(words_completion),
             "rejected": text(words_completion)} for i in range(n)]


def write_pairs(path: Path, n: int, max_length: int, seed: int = 0) -> Path:
    # ~3.4 tokens a word: every sequence reaches the limit, so the step meets the worst case of that length.
    rows = synthetic_pairs(n, max(4, max_length * 75 // 1024), max(8, max_length * 250 // 1024), seed=seed)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def default_tokenizer(folder: Path) -> str:
    """Mistral's tokenizer.model as mistral-common ships it: nothing downloaded."""
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# Stages as child processes, within the budget


def stage_env() -> dict[str, str]:
    """The environment of every stage's process: nothing reaches the Hub."""
    return {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_stage(name: str, args: dict, timeout: float) -> dict:
    """Run one stage in a process of its own (benchmarks/children.py), its process group killed after `timeout`
    seconds; its result with a status: "ok", "out of memory", "stopped: budget" or "failed" (with the child's last
    lines)."""
    t = time.monotonic()
    try:
        proc = children.run([__file__, "--stage", name, json.dumps(args)], env=stage_env(),
                            timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        return {"status": "stopped: budget", "wall_seconds": time.monotonic() - t}
    out, err = proc.stdout, proc.stderr
    wall = time.monotonic() - t
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-12:]
        last = (tail[-1] if tail else f"exit {proc.returncode}")[:300]
        if "out of memory" in "\n".join(tail).lower():  # a CUDA error that took the process down
            return {"fits": False, "status": "out of memory", "error": last, "log_tail": tail, "wall_seconds": wall}
        return {"status": "failed", "error": last, "log_tail": tail, "wall_seconds": wall}
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": "failed", "error": "no result line", "log_tail": out.strip().splitlines()[-12:],
                "wall_seconds": wall}
    result.setdefault("status", "ok")
    result["wall_seconds"] = wall
    return result


def ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Run:
    """One invocation: its setting, its results and the file they go to, and its stages run within the budget."""

    def __init__(self, smoke: bool, work: Path, budget: Budget, results: dict) -> None:
        self.smoke, self.work, self.budget, self.results = smoke, work, budget, results
        self.cuda = bool(results.get("cuda"))
        self.path: Path | None = None
        self.walls: dict[str, float] = {}  # seconds the last stage of each kind took: what the next one needs
        self.reserve = 0.0  # seconds kept for the phases after the current one
        self.model = work / "mistral-7b-architecture"
        self.dtype = "bfloat16" if self.cuda else "float32"

    def log(self, message: str) -> None:
        print(f"[{self.budget.elapsed():6.1f} s] {message}", flush=True)

    def save(self) -> None:
        """The JSON (replaced whole, so a run stopped at any instant leaves a valid file) and its table."""
        if self.path is None:
            return
        self.results["elapsed_seconds"] = round(self.budget.elapsed(), 1)
        self.results["targets"] = targets(self.results)
        self.results["budget_stop"] = any("budget" in str(v.get("status", v.get("stopped", ""))) for v in
                                          [*self.results.values(), *self.results.get("sweep", {}).values()]
                                          if isinstance(v, dict))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        os.replace(tmp, self.path)
        table = self.path.with_suffix(".md")
        tmp = table.with_name(table.name + ".tmp")
        tmp.write_text(render_all(self.results))
        os.replace(tmp, table)

    def stage(self, key: str | None, name: str, args: dict, kind: str | None = None) -> dict:
        """Run stage `name` if what is left of the budget (less the reserve) covers what the last stage of its kind
        took (at least the floor), else record it as skipped; under `key` in the results when one is given."""
        kind = kind or name
        label = key or f"{kind} {args.get('max_length', '')}".strip()
        left = self.budget.left() - self.reserve
        need = max(STAGE_FLOOR[self.smoke], self.walls.get(kind, 0.0))
        if left < need:
            result = {"status": "skipped: budget", "seconds_left": round(left, 1), "seconds_needed": round(need, 1)}
            self.log(f"{label}: skipped: budget ({left:.0f} s left, {need:.0f} s needed)")
        else:
            self.log(f"{label}: started ({left:.0f} s of the budget left)")
            result = run_stage(name, args, timeout=left)
            if result["status"] in ("ok", "out of memory"):
                self.walls[kind] = result["wall_seconds"]
            self.log(f"{label}: {_summary(result)} ({result['wall_seconds']:.1f} s)")
        if key:
            self.results[key] = result
            self.save()
        return result

    def train_args(self, data: Path, max_length: int, batch_size: int, steps: int) -> dict:
        return {"model": str(self.model), "data": str(data), "max_length": max_length, "batch_size": batch_size,
                "steps": steps, "dtype": self.dtype, "quantize": "4bit", "gradient_checkpointing": True,
                "optimizer": "paged_adamw_8bit" if self.cuda else "adamw", "cuda": self.cuda}

    def make_model(self, tokenizer: str | None) -> bool:
        """The model every stage loads, made once per work folder (its result kept beside it for a rerun)."""
        made = self.work / "make-model.json"
        if made.exists() and (self.model / "config.json").exists():
            self.results["make_model"] = {**json.loads(made.read_text()), "reused": True}
            self.save()
            return True
        tokenizer = tokenizer or default_tokenizer(self.work / "tokenizer")
        r = self.stage("make_model", "make-model", {"tokenizer": tokenizer, "model": str(self.model),
                                                    "smoke": self.smoke})
        if ok(r):
            made.write_text(json.dumps(r))
        return ok(r)


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}{': ' + r['error'] if r['status'] == 'failed' else ''}"
    keys = ("step_seconds", "peak_allocated_gib", "loss_first", "positions_per_second", "mfu", "build_seconds",
            "parameters", "device")
    return "ok, " + ", ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}"
                              for k in keys if r.get(k) is not None)


# ---------------------------------------------------------------------------------------------------------------
# logitstore train's memory options


def option_groups(options: list[str]) -> list[list[str]]:
    """["--a", "--b", "2"] -> [["--a"], ["--b", "2"]]: each flag with its values."""
    groups: list[list[str]] = []
    for token in options:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def usable_options(options: list[str], help_text: str, cuda: bool) -> dict:
    """Which of `options` this `logitstore train` takes (its --help lists the flag) and this device can use."""
    used, missing, device_only = [], [], []
    for group in option_groups(options):
        flag = group[0]
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
            missing.append(flag)
        elif flag in OURS_GPU_ONLY_OPTIONS and not cuda:
            device_only.append(flag)
        else:
            used += group
    return {"wanted": list(options), "used": used, "not_in_cli": missing, "left_out_without_gpu": device_only}


def train_help() -> str:
    done = subprocess.run([sys.executable, "-c", "from logitstore.cli.main import main; main()", "train", "--help"],
                          capture_output=True, text=True, timeout=300)
    return done.stdout


# ---------------------------------------------------------------------------------------------------------------
# The phases, in priority order


def seed_setting(smoke: bool) -> dict:
    max_length, batch, steps, pairs = (128, 2, 3, 8) if smoke else (1024, 2, 12, 64)
    return {"max_length": max_length, "batch_size": batch, "steps": steps, "pairs": pairs,
            "lora": "r=16, alpha=32, dropout 0.05, all linear layers", "gradient_checkpointing": True}


def phase_seed(run: Run) -> None:
    """(1) The seed's step and peak: its store, then ours, TRL's default, TRL at its most frugal, ours with the
    memory options."""
    s = run.results["setup"]
    data, store = run.work / "pairs.jsonl", run.work / "nf4.lstore"
    shutil.rmtree(store, ignore_errors=True)
    built = run.stage("store_seed", "reference", {
        "model": str(run.model), "data": str(data), "max_length": s["max_length"], "parameters": 0, "batch_size": 8,
        "batch_tokens": 16384, "dtype": run.dtype, "quantize": "4bit", "out": str(store), "measure": False,
        "write_store": True}, kind="build")
    train = run.train_args(data, s["max_length"], s["batch_size"], s["steps"])
    ours = {**train, "store": str(store)}
    no_store = {"status": built["status"] if "budget" in built["status"] else f"skipped: no store ({built['status']})"}
    if ok(built):
        run.stage("train_logitstore", "train", {**ours, "out": str(run.work / "run-logitstore"), "options": []})
    else:
        run.results["train_logitstore"] = no_store
    run.stage("train_trl", "trl-train", {**train, "out": str(run.work / "run-trl")})
    run.stage("train_trl_frugal", "trl-train", {**train, "out": str(run.work / "run-trl-frugal"), "frugal": True})
    options = run.results["ours_options"]["used"]
    if not options:
        run.results["train_logitstore_memory"] = {"status": "skipped: no memory option in this CLI"}
    elif ok(built):
        run.stage("train_logitstore_memory", "train", {**ours, "out": str(run.work / "run-logitstore-memory"),
                                                       "options": options})
    else:
        run.results["train_logitstore_memory"] = no_store
    run.save()


def bisect(candidates: list[int]) -> Iterator[int]:
    """Binary search for the longest candidate that fits: yields a length, is sent whether it fit."""
    lo, hi = -1, len(candidates)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (yield candidates[mid]):
            lo = mid
        else:
            hi = mid


def _probe_ours(run: Run, length: int, data: Path) -> dict:
    need = run.walls.get("sweep-build", 0.0) + run.walls.get("sweep-train-logitstore", 0.0)
    left = run.budget.left() - run.reserve
    if left < max(need, STAGE_FLOOR[run.smoke]):  # a store whose training cannot follow is not built
        run.log(f"logitstore at {length}: skipped: budget ({left:.0f} s left, {need:.0f} s needed)")
        return {"status": "skipped: budget", "seconds_left": round(left, 1), "seconds_needed": round(need, 1)}
    store = run.work / f"sweep-{length}.lstore"
    shutil.rmtree(store, ignore_errors=True)
    built = run.stage(None, "reference", {
        "model": str(run.model), "data": str(data), "max_length": length, "parameters": 0, "batch_size": 1,
        "batch_tokens": 2 * length, "dtype": run.dtype, "quantize": "4bit", "out": str(store), "measure": False,
        "write_store": True}, kind="sweep-build")
    if not ok(built):
        return {**built, "status": built["status"] if "budget" in built["status"] else "failed",
                "error": f"build: {built.get('error', built['status'])}"}
    sw = run.results["sweep"]
    r = run.stage(None, "train", {**run.train_args(data, length, SWEEP_BATCH, SWEEP_STEPS), "store": str(store),
                                  "cap_gib": sw["cap_gib"], "out": str(run.work / f"sweep-ours-{length}"),
                                  "options": sw["logitstore"]["options"]}, kind="sweep-train-logitstore")
    shutil.rmtree(store, ignore_errors=True)
    return {**r, "build_wall_seconds": built["wall_seconds"]}


def _probe_trl(run: Run, length: int, data: Path) -> dict:
    return run.stage(None, "trl-train", {**run.train_args(data, length, SWEEP_BATCH, SWEEP_STEPS), "frugal": True,
                                         "cap_gib": run.results["sweep"]["cap_gib"],
                                         "out": str(run.work / f"sweep-trl-{length}")}, kind="sweep-train-trl")


def _record_probe(side: dict, length: int, r: dict) -> None:
    side["probes"][str(length)] = r
    side["order"].append(length)
    fits = [int(k) for k, v in side["probes"].items() if ok(v)]
    fails = [int(k) for k, v in side["probes"].items() if v.get("status") == "out of memory"]
    side["longest_fits"] = max(fits) if fits else None
    side["shortest_fails"] = min(fails) if fails else None
    side["bound"] = ("top of range" if side["longest_fits"] == side["candidates"][-1] else
                     "none fits" if side["shortest_fails"] == side["candidates"][0] else None)


def phase_sweep(run: Run, keep_for_later: bool) -> None:
    """(2) Each side's longest max length that trains at batch 1 within the cap, by binary search, the two sides'
    probes taking turns so that a budget stop leaves both with a bracket."""
    ranges = SWEEP_RANGE[run.smoke]
    sides = {name: {"candidates": list(range(step, top + 1, step)), "probes": {}, "order": [], "complete": False,
                    "stopped": None, "longest_fits": None, "shortest_fails": None, "bound": None}
             for name, (step, top) in ranges.items()}
    sides["logitstore"]["options"] = run.results["ours_options"]["used"]
    sides["trl"]["trl_options"] = trl_options({"gradient_checkpointing": True, "frugal": True,
                                               "batch_size": SWEEP_BATCH, "cuda": run.cuda})
    run.results["sweep"] = {"cap_gib": SWEEP_CAP_GIB if run.cuda else None, "batch_size": SWEEP_BATCH,
                            "steps": SWEEP_STEPS, **sides}
    run.reserve = max(0.0, LATER_SHARE * run.budget.left()) if keep_for_later else 0.0
    probes: dict[str, Callable[[Run, int, Path], dict]] = {"logitstore": _probe_ours, "trl": _probe_trl}
    searches = {name: bisect(side["candidates"]) for name, side in sides.items()}
    pending = {name: next(search) for name, search in searches.items()}
    while pending:
        for name in list(pending):
            length, side = pending[name], sides[name]
            data = run.work / f"sweep-pairs-{length}.jsonl"
            if not data.exists():
                write_pairs(data, SWEEP_BATCH * SWEEP_STEPS, length, seed=length)
            r = probes[name](run, length, data)
            _record_probe(side, length, r)
            if r["status"] in ("ok", "out of memory"):
                try:
                    pending[name] = searches[name].send(r["status"] == "ok")
                except StopIteration:
                    del pending[name]
                    side["complete"] = True
            else:
                del pending[name]
                side["stopped"] = f"{r['status']} at {length}"
            run.save()
    run.reserve = 0.0


def phase_mfu(run: Run) -> None:
    """(3) The reference pass's throughput and MFU over the seed's pairs, 4-bit and bf16."""
    s = run.results["setup"]
    common = {"model": str(run.model), "data": str(run.work / "pairs.jsonl"), "max_length": s["max_length"],
              "parameters": run.results["make_model"].get("parameters", 0), "batch_size": 8, "batch_tokens": 16384,
              "dtype": run.dtype, "measure": True}
    run.stage("reference_4bit", "reference", {**common, "quantize": "4bit", "out": str(run.work / "mfu-4bit")})
    run.stage("reference_bf16", "reference", {**common, "quantize": None, "out": str(run.work / "mfu-bf16")})


def phase_breakdown(run: Run) -> None:
    """Where each trainer's peak goes: two steps each under torch.cuda.memory's allocation history (a GPU only;
    recording slows the step, so these runs are not the timed ones)."""
    if not run.cuda:
        return
    s = run.results["setup"]
    snap = {**run.train_args(run.work / "pairs.jsonl", s["max_length"], s["batch_size"], 2), "snapshot": True}
    if ok(run.results.get("store_seed")):
        run.stage("breakdown_logitstore", "train", {**snap, "store": str(run.work / "nf4.lstore"),
                                                    "out": str(run.work / "snap-logitstore"), "options": []})
    run.stage("breakdown_trl", "trl-train", {**snap, "out": str(run.work / "snap-trl")})


# ---------------------------------------------------------------------------------------------------------------
# The run


def _start(mode: str, smoke: bool, work: Path, budget: Budget, out: Path | None, json_path: Path | None) -> Run:
    """The environment stage, the results' head and the file they go to."""
    env = run_stage("env", {}, timeout=ENV_TIMEOUT)  # outside the budget's checks: every run needs it
    head = {"mode": mode, "smoke": smoke, "budget_seconds": budget.seconds,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - budget.elapsed())),
            "device": env.get("device", "unknown"), "cuda": bool(env.get("cuda")),
            **{k: env.get(k) for k in ("torch", "transformers", "trl", "peft", "bitsandbytes")}, "env": env}
    run = Run(smoke, work, budget, head)
    slug = re.sub(r"[^a-z0-9]+", "-", head["device"].lower()).strip("-")
    run.path = json_path or (out / f"gpu-{mode}-{slug}{'-smoke' if smoke else ''}.json")
    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.log(f"{_summary(env)}; results: {run.path}")
    return run


def run_mode(mode: str, smoke: bool, work: Path, budget: Budget, out: Path | None, json_path: Path | None,
             tokenizer: str | None) -> tuple[Run, int]:
    run = _start(mode, smoke, work, budget, out, json_path)
    env = run.results["env"]
    if env["status"] != "ok" or env.get("bitsandbytes_error"):
        run.save()
        why = env.get("bitsandbytes_error", env.get("error", env["status"]))
        return run, _fail(run, f"the environment stage did not pass: {why}")
    if not smoke and not run.cuda:
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use --smoke to run the stages on a tiny model here")
    s = seed_setting(smoke)
    run.results["setup"] = {**s, "quantization": "NF4, double quantisation, compute " + run.dtype,
                            "optimizer": "paged_adamw_8bit" if run.cuda else "adamw"}
    run.results["ours_options"] = usable_options(OURS_MEMORY_OPTIONS, train_help(), run.cuda)
    if run.results["ours_options"]["not_in_cli"]:
        run.log(f"logitstore train does not take {run.results['ours_options']['not_in_cli']}: left out")
    work.mkdir(parents=True, exist_ok=True)
    write_pairs(work / "pairs.jsonl", s["pairs"], s["max_length"])
    # A CPU smoke run's stages fork from one interpreter that imported the libraries once; the environment stage
    # above ran in a fresh one, as every stage of a GPU run does (CUDA does not survive a fork).
    with children.preloaded(PRELOAD, env=stage_env(), when=smoke and not run.cuda):
        if not run.make_model(tokenizer) and "budget" not in run.results["make_model"]["status"]:
            return run, _fail(run, f"the model was not made: {_summary(run.results['make_model'])}")
        # With the model not made for want of time, every stage below is recorded as skipped: budget.
        for phase in MODES[mode]:
            if phase == "sweep":
                phase_sweep(run, keep_for_later=phase != MODES[mode][-1])
            else:
                {"seed": phase_seed, "mfu": phase_mfu, "breakdown": phase_breakdown}[phase](run)
    failed = [k for k, v in run.results.items() if isinstance(v, dict) and v.get("status") == "failed"]
    run.results["finished"] = True
    run.save()
    return run, 1 if failed else 0


def _fail(run: Run, why: str) -> int:
    run.results["finished"] = False
    run.save()
    print(f"benchmarks/gpu.py: {why}", file=sys.stderr)
    return 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="everything, in priority order, within --budget")
    parser.add_argument("--max-length-sweep", action="store_true",
                        help="only the 12 GiB length sweep: each side's longest max length at batch 1")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few pairs and steps; runs on CPU")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop at this many seconds from the start, keeping what was measured (default 480; "
                             "3600 with --smoke)")
    parser.add_argument("--out", type=Path, help="folder for the results JSON and its table (default: $OUT if set, "
                                                 "else benchmarks/results/)")
    parser.add_argument("--json", type=Path, help="write the results to this file instead")
    parser.add_argument("--work", type=Path, help="folder for the model, data and stores (default: a temp dir)")
    parser.add_argument("--tokenizer", help="folder holding Mistral's tokenizer.model (default: mistral-common's)")
    parser.add_argument("--render", type=Path, metavar="RESULTS", help="write a GPU run's RESULTS into the docs")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--stage", nargs=2, metavar=("NAME", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(STAGES[args.stage[0]](json.loads(args.stage[1]))))
        return 0
    if args.render:
        return render_into_doc(args.render, args.doc)
    if args.all and args.max_length_sweep:
        parser.error("--all already runs the length sweep; give one of --all and --max-length-sweep")
    mode = "all" if args.all else "sweep" if args.max_length_sweep else "seed"
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results")
    work = args.work or Path(tempfile.mkdtemp(prefix="logitstore-gpu-"))
    signal.signal(signal.SIGTERM, _interrupt)
    budget = Budget(args.budget if args.budget is not None else DEFAULT_BUDGET[args.smoke])
    run = None
    try:
        run, code = run_mode(mode, args.smoke, work, budget, out, args.json, args.tokenizer)
    except KeyboardInterrupt:
        print(f"benchmarks/gpu.py: interrupted after {budget.elapsed():.0f} s; what was measured is kept",
              file=sys.stderr)
        return 130
    print(render_all(run.results) if not args.smoke else f"results: {run.path}")
    run.log(f"done: {run.path} and {run.path.with_suffix('.md')}")
    return code


def render_into_doc(results_path: Path, doc: Path) -> int:
    results = json.loads(results_path.read_text())
    if results.get("smoke"):
        raise SystemExit("benchmarks/gpu.py: a --smoke run is not a measurement; render a GPU run")
    if "sweep" in results:
        write_section(doc, render_sweep(results), SWEEP_BEGIN, SWEEP_END)
    if any(k in results for k in ("train_logitstore", "train_trl", "reference_4bit", "reference_bf16")):
        write_section(doc, render(results), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
