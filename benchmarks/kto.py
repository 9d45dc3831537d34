"""Unpaired (KTO) build and training time against TRL 1.16's KTOTrainer, with and without its precompute.

    python benchmarks/kto.py [--examples 200] [--steps 8] [--out benchmarks/results/kto-cpu.json]
    python benchmarks/kto.py --render benchmarks/results/kto-cpu.json   # its section of docs/benchmarks.md

Same model (workloads.py's "small" Mistral-architecture model, real 32k vocabulary), data and machine for every
workload, each in its own process (peak memory is that process's maximum RSS). The data is hh-rlhf pairs unpaired
as TRL unpairs them (each pair gives its chosen completion labelled true and its rejected one labelled false); the
bundled medical pairs stand in when hh-rlhf is not in /work/shared/data.

Workloads: `logitstore build` of the unpaired store (KL batch size 8) against KTOTrainer's
`precompute_ref_log_probs` pass (per-device batch 8); then training steps of LoRA KTO at batch 8: `logitstore
train --loss kto` from the store, KTOTrainer with precomputed reference values (the step then runs the policy
only), and KTOTrainer without (every step also runs the reference, the adapter disabled, on the completions and the
KL completions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from report import write_section  # noqa: E402

BATCH = 8


def unpaired_rows(pairs: int, model: str, max_length: int) -> list[dict]:
    from corpus import raw_pairs
    from workloads import valid_rows

    from logitstore.dpo.inputs.tokenization import extract_prompt

    _, rows = raw_pairs(pairs)
    rows = valid_rows(rows, model, max_length)
    out = []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        out.append({"id": f"e{2 * i}", "prompt": prompt, "completion": chosen, "label": True})
        out.append({"id": f"e{2 * i + 1}", "prompt": prompt, "completion": rejected, "label": False})
    return out


# ---- workloads, each run in a child process ---------------------------------------------------------------------

def build(args: dict) -> dict:
    import resource

    from logitstore.dpo.reference import BuildConfig, build as run

    t = time.perf_counter()
    result = run(BuildConfig(model=args["model"], data=args["data"], out=args["out"], max_length=args["max_length"],
                             batch_size=BATCH, kl_batch_size=BATCH), progress=False, log=lambda _: None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "examples": result.examples, "tokens_scored": result.tokens}


def _kto_config(args: dict, precompute: bool):
    from trl import KTOConfig

    return KTOConfig(output_dir=args["out"], precompute_ref_log_probs=precompute, max_length=args["max_length"],
                     per_device_train_batch_size=BATCH, max_steps=args.get("steps", 1), learning_rate=1e-4,
                     bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                     gradient_checkpointing=False, dataset_num_proc=None)


def _rows(args: dict) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "completion", "label")}
            for r in map(json.loads, Path(args["data"]).read_text().splitlines())]


def trl_precompute(args: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import KTOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    trainer = KTOTrainer(model=model, args=_kto_config(args, True), processing_class=load_tokenizer(args["model"]),
                         train_dataset=datasets.Dataset.from_list(_rows(args)))
    assert "ref_KL_logps" in trainer.train_dataset.column_names
    return {"seconds": time.perf_counter() - t}


def train(args: dict) -> dict:
    from logitstore.dpo.training import TrainConfig, train as run

    result = run(TrainConfig(model=args["model"], store=args["store"], out=args["out"], max_steps=args["steps"],
                             batch_size=BATCH, loss="kto", log_every=1, lr=1e-4, plot=False, lora_r=16,
                             lora_alpha=32), progress=False, log=lambda s: None)
    steps = result["history"][1:]  # the first step pays for warm-up
    return {"step_seconds": statistics.median(h["step_seconds"] for h in steps),
            "loss_first": result["history"][0]["loss"]}


def trl_train(args: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import KTOTrainer
    from workloads import step_timer

    from logitstore.dpo.model.loading import load_tokenizer

    times: list[float] = []

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    trainer = KTOTrainer(model=model, args=_kto_config(args, args["precompute"]),
                         processing_class=load_tokenizer(args["model"]),
                         train_dataset=datasets.Dataset.from_list(_rows(args)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
                         callbacks=[step_timer(times)])
    setup = time.perf_counter() - t
    trainer.train()
    return {"step_seconds": statistics.median(times[1:]), "setup_seconds": setup,
            "loss_first": trainer.state.log_history[0]["loss"]}


WORKLOADS = {"build": build, "trl-precompute": trl_precompute, "train": train, "trl-train": trl_train}


def run_child(kind: str, args: dict) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, __file__, "child", kind, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=3000)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


BEGIN, END = "<!-- kto:begin -->", "<!-- kto:end -->"


def render(r: dict) -> str:
    def gib(x: int) -> str:
        return f"{x / 2**30:.2f}"

    ours_build, trl_build = r["logitstore build"], r["TRL KTOTrainer precompute_ref_log_probs"]
    ours, pre, live = (r["logitstore train --loss kto"], r["TRL KTOTrainer + peft, precomputed reference"],
                       r["TRL KTOTrainer + peft, reference each step"])
    rounds = r.get("rounds", 1)
    ratios_pre = [a / b for a, b in zip(ours.get("step_seconds_per_round", [ours["step_seconds"]]),
                                        pre.get("step_seconds_per_round", [pre["step_seconds"]]))]
    ratios_live = [a / b for a, b in zip(ours.get("step_seconds_per_round", [ours["step_seconds"]]),
                                         live.get("step_seconds_per_round", [live["step_seconds"]]))]
    lines = [
        BEGIN,
        "## Unpaired preferences: KTO against TRL's KTOTrainer",
        "",
        f"Measured by `python benchmarks/kto.py` on the CPU machine above ({r['threads']} math threads per process, "
        "while other jobs shared its 2 cores: wall times are noisy, so compare the rows of one run, not runs). "
        f"{r['examples']} unpaired examples (the first hh-rlhf harmless-base test pairs, each giving its chosen "
        "completion labelled true and its rejected one labelled false), workloads.py's small Mistral-architecture "
        f"model (real 32k vocabulary), max length {r['max_length']}, KL batch and per-device batch {r['batch']}; each "
        "workload in its own process (peak memory is its maximum RSS).",
        "",
        "**Reference pass** (completions and KL completions, model load included):",
        "",
        "| pass | wall s | peak RSS GiB |",
        "|---|---:|---:|",
        f"| logitstore build (store written and fingerprinted; CPU {ours_build['cpu_seconds']:.1f} s) | "
        f"{ours_build['seconds']:.1f} | {gib(ours_build['peak_rss_bytes'])} |",
        f"| TRL KTOTrainer `precompute_ref_log_probs` (trainer set-up) | {trl_build['seconds']:.1f} | "
        f"{gib(trl_build['peak_rss_bytes'])} |",
        "",
        f"**Training step**, LoRA r=16 on every linear layer, KTO, batch {r['batch']}, median of steps 2-{r['steps']}; "
        f"{rounds} round{'s' if rounds > 1 else ''} of the three trainers back to back, medians over rounds:",
        "",
        "| trainer | step s | step-0 loss | peak RSS GiB |",
        "|---|---:|---:|---:|",
        f"| logitstore train --loss kto (reference from the store) | {ours['step_seconds']:.2f} | "
        f"{ours['loss_first']:.4f} | {gib(ours['peak_rss_bytes'])} |",
        f"| TRL KTOTrainer + peft, precomputed reference ({pre['setup_seconds']:.0f} s of set-up and precompute "
        f"first, again in every run) | {pre['step_seconds']:.2f} | {pre['loss_first']:.4f} | "
        f"{gib(pre['peak_rss_bytes'])} |",
        f"| TRL KTOTrainer + peft, reference each step (adapter off) | {live['step_seconds']:.2f} | "
        f"{live['loss_first']:.4f} | {gib(live['peak_rss_bytes'])} |",
        "",
        f"Per round, logitstore's step took {', '.join(f'{x:.2f}' for x in ratios_pre)}x the time of TRL's with its "
        f"precompute and {', '.join(f'{x:.2f}' for x in ratios_live)}x that of TRL's computing the reference in "
        "every step. TRL keeps its precomputed values in a `datasets` cache file keyed on the dataset's "
        "fingerprint, a hash of the whole model (computed at every start) and whether KL is used; for a dataset "
        "built in memory, as here, that file lives in a temporary folder, so every run pays the precompute again. "
        "The store is built once and read by every run, `StoreKTOTrainer` included.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="unpaired examples (two per pair)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three trainers, interleaved (the "
                        "machine is shared: each round runs them back to back, and the report takes medians)")
    parser.add_argument("--out", default=str(HERE / "results" / "kto-cpu.json"))
    parser.add_argument("--render", type=Path, help="write this results file's section into docs/benchmarks.md")
    opts = parser.parse_args()
    if opts.render:
        write_section(HERE.parent / "docs" / "benchmarks.md", render(json.loads(opts.render.read_text())),
                      BEGIN, END)
        return
    from workloads import make_model

    folder = Path(tempfile.mkdtemp(prefix="kto-bench-"))
    model = str(folder / "model")
    make_model(model)
    rows = unpaired_rows(opts.examples // 2, model, opts.max_length)
    data = folder / "thumbs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"model": model, "data": str(data), "max_length": opts.max_length}
    results: dict = {"examples": len(rows), "max_length": opts.max_length, "batch": BATCH, "steps": opts.steps,
                     "threads": os.environ.get("OMP_NUM_THREADS", "2")}
    results["logitstore build"] = run_child("build", {**common, "out": str(folder / "store")})
    results["TRL KTOTrainer precompute_ref_log_probs"] = run_child("trl-precompute", {**common, "out": str(folder / "p")})
    trainers = {
        "logitstore train --loss kto": ("train", {"store": str(folder / "store"), "out": str(folder / "run")}),
        "TRL KTOTrainer + peft, precomputed reference": ("trl-train", {"out": str(folder / "t1"), "precompute": True}),
        "TRL KTOTrainer + peft, reference each step": ("trl-train", {"out": str(folder / "t2"), "precompute": False}),
    }
    rounds: dict[str, list[dict]] = {name: [] for name in trainers}
    for _ in range(opts.repeat):
        for name, (kind, extra) in trainers.items():
            rounds[name].append(run_child(kind, {**common, **extra, "steps": opts.steps}))
    for name, runs in rounds.items():
        results[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        results[name]["step_seconds_per_round"] = [r["step_seconds"] for r in runs]
    results["rounds"] = opts.repeat
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        measured = WORKLOADS[sys.argv[2]](json.loads(sys.argv[3]))
        from workloads import peak_rss_bytes

        measured["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(measured))
    else:
        main()
