"""Training from a store: step-0 loss ln 2, learning, exact resume, refusal of a foreign store and of bad inputs,
LD-DPO from per-token values against TRL computing the reference live."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore.dpo.reference import BuildConfig, build
from logitstore.dpo.training import TrainConfig, train

from sample_data import implicit_rows, write_jsonl


@pytest.fixture(scope="module")
def medical_store(byte_model, tmp_path_factory):
    from logitstore.dpo.demo import DATA

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


@pytest.mark.parametrize("objective", [{}, {"loss": "bco_pair,sft", "loss_weights": [1.0, 0.1], "beta": 0.3}],
                         ids=["sigmoid", "bco_pair+sft"])
def test_resume_continues_exactly(byte_model, medical_store, tmp_path, objective):
    """No objective has state outside the optimizer (TRL 1.16's bco_pair keeps no running reward mean), so every
    one resumes exactly from a checkpoint."""
    common = dict(max_steps=8, batch_size=4, grad_accum=2, lr=2e-3, log_every=1, lora_dropout=0.1,
                  disable_dropout=False, **objective)
    whole = run(byte_model, medical_store, tmp_path / "whole", **common)["history"]
    run(byte_model, medical_store, tmp_path / "cut", save_every=3, **common)
    # Forget the checkpoint at step 6, as if the run had died after logging step 7 and while writing step 8's line.
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    metrics.write_text("\n".join(metrics.read_text().splitlines()[:7]) + '\n{"step": 8, "lo')
    resumed = run(byte_model, medical_store, tmp_path / "cut", resume=True, **common)["history"]
    assert [h["step"] for h in resumed] == list(range(4, 9))
    for a, b in zip(resumed, whole[3:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
    # metrics.jsonl was cut back to the checkpoint's step: each step once, in order.
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 9))


def test_final_weights_are_written_whole_or_not_at_all(byte_model, medical_store, tmp_path, monkeypatch):
    """A crash while the adapter is written leaves no adapter folder peft could half-read; the next run writes it
    whole (and an earlier adapter stays whole until the new one replaces it)."""
    from peft import PeftModel

    real = PeftModel.save_pretrained

    def dies_halfway(self, folder, *args, **kwargs):
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", dies_halfway)
    with pytest.raises(OSError):
        run(byte_model, medical_store, tmp_path / "run", max_steps=1, batch_size=4)
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(PeftModel, "save_pretrained", real)
    run(byte_model, medical_store, tmp_path / "run", max_steps=1, batch_size=4)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter", "metrics.jsonl"]
    PeftModel.from_pretrained(__import__("transformers").AutoModelForCausalLM.from_pretrained(str(byte_model)),
                              str(tmp_path / "run" / "adapter"))
    monkeypatch.setattr(PeftModel, "save_pretrained", dies_halfway)
    with pytest.raises(OSError):
        run(byte_model, medical_store, tmp_path / "run", max_steps=1, batch_size=4)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() != b"torn"


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


# ---- LD-DPO from one per-token store, any alpha, against TRL computing the reference live --------------------

@pytest.fixture(scope="module")
def ld_setup(mistral_model, tmp_path_factory):
    """One store with per-token values (float32 codec), and an SFT-style adapter so that the policy differs from
    the reference at step 0 (otherwise every alpha starts at ln 2 and nothing is compared)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("ld")
    rows = [dict(r, id=f"pair-{i}") for i, r in enumerate(implicit_rows(8))]
    data = write_jsonl(folder / "d.jsonl", rows)
    build(BuildConfig(model=str(mistral_model), data=str(data), out=str(folder / "s"), max_length=64, per_token=True,
                      codec="float32"), progress=False)
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(str(mistral_model))
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                              init_lora_weights=False, lora_dropout=0.0))
    adapter.save_pretrained(str(folder / "adapter"))
    return folder, rows


def trl_live_step(model_dir, adapter_dir, rows, tmp_path, **dpo_config) -> tuple[float, float, float]:
    """TRL 1.16 on the same pairs in one batch, its reference (the base model) computed live: loss, reward margin and
    the gradient norm of the adapter weights."""
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=64, bf16=False, use_cpu=True, report_to=[],
                     per_device_train_batch_size=len(rows), gradient_checkpointing=False, dataset_num_proc=None,
                     **dpo_config)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, processing_class=load_tokenizer(model_dir),
                         train_dataset=datasets.Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    return float(loss.detach()), trainer._metrics["train"]["rewards/margins"][-1], norm


