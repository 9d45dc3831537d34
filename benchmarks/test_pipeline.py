"""Build speed against TRL's precompute, and training-step time against TRL's DPOTrainer + peft: same model,
data and machine, each workload in its own process (peak memory is that process's maximum RSS)."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from workloads import input_tokens, make_model_in_child, run_child, valid_rows

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow  # builds and training steps in subprocesses: run with --full


@pytest.fixture(scope="module")
def setting(quick, workload_processes, tmp_path_factory):
    from corpus import raw_pairs

    folder = tmp_path_factory.mktemp("pipeline")
    model, deep = folder / "model", folder / "deep-model"
    make_model_in_child(model)
    make_model_in_child(deep, "small" if quick else "deep")
    # Run once (quick), 128 tokens: every workload and its process still runs, at a quarter of the positions
    # of 512; 14 of the first 20 hh-rlhf pairs fit, 3 loader batches of 4.
    max_length = 128 if quick else 1024
    _, rows = raw_pairs(20 if quick else 200)
    rows = valid_rows(rows, str(model), max_length)
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", **r}) + "\n" for i, r in enumerate(rows)))
    return {"folder": folder, "model": str(model), "deep": str(deep), "data": str(data), "max_length": max_length,
            "pairs": len(rows),
            "tokens": input_tokens(rows, str(model), max_length)}


BUILDS = {
    "TRL precompute_ref_log_probs": ("trl-precompute", {}),
    "logitstore build": ("build", {"share_prompt": True, "bucketing": True}),
    "logitstore build, no prompt sharing": ("build", {"share_prompt": False, "bucketing": True}),
    "logitstore build, no length bucketing": ("build", {"share_prompt": True, "bucketing": False}),
    "logitstore build, neither": ("build", {"share_prompt": False, "bucketing": False}),
    "deeper model: logitstore build": ("build", {"share_prompt": True, "bucketing": True, "model": "deep"}),
    "deeper model: no prompt sharing": ("build", {"share_prompt": False, "bucketing": True, "model": "deep"}),
}


@pytest.mark.parametrize("variant", list(BUILDS))
def test_build_speed(benchmark, setting, variant):
    kind, extra = BUILDS[variant]
    result: dict = {}
    out = setting["folder"] / f"build-{list(BUILDS).index(variant)}"

    def run():
        args = {"data": setting["data"], "max_length": setting["max_length"], "batch_size": 8, "out": str(out),
                **extra, "model": setting[extra.get("model", "model")]}
        result.update(run_child(kind, args))

    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(group="build", pairs=setting["pairs"], tokens=setting["tokens"],
                                tokens_per_second=setting["tokens"] / result["seconds"], **result)


@pytest.fixture(scope="module")
def one_sided(setting):
    """The setting's prompts and chosen completions twice over: as a completion store's data (prompt, completion)
    and as pairs whose two sides are that same completion, so both builds see the same prompts and completions."""
    from logitstore.dpo.inputs.tokenization import extract_prompt

    completion, pairs = setting["folder"] / "completions.jsonl", setting["folder"] / "same-completion-pairs.jsonl"
    rows = [json.loads(line) for line in Path(setting["data"]).read_text().splitlines()]
    with open(completion, "w") as c, open(pairs, "w") as p:
        for row in rows:
            prompt, chosen, _ = extract_prompt(row["chosen"], row["rejected"])
            c.write(json.dumps({"id": row["id"], "prompt": prompt, "completion": chosen}) + "\n")
            p.write(json.dumps({"id": row["id"], "prompt": prompt, "chosen": chosen, "rejected": chosen}) + "\n")
    return {"completion": str(completion), "pairs": str(pairs)}


@pytest.mark.parametrize("data", ["pairs", "completion"])
def test_completion_store_scores_each_completion_once(benchmark, setting, one_sided, data):
    """A completion store's build against a pairs build of the same prompts and completions, on the model whose
    layers dominate: the completion store scores each completion once, so it costs about half (its CPU seconds'
    ratio is the figure; wall time depends on the machine's load)."""
    result: dict = {}
    out = setting["folder"] / f"one-sided-{data}.lstore"

    def run():
        result.update(run_child("build", {"data": one_sided[data], "model": setting["deep"], "out": str(out),
                                          "max_length": setting["max_length"], "batch_size": 8,
                                          "share_prompt": False, "bucketing": True}))

    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(group="one-sided build", data=data, pairs=setting["pairs"], **result)


@pytest.fixture(scope="module")
def train_store(setting):
    out = setting["folder"] / "train.lstore"
    run_child("build", {"model": setting["model"], "data": setting["data"], "max_length": setting["max_length"],
                        "batch_size": 8, "out": str(out), "share_prompt": True, "bucketing": True})
    return str(out)


TRAINERS = ["TRL DPOTrainer + peft (reference = adapter off)", "TRL, its default gradient checkpointing",
            "logitstore train"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_train_step(benchmark, setting, train_store, quick, trainer):
    steps = 2 if quick else 12
    result: dict = {}

    def run():
        common = {"model": setting["model"], "max_length": setting["max_length"], "batch_size": 4, "steps": steps,
                  "out": str(setting["folder"] / f"run-{TRAINERS.index(trainer)}")}
        if trainer == "logitstore train":
            result.update(run_child("train", {**common, "store": train_store}))
        else:
            result.update(run_child("trl-train", {**common, "data": setting["data"],
                                                  "gradient_checkpointing": "checkpointing" in trainer}))

    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update({**result, "group": "train-step", "steps": steps, "batch_size": 4})
    assert abs(result["loss_first"] - np.log(2)) < 1e-4  # both start with policy == reference


def test_loader_against_unpickling_full_logits(benchmark, setting, train_store, quick):
    """What the original pipeline read per batch (a pickle of float32 logits) against one batch from the store."""
    from logitstore.loader import make_loader

    loader, _ = make_loader(train_store, 4, seed=0)
    batches = iter(loader)
    next(batches)
    t = time.perf_counter()
    n = 0
    for _ in range(2 if quick else 20):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        n += 1
    ours = (time.perf_counter() - t) / n
    width = batch["input_ids"].shape[1]
    vocab = 32000
    logits = np.random.default_rng(0).standard_normal((batch["input_ids"].shape[0], width, vocab), dtype=np.float32)
    path = setting["folder"] / "logits.pkl"
    with open(path, "wb") as f:
        pickle.dump({"logits": logits}, f, protocol=pickle.HIGHEST_PROTOCOL)
    del logits

    def unpickle():
        with open(path, "rb") as f:
            pickle.load(f)  # noqa: S301 - the baseline being measured

    benchmark.pedantic(unpickle, rounds=1 if quick else 5, warmup_rounds=1)
    benchmark.extra_info.update(group="loader", loader_seconds_per_batch=ours, pickle_bytes=path.stat().st_size,
                                batch_width=width)
    path.unlink()
