"""The TRL adapter with LD-DPO: StoreDPOTrainer feeds TRL 1.16 the reference values for the configured ld_alpha
from one per-token store, equal to what TRL computes from the reference model itself for that alpha."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

import logitstore
from logitstore.dpo.reference import BuildConfig, build

from sample_data import implicit_rows, write_jsonl


@pytest.fixture(scope="module")
def per_token_store(mistral_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl-ld")
    rows = [dict(r, id=f"pair-{i}") for i, r in enumerate(implicit_rows(10))]
    data = write_jsonl(folder / "d.jsonl", rows)
    build(BuildConfig(model=str(mistral_model), data=str(data), out=str(folder / "s"), max_length=64, per_token=True,
                      codec="float32", rows_per_shard=4), progress=False)
    build(BuildConfig(model=str(mistral_model), data=str(data), out=str(folder / "sums"), max_length=64),
          progress=False)
    return folder, rows


def dpo_args(tmp_path, **kw):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=64, bf16=False,
                     use_cpu=True, per_device_train_batch_size=5, report_to=[], save_strategy="no",
                     dataset_num_proc=None, gradient_checkpointing=False, **kw)


def store_trainer(store, model_dir, rows, args):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return StoreDPOTrainer(store=str(store), model=model, args=args, processing_class=load_tokenizer(model_dir),
                           train_dataset=datasets.Dataset.from_list(rows),
                           peft_config=LoraConfig(r=4, target_modules="all-linear"))


def trl_live_reference(model_dir, rows, args) -> tuple[np.ndarray, np.ndarray]:
    """TRL's own reference values for args.ld_alpha: its compute_ref_log_probs over collated batches."""
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args.precompute_ref_log_probs = False
    trainer = DPOTrainer(model=model, args=args, processing_class=load_tokenizer(model_dir),
                         train_dataset=datasets.Dataset.from_list(rows))
    chosen, rejected = [], []
    for start in range(0, len(rows), 5):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, min(start + 5, len(rows)))])
        c, r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen).numpy(), torch.cat(rejected).numpy()


def test_store_trainer_serves_each_ld_alpha_from_one_store(per_token_store, mistral_model, tmp_path):
    folder, rows = per_token_store
    served = {}
    for alpha in (0.3, 0.7):
        trainer = store_trainer(folder / "s", mistral_model, rows, dpo_args(tmp_path / str(alpha), ld_alpha=alpha))
        ours = (np.array(trainer.train_dataset["ref_chosen_logps"]), np.array(trainer.train_dataset["ref_rejected_logps"]))
        theirs = trl_live_reference(mistral_model, rows, dpo_args(tmp_path / f"live-{alpha}", ld_alpha=alpha))
        worst = max(np.max(np.abs(ours[0] - theirs[0])), np.max(np.abs(ours[1] - theirs[1])))
        print(f"ld_alpha {alpha}: largest difference from TRL's live reference {worst:.2e}")
        assert worst < 1e-4
        served[alpha] = ours
    assert np.max(np.abs(served[0.3][0] - served[0.7][0])) > 0.5  # the tails really are weighted differently


def test_store_trainer_with_ld_alpha_starts_at_ln2(per_token_store, mistral_model, tmp_path):
    folder, rows = per_token_store
    args = dpo_args(tmp_path, ld_alpha=0.5, max_steps=1, logging_steps=1, learning_rate=1e-3)
    trainer = store_trainer(folder / "s", mistral_model, rows, args)
    trainer.compute_ref_log_probs = lambda *a, **k: pytest.fail("a reference forward pass ran")
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/margins"]) < 1e-5


def test_store_trainer_refuses_ld_alpha_without_per_token_values(per_token_store, mistral_model, tmp_path):
    folder, rows = per_token_store
    with pytest.raises(logitstore.LogitstoreError) as info:
        store_trainer(folder / "sums", mistral_model, rows, dpo_args(tmp_path, ld_alpha=0.5))
    assert str(info.value) == (f"{folder / 'sums'} holds no per-token reference log-probs, which LD-DPO (ld_alpha) "
                               "needs; build the store with --per-token")


def test_store_trainer_refuses_another_max_length(per_token_store, mistral_model, tmp_path):
    from trl import DPOConfig

    folder, rows = per_token_store
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=128, bf16=False,
                     use_cpu=True, report_to=[])
    with pytest.raises(logitstore.LogitstoreError) as info:
        store_trainer(folder / "s", mistral_model, rows, args)
    assert str(info.value) == (f"{folder / 's'} holds reference values for sequences cut at 64 tokens; pass "
                               "DPOConfig(max_length=64)")