@pytest.mark.parametrize("extra", [{}, {"loss": "ipo,sigmoid", "loss_weights": [0.5, 1.0]}], ids=["sigmoid", "ipo+sigmoid"])
def test_ld_dpo_from_one_store_matches_trl_live_for_each_alpha(mistral_model, ld_setup, tmp_path, extra):
    folder, rows = ld_setup
    ours, theirs = {}, {}
    for alpha in (0.3, 0.7):
        record = run(mistral_model, folder / "s", tmp_path / f"run-{alpha}", adapter=str(folder / "adapter"),
                     max_steps=1, batch_size=len(rows), lr=1e-3, beta=0.5, ld_alpha=alpha, **extra)["history"][0]
        ours[alpha] = (record["loss"], record["rewards/margins"], record["grad_norm"])
        trl_config = {"loss_type": extra["loss"].split(","), "loss_weights": extra["loss_weights"]} if extra else {}
        theirs[alpha] = trl_live_step(mistral_model, folder / "adapter", rows, tmp_path / f"trl-{alpha}",
                                      ld_alpha=alpha, beta=0.5, **trl_config)
        loss, margin, norm = ours[alpha]
        print(f"ld_alpha {alpha} {extra}: ours {ours[alpha]} TRL {theirs[alpha]}")
        assert abs(loss - theirs[alpha][0]) < 2e-6, (alpha, ours[alpha], theirs[alpha])
        assert abs(margin - theirs[alpha][1]) < 2e-6
        assert abs(norm - theirs[alpha][2]) < 1e-4 * theirs[alpha][2]
    assert abs(ours[0.3][0] - theirs[0.7][0]) > 1e-3  # the two alphas give measurably different objectives


def test_ld_dpo_needs_per_token_values(byte_model, medical_store, tmp_path):
    with pytest.raises(logitstore.LogitstoreError) as info:
        run(byte_model, medical_store, tmp_path / "run", max_steps=1, ld_alpha=0.5)
    assert str(info.value) == (f"{medical_store} holds no per-token reference log-probs, which LD-DPO (ld_alpha) "
                               "needs; build the store with --per-token")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_ld_reference_from_fixed_point_values_is_within_the_codec_bound(mistral_model, ld_setup, tmp_path):
    """With the lossy `fixed` codec, LD-DPO's reference stays within (1 - α)·|scale|/2 of the exact one."""
    from logitstore.ld_dpo import store_ld_reference

    folder, rows = ld_setup
    build(BuildConfig(model=str(mistral_model), data=str(folder / "d.jsonl"), out=str(tmp_path / "fixed"),
                      max_length=64, per_token=True, codec="fixed"), progress=False)
    exact, fixed = logitstore.open(folder / "s"), logitstore.open(tmp_path / "fixed")
    scale = abs(fixed.fields["chosen_token_logps"].scale)
    for alpha in (0.0, 0.3, 1.0):
        a = store_ld_reference(exact, np.arange(len(exact)), alpha)
        b = store_ld_reference(fixed, fixed.rows(exact.ids), alpha)
        sums = exact.get(exact.ids)
        worst = max(np.max(np.abs(a[0] - b[0])), np.max(np.abs(a[1] - b[1])))
        assert worst <= (1 - alpha) * scale / 2 + 1e-4, (alpha, worst)
        if alpha == 1.0:
            assert np.array_equal(a[0], sums["chosen_logps"]) and np.array_equal(a[1], sums["rejected_logps"])


# ---- bad inputs: refused with the example named; a non-finite loss stops and keeps the last good checkpoint ---

