"""Scale-out on existing engines: torchrun (gloo, 2 CPU processes) for build and training (slow: run with
--full)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import logitstore

from cli_process import run_cli
from ports import free_port
from ranks import torchrun
from sample_data import implicit_rows, write_jsonl

ENV = {"SOURCE_DATE_EPOCH": "1700000000", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("scale") / "d.jsonl", implicit_rows(40))


def build_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["build", "--model", str(model), "--data", str(data), "--out", str(out), "--max-length", "64",
            "--rows-per-shard", "4", "--batch-size", "4", "--quiet"]


@pytest.mark.slow  # torchrun: run with --full
def test_two_rank_build_equals_one_process_and_resumes(mistral_model, data, tmp_path):
    env = {**os.environ, **ENV}
    one = run_cli(*build_args(mistral_model, data, tmp_path / "one"), env=ENV)
    assert one.returncode == 0, one.stderr
    # Fresh ranks, as a user's torchrun starts them (the launches after it fork theirs: tests/ranks.py).
    two = subprocess.run(torchrun(*build_args(mistral_model, data, tmp_path / "two"), port=free_port(),
                                  preloaded=False), env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    # Each shard is batched the same way whichever rank writes it, so the stores are byte-identical.
    assert digest(tmp_path / "two") == digest(tmp_path / "one")

    # The rank that owns shard 2 (shards go to ranks by the model work in them) dies right after committing it;
    # torchrun then stops the other rank wherever it is.
    cut = subprocess.run(torchrun(*build_args(mistral_model, data, tmp_path / "cut"), port=free_port()),
                         env={**env, "LOGITSTORE_FAULT": "after-commit:2"}, capture_output=True, text=True,
                         timeout=600)
    assert cut.returncode != 0 and "Signal 9 (SIGKILL)" in cut.stderr, cut.stderr[-2000:]
    committed = logitstore.open(tmp_path / "cut").committed
    assert committed[2] and not committed.all()
    again = subprocess.run(torchrun(*build_args(mistral_model, data, tmp_path / "cut"), port=free_port()), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert digest(tmp_path / "cut") == digest(tmp_path / "one")


def train_args(model: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--store", str(store), "--out", str(out), "--batch-size", "4",
            "--lr", "1e-2", "--lora-dropout", "0", "--log-every", "1", "--quiet", *extra]


def history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(mistral_model, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    done = run_cli(*build_args(mistral_model, data, out), env=ENV)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def eval_store(mistral_model, tmp_path_factory) -> Path:
    """18 pairs: 5 evaluation batches of 4, so one of 2 ranks evaluates 3 and the other 2 (and one pass only to
    pair FSDP2's collectives)."""
    from logitstore.dpo.reference import BuildConfig, build

    folder = tmp_path_factory.mktemp("eval")
    data = write_jsonl(folder / "e.jsonl", implicit_rows(60)[40:58])
    build(BuildConfig(model=str(mistral_model), data=str(data), out=str(folder / "s"), max_length=64,
                      rows_per_shard=4, batch_size=4), progress=False)
    return folder / "s"


def evaluated_alone(model: Path, eval_store: Path, **cfg) -> dict[str, float]:
    """The evaluation of one process (this one) of the weights a distributed run saved."""
    import torch

    import logitstore
    from logitstore.dpo import kinds
    from logitstore.dpo.objectives.objective import objective_of
    from logitstore.dpo.training import TrainConfig
    from logitstore.dpo.training.evaluate import evaluate
    from logitstore.dpo.training.policy import setup_policy

    config = TrainConfig(model=str(model), store=str(eval_store), out="unused", batch_size=4, dtype="float32", device="cpu", **cfg)
    store = logitstore.open(eval_store)
    kind = kinds.of_store(store)
    task = kind.task(config, kind.accept(store, objective_of(config), config, 1, evaluation=True))
    return evaluate(setup_policy(config), str(eval_store), task, torch.device("cpu"))


@pytest.fixture(scope="module")
def store_4bit(mistral_model, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store4") / "s"
    done = run_cli(*build_args(mistral_model, data, out), "--quantize", "4bit", env=ENV)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow  # torchrun: run with --full
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_two_rank_training_equals_one_process_with_the_same_global_batch(mistral_model, store, store_4bit, eval_store,
                                                                         tmp_path, mode):
    """LoRA and QLoRA under DDP, every weight under FSDP2: each step's loss equals one process's at the same
    global batch. The ranks split the evaluation's batches and add up their sums: the result equals one process's
    evaluation of the same weights."""
    env = {**os.environ, **ENV}
    # Gradient accumulation too: DDP all-reduces once per step, FSDP2 reduce-scatters every micro-batch.
    extra = ["--max-steps", "3"] + {"lora": ["--grad-accum", "2"], "qlora": ["--quantize", "4bit"],
                                    "full": ["--no-lora", "--grad-accum", "2"]}[mode]
    store = store_4bit if mode == "qlora" else store
    one = run_cli(*train_args(mistral_model, store, tmp_path / "one", *extra), env=ENV)
    assert one.returncode == 0, one.stderr
    evaluating = [] if mode == "qlora" else ["--eval-store", str(eval_store), "--eval-every", "3"]
    two = subprocess.run(torchrun(*train_args(mistral_model, store, tmp_path / "two", *extra, *evaluating),
                                  port=free_port()), env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    # Rank 0 reports; rank 1 prints nothing. No rank warns that DDP's broadcast_buffers is deprecated.
    assert two.stdout.count("Trained 3 steps") == 1, two.stdout
    assert "broadcast_buffers" not in two.stderr, two.stderr[-2000:]
    a, b = history(tmp_path / "one"), history(tmp_path / "two")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-4)
    assert a[-1]["loss"] < a[0]["loss"]
    if evaluating:  # step 3's evaluation is of the weights saved at the end
        split = {k: v for k, v in b[-1].items() if k.startswith("eval/")}
        alone = evaluated_alone(tmp_path / "two" / "model", eval_store, lora=False) if mode == "full" else \
            evaluated_alone(mistral_model, eval_store, adapter=str(tmp_path / "two" / "adapter"))
        assert sorted(split) == sorted(alone) and len(alone) == 7
        for k, v in alone.items():
            assert split[k] == pytest.approx(v, abs=1e-5), k
        assert abs(split["eval/rewards_margins"]) > 1e-3  # trained: not the reference's zeros
    if mode == "full":
        # The sharded run's model is one from_pretrained folder with the same weights as the one-process run's.
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        whole = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
        gathered = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
        assert sorted(gathered) == sorted(whole)
        for name, w in whole.items():
            assert gathered[name].dtype == w.dtype
            assert (gathered[name] - w).abs().max() < 1e-4, name
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "model"))
        assert (model.get_input_embeddings().weight - whole["model.embed_tokens.weight"]).abs().max() < 1e-4
        assert (tmp_path / "two" / "model" / "tokenizer.model").is_file()
        assert (tmp_path / "two" / "model" / "generation_config.json").read_text() == \
            (mistral_model / "generation_config.json").read_text()


