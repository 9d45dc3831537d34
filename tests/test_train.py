"""Training from a store: step-0 loss ln 2, learning, exact resume, refusal of a foreign store, TRL's formulas."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import logitstore
from dpo.losses import dpo_loss
from dpo.reference import BuildConfig, build
from dpo.train import TrainConfig, train

from sample_data import implicit_rows, write_jsonl


@pytest.fixture(scope="module")
def medical_store(byte_model, tmp_path_factory):
    from dpo.demo import DATA

    folder = tmp_path_factory.mktemp("medical")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:96]
    data = write_jsonl(folder / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(folder / "s"), max_length=256,
                      rows_per_shard=32), progress=False)
    return folder / "s"


def run(model, store, out, **kw):
    kw.setdefault("plot", False)
    return train(TrainConfig(model=str(model), store=str(store), out=str(out), **kw), progress=False, log=lambda s: None)


def test_step_zero_loss_is_ln2_in_float32(mistral_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(16))
    build(BuildConfig(model=str(mistral_model), data=str(data), out=str(tmp_path / "s"), max_length=64),
          progress=False)
    first = run(mistral_model, tmp_path / "s", tmp_path / "run", max_steps=1, batch_size=8)["history"][0]
    assert abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/margins"]) < 1e-5 and abs(first["rewards/chosen"]) < 1e-5


def test_step_zero_loss_is_ln2_with_4bit(byte_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    rows = [{"prompt": f"Question {i}: is the sky blue?", "chosen": " Yes, it is.", "rejected": " No."}
            for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(tmp_path / "s"), max_length=64,
                      quantize="4bit"), progress=False)
    first = run(byte_model, tmp_path / "s", tmp_path / "run", max_steps=1, batch_size=4,
                quantize="4bit")["history"][0]
    assert abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/margins"]) < 1e-5


def test_training_lowers_the_loss_and_raises_accuracy(byte_model, medical_store, tmp_path):
    result = run(byte_model, medical_store, tmp_path / "run", max_steps=24, batch_size=8, lr=2e-3, lora_r=16,
                 log_every=1, eval_store=str(medical_store), eval_every=12, plot=True)
    losses = [h["loss"] for h in result["history"]]
    accuracies = [h["rewards/accuracies"] for h in result["history"]]
    assert np.mean(losses[-6:]) < np.mean(losses[:3]) - 0.05
    assert np.mean(accuracies[-6:]) > np.mean(accuracies[:3])
    assert result["eval"]["eval/loss"] < math.log(2)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 25))
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "learning_rate", "tokens_per_second"} <= set(lines[0])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000


def test_resume_continues_exactly(byte_model, medical_store, tmp_path):
    common = dict(max_steps=8, batch_size=4, grad_accum=2, lr=2e-3, log_every=1, lora_dropout=0.1)
    whole = run(byte_model, medical_store, tmp_path / "whole", **common)["history"]
    run(byte_model, medical_store, tmp_path / "cut", save_every=3, **common)
    # Forget everything after the checkpoint at step 3, as if the run had died there.
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:3]
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = run(byte_model, medical_store, tmp_path / "cut", resume=True, **common)["history"]
    assert [h["step"] for h in resumed] == list(range(4, 9))
    for a, b in zip(resumed, whole[3:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)


def test_checkpoints_hold_no_pickle(byte_model, medical_store, tmp_path):
    run(byte_model, medical_store, tmp_path / "run", max_steps=2, batch_size=4, save_every=1)
    folder = tmp_path / "run" / "checkpoint-1"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "trainer_state.json"]


def test_a_store_of_another_model_is_refused(mistral_model, byte_model, medical_store, tmp_path):
    with pytest.raises(logitstore.FingerprintMismatchError) as info:
        run(mistral_model, medical_store, tmp_path / "run", max_steps=1)
    assert str(info.value) == (f"{medical_store} was built with a different model and tokenizer than {mistral_model}; "
                               "train with the model the store was built from, or pass --allow-fingerprint-mismatch")


# ---- losses against TRL 1.16's own code ----------------------------------------------------------------------

def trl_losses(loss_type: str, policy, ref, completion_mask, beta=0.1, label_smoothing=0.0) -> float:
    """Run TRL's DPOTrainer._compute_loss on given log-probs through a stub model (no forward pass)."""
    from trl import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    n2, width = completion_mask.shape
    per_token = torch.zeros(n2, width - 1)
    per_token[:, 0] = policy  # one value per sequence: its sum is the sequence log-prob
    stub = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n2, width - 1),
                           mean_logits=torch.zeros(n2, width - 1), is_top1=torch.zeros(n2, width - 1, dtype=torch.bool))
    model = lambda **kw: stub  # noqa: E731
    model.training = True
    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device=torch.device("cpu"))
    trainer.__dict__.update(
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], f_divergence_type="reverse_kl", ld_alpha=None,
        precompute_ref_logps=True, use_weighting=False, aux_loss_enabled=False, label_smoothing=label_smoothing,
        _metrics={"train": __import__("collections").defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        model=SimpleNamespace(training=True))
    object.__setattr__(trainer, "accelerator", identity) if False else trainer.__dict__.update(accelerator=identity)
    chosen_ref, rejected_ref = ref.chunk(2)
    inputs = {"input_ids": torch.ones(n2, width, dtype=torch.long), "attention_mask": torch.ones(n2, width),
              "completion_mask": completion_mask, "ref_chosen_logps": chosen_ref, "ref_rejected_logps": rejected_ref}
    return float(DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False))


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2),
                                                 ("sigmoid_norm", 0.0)])
