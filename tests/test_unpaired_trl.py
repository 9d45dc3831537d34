"""The TRL route for unpaired stores: `export --to trl` writes KTOTrainer's `ref_logps`/`ref_KL_logps`, and
StoreKTOTrainer is TRL 1.16's KTOTrainer reading them from the store, equal to TRL's own precompute."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import logitstore
from logitstore.cli.main import cli
from logitstore.dpo.reference import BuildConfig, build
from logitstore.errors import LogitstoreError
from sample_data import write_jsonl
from test_unpaired_store import trl_kto_dataset, unpaired_rows

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def built(mistral_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kto-trl")
    rows = unpaired_rows(11)
    data = write_jsonl(folder / "d.jsonl", rows)
    build(BuildConfig(model=str(mistral_model), data=str(data), out=str(folder / "s"), max_length=MAX_LENGTH,
                      kl_batch_size=4), progress=False)
    return folder, rows, data


def test_export_writes_ktotrainers_columns_in_store_order(built):
    import datasets

    folder, rows, data = built
    result = CliRunner().invoke(cli, ["export", str(folder / "s"), "--to", "trl", "--data", str(data), "--out",
                                      str(folder / "trl")])
    assert result.exit_code == 0, result.output
    ds = datasets.load_from_disk(str(folder / "trl"))
    assert ds.column_names == ["id", "prompt", "completion", "label", "ref_logps", "ref_KL_logps"]
    store = logitstore.open(folder / "s")
    assert ds["id"] == store.ids
    got = store.get(store.ids)
    assert np.array_equal(np.array(ds["ref_KL_logps"], dtype=np.float32), got["kl_logps"])


def test_export_refuses_data_in_another_order(built, tmp_path):
    folder, rows, _ = built
    data = write_jsonl(tmp_path / "d.jsonl", rows[::-1])
    result = CliRunner().invoke(cli, ["export", str(folder / "s"), "--to", "jsonl", "--data", str(data), "--out",
                                      str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1
    assert "the data holds the store's examples in another order" in str(result.exception)
    assert not (tmp_path / "x.jsonl").exists()


def kto_args(tmp_path, **kw):
    from trl import KTOConfig

    kw.setdefault("per_device_train_batch_size", 4)
    return KTOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True, max_length=MAX_LENGTH,
                     report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=2,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", **kw)


@pytest.mark.slow  # TRL's trainer set-up, its reference pass and two training steps
def test_store_kto_trainer_equals_trl_precompute_and_trains(built, mistral_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreKTOTrainer

    folder, rows, _ = built
    ds = datasets.Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(str(mistral_model), dtype="float32")
    trainer = StoreKTOTrainer(store=str(folder / "s"), model=model, args=kto_args(tmp_path),
                              processing_class=load_tokenizer(mistral_model), train_dataset=ds)
    theirs = trl_kto_dataset(mistral_model, rows, tmp_path / "own", max_length=MAX_LENGTH, batch_size=4)
    assert np.max(np.abs(np.array(trainer.train_dataset["ref_logps"]) - np.array(theirs["ref_logps"]))) < 1e-4
    assert np.max(np.abs(np.array(trainer.train_dataset["ref_KL_logps"]) - np.array(theirs["ref_KL_logps"]))) < 1e-4
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow
def test_store_kto_trainer_refuses_another_batch_size_and_another_order(built, mistral_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreKTOTrainer

    folder, rows, _ = built
    model = AutoModelForCausalLM.from_pretrained(str(mistral_model), dtype="float32")
    tok = load_tokenizer(mistral_model)
    with pytest.raises(LogitstoreError, match=r"pairs KL completions within batches of 4; pass "
                                              r"KTOConfig\(per_device_train_batch_size=4\), or rebuild the store with "
                                              r"--kl-batch-size 2$"):
        StoreKTOTrainer(store=str(folder / "s"), model=model, args=kto_args(tmp_path, per_device_train_batch_size=2),
                        processing_class=tok, train_dataset=datasets.Dataset.from_list(rows))
    swapped = [rows[1], rows[0], *rows[2:]]
    with pytest.raises(LogitstoreError, match=r"example 'u1': TRL's KL_completion_ids differ from the store's \(the "
                                              r"data's order or per_device_train_batch_size differ"):
        StoreKTOTrainer(store=str(folder / "s"), model=model, args=kto_args(tmp_path), processing_class=tok,
                        train_dataset=datasets.Dataset.from_list(swapped))
