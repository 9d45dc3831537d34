"""Workloads the build and training-step benchmarks run in a child process each, so that peak memory (the
child's maximum resident set size) belongs to one workload alone.

    python benchmarks/workloads.py make-model DIR
    python benchmarks/workloads.py build|trl-precompute|train|trl-train ARGS_JSON

Each prints one JSON line of measurements.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import children  # noqa: E402

# Small but not trivial causal LMs: Mistral architecture, the real 32k Mistral vocabulary. In "small" the LM head
# is most of the compute; in "deep" the transformer layers are, as in real models.
MODEL_CONFIGS = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "deep": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                 num_key_value_heads=4),
    # The training-memory comparison's model (issue 17: 12 layers x 512, MLP 1792).
    "memory": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=8,
                   num_key_value_heads=4),
}


def make_model(folder: str, size: str = "small") -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from corpus import mistral_tokenizer

    tokenizer = mistral_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id,
                           eos_token_id=tokenizer.eos_token_id, max_position_embeddings=2048,
                           tie_word_embeddings=False, **MODEL_CONFIGS[size])
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def valid_rows(rows: list[dict], model: str, max_length: int) -> list[dict]:
    """Pairs a build accepts (TRL silently drops the others; a build refuses them)."""
    from logitstore.dpo.inputs.pairs import PreferenceExample
    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.dpo.inputs.tokenization import tokenize_pair
    from logitstore.errors import InputDataError

    tok = load_tokenizer(model)
    keep = []
    for i, row in enumerate(rows):
        try:
            tokenize_pair(tok, PreferenceExample(str(i), row.get("prompt"), row["chosen"], row["rejected"], i + 1),
                          max_length)
        except InputDataError:
            continue
        keep.append(row)
    return keep


def input_tokens(rows: list[dict], model: str, max_length: int) -> int:
    """Tokens a one-pass scorer feeds the model: prompt+chosen and prompt+rejected, after truncation."""
    from logitstore.dpo.inputs.pairs import PreferenceExample
    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.dpo.inputs.tokenization import tokenize_pair

    tok = load_tokenizer(model)
    total = 0
    for i, row in enumerate(rows):
        p = tokenize_pair(tok, PreferenceExample(str(i), row.get("prompt"), row["chosen"], row["rejected"], i + 1),
                          max_length)
        total += 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
    return total


def build(args: dict) -> dict:
    from logitstore.dpo.reference import BuildConfig, build as run

    t = time.perf_counter()
    result = run(BuildConfig(model=args["model"], data=args["data"], out=args["out"], max_length=args["max_length"],
                             batch_size=args["batch_size"], batch_tokens=args.get("batch_tokens", 10**9),
                             share_prompt=args["share_prompt"], length_bucketing=args["bucketing"],
                             reuse=tuple(args.get("reuse", ()))), progress=False, log=lambda _: None)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: what the build cost, whatever else ran at the time
    return {"seconds": time.perf_counter() - t, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "pairs_scored": result.pairs_scored, "reused": result.reused}


def trl_precompute(args: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    t = time.perf_counter()
    rows = [json.loads(line) for line in Path(args["data"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    config = DPOConfig(output_dir=args["out"], precompute_ref_log_probs=True, max_length=args["max_length"],
                       precompute_ref_batch_size=args["batch_size"], per_device_train_batch_size=args["batch_size"],
                       bf16=False, use_cpu=True, report_to=[], dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=config, processing_class=load_tokenizer(args["model"]),
                         train_dataset=datasets.Dataset.from_list(rows))
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    return {"seconds": time.perf_counter() - t}


def train(args: dict) -> dict:
    from logitstore.dpo.training import TrainConfig, train as run

    result = run(TrainConfig(model=args["model"], store=args["store"], out=args["out"], max_steps=args["steps"],
                             batch_size=args["batch_size"], log_every=1, lr=1e-4, plot=False,
                             lora_r=args.get("lora_r", 16), lora_alpha=2 * args.get("lora_r", 16),
                             gradient_checkpointing=args.get("gradient_checkpointing", False),
                             **args.get("train_options", {})),
                    progress=False, log=lambda s: None)
    steps = result["history"][1:]  # the first step pays for warm-up
    return {"step_seconds": statistics.median(h["step_seconds"] for h in steps),
            "steps": len(result["history"]),
            "loader_seconds": statistics.median(h["loader_seconds"] for h in steps),
            "loss_first": result["history"][0]["loss"]}



def step_timer(times: list[float]) -> Any:
    """A transformers TrainerCallback that appends each optimizer step's wall time to `times`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    return Timer()