def test_evaluation_batches_are_shared_round_robin_with_as_many_passes_on_every_rank():
    from logitstore.dpo.distributed.group import eval_share

    assert eval_share(5, 0, 2) == ([0, 2, 4], 3)
    assert eval_share(5, 1, 2) == ([1, 3], 3)  # and one pass that does not count
    assert eval_share(4, 1, 2) == ([1, 3], 2)
    assert eval_share(1, 1, 2) == ([], 1)
    assert eval_share(7, 2, 3) == ([2, 5], 3)
    assert eval_share(3, 0, 1) == ([0, 1, 2], 3)


@pytest.mark.slow  # torchrun: run with --full
def test_two_rank_kto_evaluation_takes_whole_kl_chunks(byte_model, tmp_path):
    """KTO's evaluation goes chunk by chunk, each chunk's KL estimate its own: 2 FSDP2 ranks share the 5 chunks
    (3 and 2) and equal one process's evaluation of the weights they saved."""
    from logitstore.dpo.reference import BuildConfig, build
    from test_unpaired_store import unpaired_rows

    data = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(20))
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(tmp_path / "s"), max_length=160,
                      kl_batch_size=4, rows_per_shard=10), progress=False)
    args = ["train", "--model", str(byte_model), "--store", str(tmp_path / "s"), "--loss", "kto", "--no-lora",
            "--batch-size", "8", "--max-steps", "2", "--lr", "1e-3", "--log-every", "1", "--quiet",
            "--eval-store", str(tmp_path / "s"), "--eval-every", "2", "--out", str(tmp_path / "two")]
    two = subprocess.run(torchrun(*args, port=free_port()), env={**os.environ, **ENV}, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    split = {k: v for k, v in history(tmp_path / "two")[-1].items() if k.startswith("eval/")}
    alone = evaluated_alone(tmp_path / "two" / "model", tmp_path / "s", lora=False, loss="kto")
    assert sorted(split) == sorted(alone) == ["eval/kl", "eval/logps", "eval/loss", "eval/rewards_chosen",
                                              "eval/rewards_rejected"]
    for k, v in alone.items():
        assert split[k] == pytest.approx(v, abs=1e-5), k
    assert split["eval/kl"] > 0


@pytest.mark.slow  # torchrun: run with --full
def test_two_rank_sharded_checkpoint_resumes_exactly(mistral_model, store, tmp_path):
    """A 2-rank FSDP2 run saves sharded checkpoints (safetensors through torch.distributed.checkpoint); resumed
    from the one at step 2, it computes the uninterrupted run's losses."""
    env = {**os.environ, **ENV}
    args = train_args(mistral_model, store, tmp_path / "run", "--no-lora", "--max-steps", "4", "--save-every", "2")
    whole = subprocess.run(torchrun(*args, port=free_port()), env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["rng-1.safetensors", "rng.safetensors", "sharded",
                                                           "trainer_state.json"]
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    uninterrupted = history(tmp_path / "run")
    # Forget everything after the checkpoint, as if the run had died there.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    shutil.rmtree(tmp_path / "run" / "model")
    again = subprocess.run(torchrun(*args, "--resume", port=free_port()), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resumed from" in again.stdout and again.stdout.count("Resumed from") == 1
    resumed = history(tmp_path / "run")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    for x, y in zip(resumed[2:], uninterrupted[2:]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    # One process cannot resume a sharded checkpoint: one line, exit 1.
    alone = run_cli(*args, "--resume", env=ENV)
    assert alone.returncode == 1
    assert alone.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'run' / 'checkpoint-2'} was written by a sharded run of 2 processes; resume it the "
        "same way (torchrun with as many processes, --lora or --no-lora as before)"]


def one_line_and_root_cause(stderr: str, line: str) -> bool:
    """Rank 0 prints the line once; torchrun's report shows it as the root cause. Whether the other rank's copy
    shows too depends on whether it exited before the agent stopped it, so that count is not pinned."""
    return stderr.splitlines().count(line) == 1 and f"traceback : {line}" in stderr


def only_torchrun_tracebacks(stderr: str) -> bool:
    """torchrun reports a failed worker with its own traceback; ours print none."""
    frames = [x for x in stderr.splitlines() if x.strip().startswith('File "')]
    return all("torch/distributed" in f or "runpy" in f for f in frames)


@pytest.mark.slow  # torchrun: run with --full
def test_two_rank_bad_launches_are_one_line_on_every_rank(mistral_model, store, data, tmp_path):
    env = {**os.environ, **ENV}
    odd = subprocess.run(torchrun(*train_args(mistral_model, store, tmp_path / "odd", "--batch-size", "3",
                                              "--max-steps", "1"), port=free_port(), preloaded=False),
                         env=env, capture_output=True, text=True, timeout=600)
    assert odd.returncode != 0
    line = ("Error: --batch-size 3 is the global batch and must be a multiple of the 2 processes (each takes an "
            "equal part); pass a multiple of 2")
    assert one_line_and_root_cause(odd.stderr, line) and only_torchrun_tracebacks(odd.stderr), odd.stderr[-2000:]
    assert not (tmp_path / "odd").exists()
    # Rank 1 trains from another store (another build of the same model): both ranks refuse.
    other = tmp_path / "other"
    rows = [json.loads(x) for x in data.read_text().splitlines()][:8]
    write_jsonl(tmp_path / "d8.jsonl", rows)
    assert run_cli(*build_args(mistral_model, tmp_path / "d8.jsonl", other), env=ENV).returncode == 0
    per_rank = ("import os, sys; from logitstore.cli.main import main; "
                f"main(sys.argv[1:] + ['--store', {str(store)!r} if os.environ['RANK'] == '0' else {str(other)!r}])")
    mixed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), "--no-python", sys.executable, "-c", per_rank,
                            *[a for a in train_args(mistral_model, store, tmp_path / "mixed", "--max-steps", "1")
                              if a not in ("--store", str(store))]],
                           env=env, capture_output=True, text=True, timeout=600)
    assert mixed.returncode != 0
    line = ("Error: the processes of this run do not see the same store: rank 1's differs from rank 0's; every "
            "rank must train from the same files")
    assert one_line_and_root_cause(mixed.stderr, line) and only_torchrun_tracebacks(mixed.stderr), mixed.stderr[-2000:]
    assert not (tmp_path / "mixed").exists()


