"""End to end: a tiny store with top-k teacher records, read through the loader by `logitstore train --loss distill`
and `--loss sigmoid,distill`; the step-0 distillation loss equals the direct computation from the model.

The store's DPO part comes from `build` (the reference pass); its teacher records are those of a second tiny
model (another seed and a sharpened LM head: a teacher the policy is not), written with the store writer as a build with --top-k writes them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess


import numpy as np
import pytest
import torch

import logitstore
from logitstore import teacher as T
from logitstore import teacher_store as TS
from logitstore.dpo.reference import BuildConfig, build
from logitstore.dpo.training import TrainConfig, train
from cli_process import run_cli
from ports import free_port
from ranks import torchrun
from sample_data import implicit_rows, write_jsonl

pytestmark = pytest.mark.slow

K = 16
PAIRS = 8


def scored_logits(model, prompt: np.ndarray, completion: np.ndarray) -> torch.Tensor:
    """The model's logits [T, V] at the positions that predict the completion's tokens."""
    ids = torch.from_numpy(np.concatenate([prompt, completion]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = max(len(prompt), 1)
    return logits[start - 1:len(ids[0]) - 1]


@pytest.fixture(scope="module")
def topk_store(byte_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.demo import make_tiny_model

    folder = tmp_path_factory.mktemp("e2e")
    build(BuildConfig(model=str(byte_model), data=str(write_jsonl(folder / "d.jsonl", implicit_rows(PAIRS))),
                      out=str(folder / "plain"), max_length=128), progress=False)
    plain = logitstore.open(folder / "plain")
    teacher = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(folder / "teacher", seed=1))).eval()
    teacher.lm_head.weight.data *= 20  # a peaked teacher (a random tiny model's next-token distribution is flat)
    vocab = teacher.config.vocab_size
    rows = np.arange(len(plain))
    data = {**plain.row_values(rows), **{f: plain.ragged(f, rows) for f in plain.kind.token_fields}}
    data = {k: v for k, v in data.items() if k in plain.kind.row_fields or k in plain.kind.token_fields}
    for side in ("chosen", "rejected"):
        data[f"teacher/{side}"] = [T.top_k(scored_logits(teacher, p, c).numpy(), K)
                                   for p, c in zip(data["prompt_ids"], data[f"{side}_ids"])]
    h = plain.header
    writer = logitstore.create(folder / "topk", [plain.id_of(int(r)) for r in rows], fingerprint=plain.fingerprint,
                               vocab_size=vocab, max_length=h["max_length"], tokenizer=plain.tokenizer,
                               rows_per_shard=PAIRS, teacher=TS.entry("top_k", K, vocab, codec="standard"))
    writer.write_shard(0, data)
    writer.finalize()
    return folder / "topk"


def run(model, store, out, **kw):
    return train(TrainConfig(model=str(model), store=str(store), out=str(out), plot=False, dtype="float32",
                             batch_size=PAIRS // 2, max_steps=2, **kw), progress=False, log=lambda s: None)


def direct_distill(model_path, store_path, rows, beta: float) -> float:
    """Per-token mean over every scored completion token of `rows`, both sides: the divergence between the model's
    logits and the store's decoded top-k records (K buckets plus the tail, renormalized), position by position."""
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.objectives.distill import top_k_divergence

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    store = logitstore.open(store_path)
    values = []
    for side in ("chosen", "rejected"):
        records = store.top_k(side, rows)
        for i, row in enumerate(rows):
            logits = scored_logits(model, store.ragged("prompt_ids", [row])[0], store.ragged(f"{side}_ids", [row])[0])
            lp, tail = torch.from_numpy(records["logps"][i]), torch.from_numpy(records["tail_logp"][i])
            norm = torch.logsumexp(torch.cat([lp, tail[:, None]], dim=1), dim=1)  # a quantized record's sum
            values.append(top_k_divergence(logits, torch.from_numpy(records["ids"][i]).long(), lp - norm[:, None],
                                           tail - norm, beta))
    return float(torch.cat(values).mean())


def first_batch_rows(store_path, batch_size: int) -> list[int]:
    from logitstore.loader import PairBatchSampler

    sampler = PairBatchSampler(len(logitstore.open(store_path)), batch_size, seed=0)
    sampler.set_epoch(0)
    return next(iter(sampler))