def trl_frugal(args: dict) -> dict:
    """TRL at its most frugal (issue 26's long-context table): the reference's log-probs computed once before
    training, in batches of the training batch, instead of a reference forward in every step."""
    if not args.get("precompute_ref"):
        return {}
    return {"precompute_ref_log_probs": True, "precompute_ref_batch_size": args["batch_size"]}


def trl_train(args: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    rows = [json.loads(line) for line in Path(args["data"]).read_text().splitlines()]
    times: list[float] = []

    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    config = DPOConfig(output_dir=args["out"], max_length=args["max_length"], per_device_train_batch_size=args["batch_size"],
                       max_steps=args["steps"], learning_rate=1e-4, bf16=False, use_cpu=True, report_to=[],
                       save_strategy="no", logging_steps=1, dataset_num_proc=None, lr_scheduler_type="linear",
                       gradient_checkpointing=args.get("gradient_checkpointing", False), **trl_frugal(args))
    trainer = DPOTrainer(model=model, args=config, processing_class=load_tokenizer(args["model"]),
                         train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=LoraConfig(r=args.get("lora_r", 16), lora_alpha=2 * args.get("lora_r", 16),
                                                lora_dropout=0.05, target_modules="all-linear"),
                         callbacks=[step_timer(times)])
    trainer.train()
    return {"step_seconds": statistics.median(times[1:]), "steps": len(times),
            "loss_first": trainer.state.log_history[0]["loss"]}


def _held(params: list, optimizer: Any, model: Any) -> dict:
    """Bytes that exist before a step, counted from the tensors: frozen weights, adapter, optimizer state."""
    from memprofile import tensor_bytes

    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    return {"weights": tensor_bytes(frozen), "adapter weights": tensor_bytes(params),
            "optimizer state": tensor_bytes([list(s.values()) for s in optimizer.state.values()])}


def profile_train(args: dict) -> dict:
    """`train`'s first step under torch.profiler's memory records (benchmarks/memprofile.py)."""
    import logitstore.dpo.model.scoring as scoring
    import logitstore.dpo.objectives.pair_losses as losses
    import logitstore.dpo.training.loop as trainer
    from logitstore.dpo.kinds.pairs import PairsTask
    from memprofile import labelled, peak_breakdown, profiler, tensor_bytes

    prof, seen = profiler(), {}
    make, forward = trainer.make_optimizer, PairsTask.step

    def make_and_start(cfg, params):
        seen["params"], seen["optimizer"] = params, make(cfg, params)
        prof.start()
        return seen["optimizer"]

    def step(task, model, batch, *a, **k):
        seen["model"], seen["batch"] = model, tensor_bytes(batch)
        return labelled("forward", forward)(task, model, batch, *a, **k)

    trainer.make_optimizer, PairsTask.step = make_and_start, step
    scoring.head_logps = labelled("logits", scoring.head_logps)
    losses.dpo_loss = labelled("loss", losses.dpo_loss)
    trainer.train(trainer.TrainConfig(model=args["model"], store=args["store"], out=args["out"], max_steps=1,
                                      batch_size=args["batch_size"], log_every=1, lr=1e-4, plot=False,
                                      lora_r=args.get("lora_r", 16), lora_alpha=2 * args.get("lora_r", 16),
                                      gradient_checkpointing=args.get("gradient_checkpointing", False),
                                      **args.get("train_options", {})),
                  progress=False, log=lambda s: None)
    prof.stop()
    result = peak_breakdown(prof, vocab=seen["model"].config.vocab_size)
    result["held"] = {**_held(seen["params"], seen["optimizer"], seen["model"]), "batch tensors": seen["batch"]}
    return result


def profile_trl_train(args: dict) -> dict:
    """TRL DPOTrainer + peft's first step under the same records."""
    import datasets
    import torch
    import trl.trainer.dpo_trainer as dpo_trainer
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from logitstore.dpo.model.loading import load_tokenizer
    from memprofile import labelled, labelled_context, peak_breakdown, profiler, tensor_bytes

    prof, seen = profiler(), {}

    class Start(TrainerCallback):
        def on_train_begin(self, *a, model=None, optimizer=None, **k):
            seen["model"], seen["optimizer"] = model, optimizer
            seen["params"] = [p for p in model.parameters() if p.requires_grad]
            prof.start()

    use_adapter = dpo_trainer.use_adapter
    dpo_trainer.use_adapter = lambda *a, **k: labelled_context("reference", use_adapter(*a, **k))
    chunked = ChunkedLogProbFunction.apply
    ChunkedLogProbFunction.apply = staticmethod(labelled("logits", chunked))
    compute_loss = DPOTrainer.compute_loss

    def forward(self, model, inputs, *a, **k):
        seen["batch"] = tensor_bytes(inputs)
        return labelled("forward", compute_loss)(self, model, inputs, *a, **k)

    DPOTrainer.compute_loss = forward
    rows = [json.loads(line) for line in Path(args["data"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    config = DPOConfig(output_dir=args["out"], max_length=args["max_length"], per_device_train_batch_size=args["batch_size"],
                       max_steps=1, learning_rate=1e-4, bf16=False, use_cpu=True, report_to=[],
                       save_strategy="no", logging_steps=1, dataset_num_proc=None, lr_scheduler_type="linear",
                       gradient_checkpointing=args.get("gradient_checkpointing", False),
                       **trl_frugal(args))  # as trl_train runs it
    trainer = DPOTrainer(model=model, args=config, processing_class=load_tokenizer(args["model"]),
                         train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=LoraConfig(r=args.get("lora_r", 16), lora_alpha=2 * args.get("lora_r", 16),
                                                lora_dropout=0.05, target_modules="all-linear"),
                         callbacks=[Start()])
    trainer.train()
    prof.stop()
    result = peak_breakdown(prof, vocab=model.config.vocab_size)
    result["held"] = {**_held(seen["params"], trainer.optimizer, seen["model"]), "batch tensors": seen["batch"]}
    return result


def child_env() -> dict[str, str]:
    """The environment of every workload's process."""
    return {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _in_child(*args: str) -> str:
    """`python workloads.py ARGS` in a process of its own (benchmarks/children.py: a fresh interpreter, or in a
    smoke run a preloaded one's fork); its stdout, or RuntimeError with its stderr's end."""
    done = children.run([__file__, *args], env=child_env(), timeout=3000)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def run_child(kind: str, args: dict) -> dict:
    """Run one workload in a process of its own; return its measurements plus its peak memory."""
    return json.loads(_in_child(kind, json.dumps(args)).strip().splitlines()[-1])


def make_model_in_child(folder: Path | str, size: str = "small") -> None:
    """`make-model` in a process of its own, as `run_child` runs a workload."""
    _in_child("make-model", str(folder), size)


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "make-model":
        make_model(sys.argv[2], *sys.argv[3:])
        sys.exit(0)
    measured = {"build": build, "trl-precompute": trl_precompute, "train": train, "trl-train": trl_train,
                "profile-train": profile_train, "profile-trl-train": profile_trl_train}[kind](
        json.loads(sys.argv[2]))
    measured["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(measured))
