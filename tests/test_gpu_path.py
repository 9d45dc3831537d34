"""The training options a GPU user needs, run on the CPU where they can: gradient checkpointing, bfloat16 autocast,
paged 8-bit AdamW, pinned batches, full fine-tuning without LoRA, and --quiet."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import logitstore
from logitstore.dpo.reference import BuildConfig, build
from logitstore.dpo.kinds.pairs import KIND as PAIRS
from logitstore.dpo.objectives.objective import objective_of
from logitstore.dpo.training import TrainConfig, train
from logitstore.dpo.training.policy import setup_policy
from logitstore.loader import make_loader

from cli_process import run_cli
from sample_data import write_jsonl

# Measured on this CPU (2-layer 64-wide and 4-layer 256-wide Mistral, 128 medical pairs each, reference built and
# policy run in bfloat16): the largest step-0 |loss - ln 2| of a single pair was 1.4e-3 (docs/api.md).
BF16_FLOOR = 2e-3


@pytest.fixture(scope="module")
def medical(byte_model, tmp_path_factory):
    from logitstore.dpo.demo import DATA

    folder = tmp_path_factory.mktemp("gpu_path")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:48]
    data = write_jsonl(folder / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(folder / "s"), max_length=256), progress=False)
    return folder / "s"


def run(model, store, out, **kw):
    kw.setdefault("plot", False)
    return train(TrainConfig(model=str(model), store=str(store), out=str(out), **kw), progress=False, log=lambda s: None)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(byte_model, medical):
    batch = next(iter(make_loader(str(medical), 8, shuffle=False)[0]))
    results = []
    for checkpointing in (False, True):
        cfg = TrainConfig(model=str(byte_model), store=str(medical), out="unused", lora_dropout=0.1,
                          disable_dropout=False,
                          gradient_checkpointing=checkpointing, dtype="float32")
        torch.manual_seed(0)
        model = setup_policy(cfg)
        model.train()
        assert model.base_model.model.is_gradient_checkpointing is checkpointing
        # A non-zero LoRA B so that the adapter's gradients depend on the recomputed activations.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        torch.manual_seed(1)  # the same dropout masks, which checkpointing replays when it recomputes
        loss, _ = PAIRS.task(cfg, objective_of(cfg)).step(model, batch, torch.device("cpu"))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert checkpointed == plain
    assert plain_grads.keys() == checkpointed_grads.keys() and len(plain_grads) == 28
    for name, grad in plain_grads.items():
        assert torch.count_nonzero(grad) > 0
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_trains_the_same_run(byte_model, medical, tmp_path):
    common = dict(max_steps=4, batch_size=8, lr=2e-3, log_every=1)
    plain = run(byte_model, medical, tmp_path / "a", **common)["history"]
    checkpointed = run(byte_model, medical, tmp_path / "b", gradient_checkpointing=True, **common)["history"]
    assert [h["loss"] for h in checkpointed] == pytest.approx([h["loss"] for h in plain], abs=1e-6)
    assert plain[-1]["loss"] != plain[0]["loss"]


def test_bfloat16_starts_at_ln2_within_the_noise_floor_and_learns(byte_model, tmp_path):
    from logitstore.dpo.demo import DATA

    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:32]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(tmp_path / "s"), max_length=256,
                      dtype="bfloat16"), progress=False)
    assert logitstore.open(tmp_path / "s").fingerprint["precision"] == {"dtype": "bfloat16", "quantize": None}
    history = run(byte_model, tmp_path / "s", tmp_path / "run", max_steps=8, batch_size=4, lr=5e-3, log_every=1,
                  dtype="bfloat16")["history"]
    assert abs(history[0]["loss"] - math.log(2)) < BF16_FLOOR
    assert np.mean([h["loss"] for h in history[-3:]]) < history[0]["loss"] - 0.01


def test_the_precision_context_autocasts_in_the_model_dtype():
    from logitstore.dpo.model.loading import precision

    weight = torch.randn(4, 4)
    with precision(torch.device("cpu"), "bfloat16"):
        assert (weight @ weight).dtype == torch.bfloat16
    with precision(torch.device("cpu"), "float32"):
        assert (weight @ weight).dtype == torch.float32


def test_paged_adamw_8bit_runs_on_cpu_with_8bit_state(byte_model, medical, tmp_path):
    """bitsandbytes 0.50 runs it on a CPU, unpaged (paging is a CUDA feature), with uint8 moments."""
    pytest.importorskip("bitsandbytes")
    from logitstore.dpo.training.policy import make_optimizer

    cfg = TrainConfig(model=str(byte_model), store=str(medical), out="unused", optimizer="paged_adamw_8bit", lr=1e-2)
    big = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = make_optimizer(cfg, [big])
    before = big.detach().clone()
    (big ** 2).sum().backward()
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert float(torch.max(torch.abs(big.detach() - before))) == pytest.approx(1e-2, rel=0.05)  # Adam's first step
    history = run(byte_model, medical, tmp_path / "run", max_steps=6, batch_size=8, lr=5e-3, log_every=1,
                  optimizer="paged_adamw_8bit")["history"]
    assert abs(history[0]["loss"] - math.log(2)) < 1e-5
    assert history[-1]["loss"] < history[0]["loss"]


def test_batches_are_pinned_only_for_a_gpu(byte_model, medical, tmp_path, monkeypatch):
    import logitstore.loader

    assert make_loader(str(medical), 4, pin_memory=True)[0].pin_memory is True
    assert make_loader(str(medical), 4, pin_memory=False)[0].pin_memory is False
    seen = []
    real = logitstore.loader.make_loader
    monkeypatch.setattr(logitstore.loader, "make_loader", lambda *a, **k: seen.append(k["pin_memory"]) or real(*a, **k))
    run(byte_model, medical, tmp_path / "run", max_steps=1, batch_size=4, eval_store=str(medical))
    assert seen == [False, False]  # training and evaluation loaders, on this CPU


# ---- full fine-tuning -----------------------------------------------------------------------------------------

def test_no_lora_trains_every_weight_from_ln2_and_saves_a_model_folder(byte_model, medical, tmp_path):
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.model.loading import load_tokenizer

    result = run(byte_model, medical, tmp_path / "run", max_steps=8, batch_size=8, lr=1e-3, log_every=1, lora=False)
    losses = [h["loss"] for h in result["history"]]
    assert abs(losses[0] - math.log(2)) < 1e-5
    assert np.mean(losses[-3:]) < losses[0] - 0.01
    saved = tmp_path / "run" / "model"
    assert result["weights"] == str(saved) and not (tmp_path / "run" / "adapter").exists()
    trained = AutoModelForCausalLM.from_pretrained(str(saved))
    original = AutoModelForCausalLM.from_pretrained(str(byte_model))
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert len(changed) == sum(1 for _ in original.parameters())  # every weight moved, norms and embeddings too
    assert load_tokenizer(saved)("abc").input_ids == load_tokenizer(byte_model)("abc").input_ids


def test_no_lora_resumes_exactly(byte_model, medical, tmp_path):
    import shutil

    common = dict(max_steps=4, batch_size=8, lr=1e-3, log_every=1, lora=False)
    whole = run(byte_model, medical, tmp_path / "whole", **common)["history"]
    run(byte_model, medical, tmp_path / "cut", save_every=2, **common)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    shutil.rmtree(tmp_path / "cut" / "model")
    resumed = run(byte_model, medical, tmp_path / "cut", resume=True, **common)["history"]
    assert [h["step"] for h in resumed] == [3, 4]  # optimizer steps done
    for a, b in zip(resumed, whole[2:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_no_lora_with_an_adapter_starts_from_the_merged_reference(byte_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(byte_model))
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(str(tmp_path / "sft"))
    rows = [{"prompt": f"Q{i}: 2+2?", "chosen": " 4", "rejected": " 5"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), adapter=str(tmp_path / "sft"), data=str(data), out=str(tmp_path / "s"),
                      max_length=64), progress=False)
    history = run(byte_model, tmp_path / "s", tmp_path / "run", adapter=str(tmp_path / "sft"), lora=False,
                  max_steps=2, batch_size=4, log_every=1)["history"]
    assert abs(history[0]["loss"] - math.log(2)) < 1e-5
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logitstore.cli.main", *args], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})


def test_no_lora_with_4bit_is_refused_before_anything_is_written(byte_model, medical, tmp_path):
    out = run_cli("train", "--model", str(byte_model), "--store", str(medical), "--out", str(tmp_path / "run"),
                  "--no-lora", "--quantize", "4bit")
    assert (out.returncode, out.stderr) == (1, "Error: --no-lora trains every weight, and 4-bit weights cannot be "
                                               "trained; drop --quantize 4bit, or train a LoRA adapter on the 4-bit "
                                               "model\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_quiet_prints_only_the_final_line(byte_model, medical, tmp_path):
    """Without --quiet this prints transformers' weight-loading bar, a FutureWarning and bitsandbytes' CPU notice."""
    out = _cli("train", "--model", str(byte_model), "--store", str(medical), "--out", str(tmp_path / "run"),
               "--max-steps", "2", "--batch-size", "4", "--optimizer", "paged_adamw_8bit", "--gradient-checkpointing",
               "--quiet")
    assert out.returncode == 0 and out.stderr == ""
    last = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
    line, = out.stdout.splitlines()
    head, rest = line.split(" Peak memory ")
    peak, tail = rest.split(". ", 1)
    assert head == f"Trained 2 steps; last logged loss {last['loss']:.4f}."
    assert tail == (f"Adapter in {tmp_path / 'run' / 'adapter'}, metrics in {tmp_path / 'run' / 'metrics.jsonl'} "
                    f"(plot: {tmp_path / 'run' / 'metrics.png'}).")
    # The run's peak (CPU: the process's peak RSS, so saving and plotting after the last step count too).
    assert re.fullmatch(r"\d+\.\d\d GiB \(CPU, peak RSS\)", peak)
    assert last["peak_memory_kind"] == "CPU, peak RSS" and float(peak.split()[0]) >= round(last["peak_memory_gib"], 2)
    loud = _cli("train", "--model", str(byte_model), "--store", str(medical), "--out", str(tmp_path / "loud"),
                "--max-steps", "2", "--batch-size", "4", "--optimizer", "paged_adamw_8bit")
    assert loud.returncode == 0 and "Loading weights" in loud.stderr and "Warning" in loud.stderr
    built = _cli("build", "--model", str(byte_model), "--data", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "s"), "--quiet")
    assert built.returncode == 1 and built.stdout == "" and built.stderr.count("\n") == 1