def test_losses_match_trl(loss_type, smoothing):
    g = torch.Generator().manual_seed(1)
    n, width = 6, 12
    policy = -torch.rand(2 * n, generator=g) * 40
    ref = -torch.rand(2 * n, generator=g) * 40
    lengths = torch.randint(1, width - 1, (2 * n,), generator=g)
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        completion_mask[i, 1:1 + k] = 1  # one prompt token, then k completion tokens
    expected = trl_losses(loss_type, policy, ref, completion_mask, beta=0.3, label_smoothing=smoothing)
    counts = completion_mask.sum(1)
    out = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=0.3, loss_type=loss_type,
                   label_smoothing=smoothing, chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    assert out.losses.shape == (n,)
    assert float(out.losses.mean()) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_sigmoid_loss_reference_formula():
    out = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]),
                   beta=0.5)
    assert float(out.losses[0]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 2.0))))
    assert float(out.chosen_rewards[0]) == pytest.approx(0.5) and float(out.rejected_rewards[0]) == pytest.approx(-0.5)


def test_continuing_the_reference_adapter_starts_at_ln2(byte_model, tmp_path):
    """The usual case: an SFT LoRA adapter is the reference, and DPO continues training that adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(byte_model))
    torch.manual_seed(3)
    sft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft.save_pretrained(str(tmp_path / "sft"))
    rows = [{"prompt": f"Q{i}: 2+2?", "chosen": " 4", "rejected": " 5"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), adapter=str(tmp_path / "sft"), data=str(data), out=str(tmp_path / "s"),
                      max_length=64), progress=False)
    plain = tmp_path / "plain"
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(plain), max_length=64), progress=False)
    with_adapter = logitstore.open(tmp_path / "s").get(logitstore.open(plain).ids)["chosen_logps"]
    assert np.max(np.abs(with_adapter - logitstore.open(plain).get(logitstore.open(plain).ids)["chosen_logps"])) > 1e-3
    first = run(byte_model, tmp_path / "s", tmp_path / "run", adapter=str(tmp_path / "sft"), max_steps=2,
                batch_size=4, log_every=1)["history"]
    assert abs(first[0]["loss"] - math.log(2)) < 1e-5
    assert first[1]["loss"] != first[0]["loss"]  # the adapter is trainable