def write_store(path, model_dir, n: int = 12, *, per_token: bool = False, mutate=None):
    """A store of random pairs for `model_dir`'s fingerprint, written with logitstore.create; `mutate(rows)` spoils
    it first."""
    from logitstore.dpo.model.loading import model_fingerprint

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        prompt, chosen, rejected = (rng.integers(3, 259, k) for k in (5, 6, 4))
        c_tok, r_tok = -rng.exponential(2, 6).astype(np.float32), -rng.exponential(2, 4).astype(np.float32)
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                     "chosen_logps": float(c_tok.sum()), "rejected_logps": float(r_tok.sum()),
                     "chosen_tokens": 6, "rejected_tokens": 4,
                     **({"chosen_token_logps": c_tok, "rejected_token_logps": r_tok} if per_token else {})})
    if mutate:
        mutate(rows)
    fingerprint = model_fingerprint(str(model_dir), adapter=None, dtype="float32", quantize=None)
    writer = logitstore.create(path, [f"pair-{i}" for i in range(n)], fingerprint=fingerprint, vocab_size=1000,
                               max_length=64, rows_per_shard=4, per_token=per_token, logp_codec="float32",
                               tokenizer={"pad_token_id": 0, "vocab_size": 384})
    for shard in writer.missing_shards:
        span = writer.shard_rows(shard)
        writer.write_shard(shard, {k: [rows[i][k] for i in span] for k in rows[0]})
    writer.finalize()
    return path


def set_value(row: int, field: str, value):
    return lambda rows: rows[row].__setitem__(field, value)


@pytest.mark.parametrize("spoil,expected", [
    (set_value(5, "chosen_logps", float("nan")), "example 'pair-5' has a non-finite reference log-prob (chosen nan, "
                                                  "rejected "),
    (set_value(2, "rejected_logps", float("-inf")), "example 'pair-2' has a non-finite reference log-prob (chosen "),
    (set_value(7, "chosen_ids", np.array([3, 4, 400, 5])), "example 'pair-7' holds token id 400, outside the model's "
                                                            "vocabulary of 384; the store was built for another "
                                                            "tokenizer"),
], ids=["nan", "inf", "out-of-vocabulary"])
def test_bad_inputs_are_refused_naming_the_example(byte_model, tmp_path, spoil, expected):
    store = write_store(tmp_path / "s", byte_model, mutate=spoil)
    with pytest.raises(logitstore.LogitstoreError) as info:
        run(byte_model, store, tmp_path / "run", batch_size=4, lr=1e-3, epochs=1)
    assert str(info.value).startswith(f"{store}: {expected}")
    assert "\n" not in str(info.value)


def test_several_bad_examples_are_counted(byte_model, tmp_path):
    def spoil(rows):
        for row in rows:
            row["rejected_logps"] = float("nan")

    store = write_store(tmp_path / "s", byte_model, mutate=spoil)
    with pytest.raises(logitstore.LogitstoreError, match=r"^.*: examples 'pair-\d+', 'pair-\d+', 'pair-\d+' and 1 more "
                                                         r"have a non-finite reference log-prob \(chosen "):
        run(byte_model, store, tmp_path / "run", batch_size=4)


def test_non_finite_per_token_values_are_refused_for_ld_dpo(byte_model, tmp_path):
    def spoil(rows):
        rows[4]["rejected_token_logps"] = np.array([-1.0, np.nan, -2.0, -0.5], dtype=np.float32)

    store = write_store(tmp_path / "s", byte_model, per_token=True, mutate=spoil)
    run(byte_model, store, tmp_path / "plain", batch_size=4, epochs=1)  # the sums alone are sound
    with pytest.raises(logitstore.LogitstoreError) as info:
        run(byte_model, store, tmp_path / "ld", batch_size=4, epochs=1, ld_alpha=0.5)
    assert str(info.value).startswith(f"{store}: example 'pair-4' has a non-finite reference log-prob (chosen ")