PEAK_RSS = """import os, resource, sys
from logitstore.cli.main import main
try:
    main(sys.argv[1:])
finally:
    with open(os.environ["PEAK_RSS_OUT"], "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n")
"""


@pytest.mark.slow  # torchrun: run with --full
def test_two_rank_full_fine_tuning_holds_half_the_state_per_rank(mistral_model, data, tmp_path):
    """On a model whose weights, gradients and Adam state dominate the process (4 layers x 768, the 32,000-token
    vocabulary: 86.9M float32 parameters, 1.39 GB of state in one process), each FSDP2 rank's peak RSS is at most
    0.70x one process's. Measured with getrusage in each process, one run after the other."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    model = tmp_path / "model"
    shutil.copytree(mistral_model, model)
    small = json.loads((mistral_model / "config.json").read_text())
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=small["vocab_size"], hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=12,
                           max_position_embeddings=2048, tie_word_embeddings=False,
                           pad_token_id=small["pad_token_id"], eos_token_id=small["eos_token_id"])
    big = MistralForCausalLM(config)
    assert sum(p.numel() for p in big.parameters()) == 86_907_648
    big.save_pretrained(str(model))
    del big
    env = {**os.environ, **ENV}
    rows = [json.loads(x) for x in data.read_text().splitlines()][:16]
    write_jsonl(tmp_path / "d.jsonl", rows)
    built = run_cli(*build_args(model, tmp_path / "d.jsonl", tmp_path / "s"), env=ENV)
    assert built.returncode == 0, built.stderr
    script = tmp_path / "peak_rss.py"
    script.write_text(PEAK_RSS)
    args = ["train", "--model", str(model), "--store", str(tmp_path / "s"), "--no-lora", "--max-steps", "2",
            "--batch-size", "4", "--lr", "1e-4", "--quiet"]
    one = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "one")],
                         env={**env, "PEAK_RSS_OUT": str(tmp_path / "one.txt")}, capture_output=True, text=True,
                         timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), *args, "--out", str(tmp_path / "two")],
                         env={**env, "PEAK_RSS_OUT": str(tmp_path / "two.txt")}, capture_output=True, text=True,
                         timeout=900)
    assert two.returncode == 0, two.stderr[-2000:]
    alone = int((tmp_path / "one.txt").read_text().split()[1])
    ranks = dict(line.split() for line in (tmp_path / "two.txt").read_text().splitlines())
    assert sorted(ranks) == ["0", "1"]
    ratios = [int(kib) / alone for kib in ranks.values()]
    print(f"peak RSS: one process {alone / 1024:.0f} MiB; ranks "
          + ", ".join(f"{int(k) / 1024:.0f} MiB ({r:.2f}x)" for k, r in zip(ranks.values(), ratios)))
    # Measured 0.61-0.62x (six runs on a shared 2-core machine; 0.75-0.77x before gloo's reduce-scatter clone, the
    # heap left resident during backward and the unused peft/bitsandbytes imports were dealt with: docs/scaling.md).
    assert max(ratios) <= 0.70


@pytest.mark.slow
@pytest.mark.parametrize("records", [["--sample-k", "4", "--seed", "3"], ["--top-k", "8"]])
def test_two_rank_teacher_build_equals_one_process(byte_model, data, tmp_path, records):
    """Sampled records are drawn from (seed, row, side) and a shard's prior is its rows' tail mass summed in integer
    units: the rank that computes a shard changes no byte."""
    env = {**os.environ, **ENV}
    args = [*records, "--per-token", "--max-length", "256"]  # byte-level: longer
    one = run_cli(*build_args(byte_model, data, tmp_path / "one"), *args, env=ENV)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun(*build_args(byte_model, data, tmp_path / "two"), *args, port=free_port()), env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert digest(tmp_path / "two") == digest(tmp_path / "one")
    assert logitstore.open(tmp_path / "two").teacher["kind"] == ("sampled" if "--sample-k" in records else "top_k")