def test_distill_trains_from_the_store_and_its_step_zero_loss_is_the_direct_one(byte_model, topk_store, tmp_path):
    result = run(byte_model, topk_store, tmp_path / "d", loss="distill", distill_beta=0.5)
    first, second = result["history"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["distill/loss"]) for r in (first, second))
    # a fresh LoRA adapter leaves the model as it was: step 0 scores the base model
    want = direct_distill(byte_model, topk_store, first_batch_rows(topk_store, PAIRS // 2), 0.5)
    assert abs(first["loss"] - first["distill/loss"]) < 1e-7  # the only term
    assert abs(first["loss"] - want) < 1e-5 * max(1.0, want), (first["loss"], want)
    assert first["loss"] > 0.05  # the teacher is another model


def test_sigmoid_plus_distill_adds_half_the_distill_loss_to_ln2(byte_model, topk_store, tmp_path):
    result = run(byte_model, topk_store, tmp_path / "sd", loss="sigmoid,distill", loss_weights=[1.0, 0.5])
    first, second = result["history"]
    assert all(math.isfinite(r["loss"]) for r in (first, second))
    want = direct_distill(byte_model, topk_store, first_batch_rows(topk_store, PAIRS // 2), 1.0)  # TRL's default
    assert abs(first["distill/loss"] - want) < 1e-5 * max(1.0, want)
    assert abs(first["loss"] - (math.log(2) + 0.5 * first["distill/loss"])) < 1e-5
    records = [json.loads(x) for x in (tmp_path / "sd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("distill/loss" in r for r in records)


def test_tdpo2_trains_from_the_store(byte_model, topk_store, tmp_path):
    result = run(byte_model, topk_store, tmp_path / "t", loss="tdpo2", eval_store=str(topk_store))
    first = result["history"][0]
    assert all(math.isfinite(r["loss"]) for r in result["history"])
    # the reference is the policy at step 0: margins are 0, and the store's KL terms are the teacher's to it
    assert first["tdpo/seq_kl_chosen"] > 0 and first["tdpo/seq_kl_rejected"] > 0
    assert math.isfinite(result["eval"]["eval/loss"]) and "eval/tdpo_seq_kl_chosen" in result["eval"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_train_distill_as_one_process(byte_model, topk_store, tmp_path, mode):
    """DDP (LoRA) and FSDP2 (every weight): each step's loss and distill term equal one process's at the same global
    batch, the distillation mean taken over both ranks' tokens as TRL does."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def args(out):
        return ["train", "--model", str(byte_model), "--store", str(topk_store), "--out", str(out), "--loss",
                "sigmoid,distill", "--loss-weights", "1,0.5", "--distill-beta", "0.5", "--batch-size", "2",
                "--grad-accum", "2", "--max-steps", "2", "--log-every", "1", "--quiet",
                *(["--no-lora"] if mode == "full" else [])]

    one = run_cli(*args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(torchrun(*args(tmp_path / "two"), port=free_port()), env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two"))
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["distill/loss"] == pytest.approx(y["distill/loss"], abs=1e-5)


# ---- stores made by `logitstore build --top-k / --sample-k` (the reference is the teacher) ----------------------

def cli(args: list[str], capsys) -> tuple[int, str, str]:
    from logitstore.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = done.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def built_stores(byte_model, tmp_path_factory):
    from click.testing import CliRunner

    from logitstore.cli.main import cli as group

    folder = tmp_path_factory.mktemp("built")
    data = write_jsonl(folder / "d.jsonl", implicit_rows(PAIRS))
    common = ["build", "--model", str(byte_model), "--data", str(data), "--max-length", "128", "--quiet"]
    for name, extra in (("topk", ["--top-k", "8"]), ("sampled", ["--sample-k", "12", "--seed", "3"])):
        result = CliRunner().invoke(group, [*common, "--out", str(folder / name), *extra])
        assert result.exit_code == 0, result.output
    return folder / "topk", folder / "sampled"


def test_cli_trains_distill_and_sigmoid_distill_from_a_built_top_k_store(byte_model, built_stores, tmp_path, capsys):
    topk, _ = built_stores
    common = ["train", "--model", str(byte_model), "--store", str(topk), "--max-steps", "2", "--batch-size",
              str(PAIRS // 2), "--log-every", "1", "--quiet"]
    code, out, err = cli([*common, "--out", str(tmp_path / "d"), "--loss", "distill", "--distill-beta", "0"], capsys)
    assert code == 0, err
    assert out.startswith("Trained 2 steps; last logged loss ")
    first, second = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    # the store's teacher is the model itself: at step 0 the loss is what the codec's rounding leaves
    want = direct_distill(byte_model, topk, first_batch_rows(topk, PAIRS // 2), 0.0)
    assert abs(first["distill/loss"] - want) < 1e-6 and 0 <= want < 1e-3
    code, _, err = cli([*common, "--out", str(tmp_path / "sd"), "--loss", "sigmoid,distill", "--loss-weights",
                        "1,0.5"], capsys)
    assert code == 0, err
    first = json.loads((tmp_path / "sd" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - (math.log(2) + 0.5 * first["distill/loss"])) < 1e-5


def test_cli_trains_sampled_distill_and_refuses_what_samples_cannot_give(byte_model, built_stores, tmp_path, capsys):
    _, sampled = built_stores
    common = ["train", "--model", str(byte_model), "--store", str(sampled), "--max-steps", "2", "--batch-size",
              str(PAIRS // 2), "--quiet"]
    code, out, err = cli([*common, "--out", str(tmp_path / "s"), "--loss", "distill"], capsys)  # beta 0 by default
    assert code == 0, err
    assert all(math.isfinite(json.loads(x)["distill/loss"])
               for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines())
    code, _, err = cli([*common, "--out", str(tmp_path / "b"), "--loss", "distill", "--distill-beta", "0.5"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"Error: {sampled} holds sampled teacher records, which estimate only the forward KL; pass --distill-beta 0 "
        "(got 0.5)"]
    code, _, err = cli([*common, "--out", str(tmp_path / "t"), "--loss", "tdpo1"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"Error: tdpo1 needs the reference's top-k distribution and {sampled} holds sampled teacher records (an "
        "estimate of the forward KL's gradient, not of its value); rebuild with --top-k K"]
    assert not (tmp_path / "b").exists() and not (tmp_path / "t").exists()


def test_a_teacher_vocabulary_above_the_models_is_one_line(mistral_model, byte_model, tmp_path, capsys):
    from click.testing import CliRunner

    from logitstore.cli.main import cli as group

    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    result = CliRunner().invoke(group, ["build", "--model", str(mistral_model), "--data", str(data), "--out",
                                        str(tmp_path / "s"), "--max-length", "64", "--top-k", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    code, _, err = cli(["train", "--model", str(byte_model), "--store", str(tmp_path / "s"), "--out",
                        str(tmp_path / "r"), "--loss", "distill", "--allow-fingerprint-mismatch", "--batch-size", "2",
                        "--quiet"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"Error: {tmp_path / 's'} holds a teacher of 32000 tokens, more than the model's vocabulary of 384; the "
        "store was built for another tokenizer"]