def test_cli_exits_1_with_one_line_naming_the_example(byte_model, tmp_path, capsys):
    from logitstore.cli.main import main

    store = write_store(tmp_path / "s", byte_model, mutate=set_value(9, "chosen_logps", float("nan")))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(byte_model), "--store", str(store), "--out", str(tmp_path / "run"),
              "--batch-size", "4", "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith(f"Error: {store}: example 'pair-9' has a non-finite reference log-prob (chosen nan, ")
    assert err.count("\n") == 1


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(byte_model, tmp_path):
    """Finite but absurd reference values (±3e38) overflow the loss to inf; the step is not applied."""
    from logitstore.loader import PairBatchSampler

    third_batch = PairBatchSampler(12, 4, seed=0).global_batches(0)[2]
    bad = int(third_batch[1])

    def spoil(rows):
        rows[bad]["chosen_logps"], rows[bad]["rejected_logps"] = 3e38, -3e38

    store = write_store(tmp_path / "s", byte_model, mutate=spoil)
    with pytest.raises(logitstore.LogitstoreError) as info:
        run(byte_model, store, tmp_path / "run", batch_size=4, lr=1e-3, save_every=1, log_every=1, epochs=1)
    assert str(info.value) == (f"training stopped at step 3: the loss is inf on examples "
                               f"{', '.join(repr(f'pair-{r}') for r in third_batch[:3])} and 1 more; nothing from this "
                               f"step was applied; the last good checkpoint is {tmp_path / 'run' / 'checkpoint-2'}")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert not (tmp_path / "run" / "adapter").exists()  # the run did not claim to be complete
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the two optimizer steps done before the failing third


# ---- the train command's objective options ---------------------------------------------------------------------

def test_cli_trains_a_weighted_combination_with_ld_alpha(mistral_model, ld_setup, tmp_path, capsys):
    from logitstore.cli.main import main

    folder, rows = ld_setup
    common = dict(adapter=str(folder / "adapter"), max_steps=1, batch_size=len(rows), beta=0.5, ld_alpha=0.3,
                  loss="sigmoid,bco_pair,sft", loss_weights=[0.8, 0.2, 1.0])
    result = run(mistral_model, folder / "s", tmp_path / "library", eval_store=str(folder / "s"), **common)
    expected = result["history"][0]
    assert 1.0 < result["eval"]["eval/loss"] < expected["loss"]  # evaluated with the same objective, after a step
    main(["train", "--model", str(mistral_model), "--store", str(folder / "s"), "--out", str(tmp_path / "cli"),
          "--adapter", str(folder / "adapter"), "--max-steps", "1", "--batch-size", str(len(rows)), "--beta", "0.5",
          "--ld-alpha", "0.3", "--loss", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1.0", "--quiet"])
    assert capsys.readouterr().out.startswith("Trained 1 steps; last logged loss ")
    record = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss"] == expected["loss"] and record["grad_norm"] == expected["grad_norm"]
    assert record["loss"] > 1.0  # the SFT term (mean NLL of the chosen tokens) is in it


@pytest.mark.parametrize("args,message", [
    (["--loss", "sigmoid,dpo"], "Invalid value for '--loss': unknown loss type 'dpo'; choose from sigmoid, hinge, ipo, "
                                "exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
                                "apo_down, discopop, sft, sigmoid_norm, distill, tdpo1, tdpo2 (a preference-pair "
                                "store) or kto, apo_zero_unpaired, bco (an unpaired store)"),
    (["--loss-weights", "1,x"], "Invalid value for '--loss-weights': expected numbers separated by commas, got '1,x'"),
    (["--loss", "sigmoid,sft", "--loss-weights", "1"], "--loss-weights gives 1 weight for 2 --loss types (sigmoid, "
                                                       "sft); give one weight per type, in the same order"),
    (["--loss", "aot", "--use-weighting"], "WPO-style weighting is not implemented for 'aot' or 'aot_unpaired' "
                                           "because those losses sort samples, which would misalign per-pair weights."),
    (["--label-smoothing", "0.1"], "label smoothing has no effect on sigmoid; only robust, exo_pair, aot, aot_unpaired "
                                   "use it"),
    (["--ld-alpha", "2"], "--ld-alpha must be in [0.0, 1.0], got 2.0"),
    (["--discopop-tau", "0.1"], "--discopop-tau only applies to the discopop loss"),
    (["--f-divergence", "js_divergence", "--loss", "nca_pair"], "`f_divergence_type='js_divergence'` is only "
                                                                "supported for the following loss types: "),
])
def test_cli_refuses_objectives_as_usage_errors(args, message, capsys, tmp_path):
    from logitstore.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--model", str(tmp_path), "--store", str(tmp_path / "s"), "--out", str(tmp_path / "run"), *args])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"Error: {message}")
    assert not (tmp_path / "run").exists()
