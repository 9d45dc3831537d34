"""`logitstore train --loss distill` on a completion store (prompt/completion data, no pairs): a teacher's
completion store built with --top-k V (the whole vocabulary, exact values), trained for 2 steps; the step-0 loss
equals the direct full-logit divergence between the policy's and the teacher's logits. Other losses are refused in
one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import logitstore
from logitstore.dpo.training import TrainConfig, train

from sample_data import HUMAN_TURNS, write_jsonl

N = 8


def rows(n: int) -> list[dict]:
    return [{"prompt": f"Human: {HUMAN_TURNS[i % len(HUMAN_TURNS)][0]} ({i})\n\nAssistant:",
             "completion": " " + HUMAN_TURNS[i % len(HUMAN_TURNS)][1]} for i in range(n)]


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory):
    """A completion store of a teacher that is not the policy (another seed, a sharpened LM head), K = V."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from logitstore.cli.main import cli
    from logitstore.dpo.demo import make_tiny_model

    folder = tmp_path_factory.mktemp("completion-train")
    teacher_dir = make_tiny_model(folder / "teacher", seed=1)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    teacher.lm_head.weight.data *= 20  # a peaked teacher (a random tiny model's next-token distribution is flat)
    teacher.save_pretrained(str(teacher_dir))
    data = write_jsonl(folder / "d.jsonl", rows(N))
    result = CliRunner().invoke(cli, ["build", "--model", str(teacher_dir), "--data", str(data), "--out",
                                      str(folder / "s"), "--max-length", "128", "--top-k", "384", "--topk-codec",
                                      "exact", "--quiet"])
    assert result.exit_code == 0, result.output
    return teacher_dir, folder / "s"


def run(model, store, out, **kw):
    return train(TrainConfig(model=str(model), store=str(store), out=str(out), plot=False, dtype="float32",
                             batch_size=N // 2, max_steps=2, allow_fingerprint_mismatch=True, **kw),
                 progress=False, log=lambda s: None)


def direct_full_logit_distill(policy_dir, teacher_dir, store_path, rows: list[int], beta: float) -> float:
    """The mean over every scored completion token of `rows` of the divergence between the policy's and the
    teacher's full logits (no stored record involved)."""
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.objectives.distill import full_divergence

    policy, teacher = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
                       for d in (policy_dir, teacher_dir))
    store = logitstore.open(store_path)
    values = []
    for row in rows:
        prompt, completion = (store.ragged(f, [row])[0].astype(np.int64) for f in ("prompt_ids", "completion_ids"))
        ids = torch.from_numpy(np.concatenate([prompt, completion]))[None]
        with torch.no_grad():
            a, b = (m(input_ids=ids).logits[0, len(prompt) - 1:-1].float() for m in (policy, teacher))
        values.append(full_divergence(a, b, beta))
    return float(torch.cat(values).mean())


def first_batch_rows(store_path, batch_size: int) -> list[int]:
    from logitstore.loader import PairBatchSampler

    sampler = PairBatchSampler(len(logitstore.open(store_path)), batch_size, seed=0)
    sampler.set_epoch(0)
    return next(iter(sampler))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])  # forward KL, generalized JSD, reverse KL
def test_distill_on_a_completion_store_starts_at_the_full_logit_loss(byte_model, teacher_store, tmp_path, beta):
    teacher_dir, store = teacher_store
    result = run(byte_model, store, tmp_path / "d", loss="distill", distill_beta=beta)
    first, second = result["history"]
    assert [first["step"], second["step"]] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in (first, second))
    assert first["loss"] == first["distill/loss"]  # the only term
    # a fresh LoRA adapter leaves the policy as it was: step 0 scores the base model against the stored teacher
    want = direct_full_logit_distill(byte_model, teacher_dir, store, first_batch_rows(store, N // 2), beta)
    assert abs(first["loss"] - want) < 1e-5 * max(1.0, want), (first["loss"], want)
    assert want > 0.05  # the teacher is another model


def test_distill_evaluates_on_a_completion_store(byte_model, teacher_store, tmp_path):
    _, store = teacher_store
    result = run(byte_model, store, tmp_path / "e", loss="distill", eval_store=str(store))
    assert math.isfinite(result["eval"]["eval/loss"]) and result["eval"]["eval/loss"] > 0


@pytest.mark.parametrize("loss, message", [
    ("sigmoid", "sigmoid needs a preference-pair store"),
    ("sigmoid,distill", "sigmoid needs a preference-pair store"),
    ("tdpo2", "tdpo2 needs a preference-pair store built with --top-k"),
    ("kto", "kto needs an unpaired store (prompt/completion/label data)"),
    ("sigmoid,sft,tdpo1", "sigmoid, sft need a preference-pair store; tdpo1 needs a preference-pair store built with "
                          "--top-k"),
])
def test_other_losses_are_refused_in_one_line(byte_model, teacher_store, tmp_path, loss, message):
    _, store = teacher_store
    with pytest.raises(logitstore.LogitstoreError) as info:
        run(byte_model, store, tmp_path / "x", loss=loss)
    text = str(info.value)
    assert text.startswith(f"{store} is a completion store (prompt/completion data, no pairs or labels): it trains "
                           f"--loss distill alone; {message}") and text.endswith(message)
    assert not (tmp_path / "x").exists()


def test_distill_on_a_sampled_completion_store_is_the_sparse_logit_sampling_estimator(byte_model, teacher_store,
                                                                                      tmp_path):
    """--sample-k 12: the step-0 loss is the mean KL(empirical || policy) of the stored draws, computed directly."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from logitstore.cli.main import cli
    from logitstore.dpo.objectives.distill import sampled_divergence

    teacher_dir, _ = teacher_store
    data = write_jsonl(tmp_path / "d.jsonl", rows(N))
    result = CliRunner().invoke(cli, ["build", "--model", str(teacher_dir), "--data", str(data), "--out",
                                      str(tmp_path / "s"), "--max-length", "128", "--sample-k", "12", "--quiet"])
    assert result.exit_code == 0, result.output
    first = run(byte_model, tmp_path / "s", tmp_path / "d", loss="distill")["history"][0]  # beta 0 for draws
    store = logitstore.open(tmp_path / "s")
    picked = first_batch_rows(tmp_path / "s", N // 2)
    records = store.top_k("completion", np.array(picked))
    policy = AutoModelForCausalLM.from_pretrained(str(byte_model), dtype=torch.float32).eval()
    values = []
    for i, row in enumerate(picked):
        prompt, completion = (store.ragged(f, [row])[0].astype(np.int64) for f in ("prompt_ids", "completion_ids"))
        with torch.no_grad():
            logits = policy(input_ids=torch.from_numpy(np.concatenate([prompt, completion]))[None]).logits[0]
        assert records["counts"][i].sum(axis=1).tolist() == [12] * len(completion)
        values.append(sampled_divergence(logits[len(prompt) - 1:-1], torch.from_numpy(records["ids"][i]).long(),
                                         torch.from_numpy(records["counts"][i].astype(np.int64))))
    want = float(torch.cat(values).mean())
    assert abs(first["loss"] - want) < 1e-5 * max(1.0, want), (first["loss"], want)
