"""StoreDistillationTrainer: TRL 1.16's SFTTrainer distilling from a completion store's teacher records, with no
teacher model. Its step-0 loss is `logitstore train --loss distill`'s on the same store and student; at K = V with
exact values it is the divergence TRL's DistillationTrainer computes from the live teacher; its NLL term is
SFTTrainer's own loss; what cannot train is refused in one line."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

import logitstore

from sample_data import HUMAN_TURNS, write_jsonl

N = 8  # examples; every trainer here takes them all in one batch, so both sides score the same tokens


def rows(n: int = N) -> list[dict]:
    return [{"prompt": f"Human: {HUMAN_TURNS[i % len(HUMAN_TURNS)][0]} ({i})\n\nAssistant:",
             "completion": " " + HUMAN_TURNS[i % len(HUMAN_TURNS)][1]} for i in range(n)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher that is not the student (another seed, a sharpened LM head) and the data, without IDs: the build
    gives each example the hash of its prompt and completion, and so does the trainer."""
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.demo import make_tiny_model

    folder = tmp_path_factory.mktemp("trl-distill")
    teacher_dir = make_tiny_model(folder / "teacher", seed=1)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    model.lm_head.weight.data *= 20  # a random tiny model's next-token distribution is flat
    model.save_pretrained(str(teacher_dir))
    return teacher_dir, write_jsonl(folder / "d.jsonl", rows())


def build(teacher, out, *options):
    from click.testing import CliRunner

    from logitstore.cli.main import cli

    teacher_dir, data = teacher
    result = CliRunner().invoke(cli, ["build", "--model", str(teacher_dir), "--data", str(data), "--out", str(out),
                                      "--max-length", "128", "--quiet", *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def topk_store(teacher, tmp_path_factory):
    return build(teacher, tmp_path_factory.mktemp("topk") / "s", "--top-k", "8")


@pytest.fixture(scope="module")
def sampled_store(teacher, tmp_path_factory):
    return build(teacher, tmp_path_factory.mktemp("sampled") / "s", "--sample-k", "12")


@pytest.fixture(scope="module")
def exact_store(teacher, tmp_path_factory):
    return build(teacher, tmp_path_factory.mktemp("exact") / "s", "--top-k", "384", "--topk-codec", "exact")


def config(out, **kw):
    from logitstore.integrations.trl import StoreDistillationConfig

    kw = {"max_length": 128, "per_device_train_batch_size": N, "max_steps": 1, **kw}
    return StoreDistillationConfig(output_dir=str(out), bf16=False, use_cpu=True, logging_steps=1, report_to=[],
                                   save_strategy="no", activation_checkpointing=False, disable_tqdm=True, **kw)


def trainer(store, student, args, data=None, model=None):
    from transformers import AutoModelForCausalLM

    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreDistillationTrainer

    model = model or AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    return StoreDistillationTrainer(store=str(store), model=model, args=args, processing_class=load_tokenizer(student),
                                    train_dataset=datasets.Dataset.from_list(data or rows()))


def first_step(t) -> dict:
    t.train()
    return next(h for h in t.state.log_history if "loss" in h)


def logitstore_train(student, store, out, *options) -> dict:
    """Step 1 of `logitstore train --loss distill` on the whole store in one batch (a fresh LoRA adapter leaves the
    student as it is, so its loss is the step-0 loss)."""
    from logitstore.cli.main import main

    try:
        main(["train", "--model", str(student), "--store", str(store), "--out", str(out), "--loss", "distill",
              "--max-steps", "1", "--batch-size", str(N), "--log-every", "1", "--dtype", "float32",
              "--allow-fingerprint-mismatch", "--quiet", *options])
    except SystemExit as done:
        assert done.code in (0, None)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


# ---- the loss ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a CLI training run and a TRL one
@pytest.mark.parametrize("records, beta", [("topk", None), ("topk", 0.0), ("sampled", None)])
def test_step_zero_loss_is_logitstore_trains(byte_model, topk_store, sampled_store, tmp_path, records, beta):
    store = {"topk": topk_store, "sampled": sampled_store}[records]
    ours = first_step(trainer(store, byte_model, config(tmp_path / "trl", beta=beta)))
    theirs = logitstore_train(byte_model, store, tmp_path / "run",
                              *([] if beta is None else ["--distill-beta", str(beta)]))
    print(f"{records} beta {beta}: |TRL - logitstore train| = {abs(ours['loss'] - theirs['loss']):.2e}")
    assert abs(ours["loss"] - theirs["loss"]) < 1e-5
    assert ours["distill/loss"] == pytest.approx(ours["loss"], abs=1e-6)  # no NLL term by default
    assert theirs["loss"] > 0.5  # the teacher is another model


@pytest.mark.slow  # TRL's DistillationTrainer with the live teacher, per beta
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])  # forward KL, JSD, reverse KL (TRL's default)
def test_exact_records_of_the_whole_vocabulary_give_trls_live_teacher_loss(byte_model, teacher, exact_store,
                                                                             tmp_path, beta):
    ours = first_step(trainer(exact_store, byte_model, config(tmp_path / "trl", beta=beta)))["loss"]
    theirs = live_teacher_loss(byte_model, teacher[0], exact_store, beta, tmp_path / "live")
    print(f"beta {beta}: |stored - live teacher| = {abs(ours - theirs):.2e}")
    assert abs(ours - theirs) < 1e-5
    assert theirs > 0.3


def live_teacher_loss(student_dir, teacher_dir, store_path, beta: float, out) -> float:
    """TRL 1.16 DistillationTrainer's loss (its `_compute_loss`: backbones, then ChunkedDivergenceFunction over both
    LM heads) on the store's examples, with the teacher model run live: each example alone (no padding), the sums
    over every completion token divided by their count, TRL's reduction over a batch."""
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    student, teacher_model = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
                              for d in (student_dir, teacher_dir))
    live = DistillationTrainer(model=student, teacher_model=teacher_model, processing_class=load_tokenizer(student_dir),
                               args=DistillationConfig(output_dir=str(out), beta=beta, bf16=False, use_cpu=True,
                                                       report_to=[], activation_checkpointing=False),
                               train_dataset=datasets.Dataset.from_list(rows()))
    store = logitstore.open(store_path)
    total, count = 0.0, 0
    for row in range(len(store)):
        prompt, completion = (torch.from_numpy(store.ragged(f, [row])[0].astype(np.int64))[None]
                              for f in ("prompt_ids", "completion_ids"))
        inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
                  "completion_mask": torch.ones_like(completion)}
        with torch.no_grad():
            loss, _, tokens = live._compute_loss(student, inputs, None)  # the mean over this example's tokens
        total += float(loss) * int(tokens)
        count += int(tokens)
    assert count == int(np.sum(store.get(store.ids)["completion_tokens"]))
    return total / count


@pytest.mark.slow  # two TRL trainers
def test_nll_weight_adds_sfttrainers_own_loss(byte_model, topk_store, tmp_path):
    """The NLL term is what TRL's SFTTrainer trains on the same data; evaluation computes the same loss."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    mixed = trainer(topk_store, byte_model, config(tmp_path / "mixed", nll_weight=0.5, per_device_eval_batch_size=N),
                    )
    mixed.eval_dataset = mixed.train_dataset
    evaluated = mixed.evaluate()["eval_loss"]
    first = first_step(mixed)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(byte_model), dtype=torch.float32),
                     processing_class=load_tokenizer(byte_model), train_dataset=datasets.Dataset.from_list(rows()),
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=128, per_device_train_batch_size=N,
                                    max_steps=1, bf16=False, use_cpu=True, logging_steps=1, report_to=[],
                                    save_strategy="no", activation_checkpointing=False, disable_tqdm=True))
    nll = first_step(sft)["loss"]
    print(f"|nll - SFTTrainer's loss| = {abs(first['nll'] - nll):.2e}")
    assert abs(first["nll"] - nll) < 1e-5
    assert first["loss"] == pytest.approx(first["distill/loss"] + 0.5 * first["nll"], abs=1e-5)
    assert evaluated == pytest.approx(first["loss"], abs=1e-5)


def test_batches_carry_each_examples_records_by_id(byte_model, topk_store, tmp_path):
    """Whatever order TRL's sampler takes, each row of a batch holds its own example's records from the store."""
    t = trainer(topk_store, byte_model, config(tmp_path / "trl", per_device_train_batch_size=3))
    store = logitstore.open(topk_store)
    batch = next(iter(t.get_train_dataloader()))
    records = store.top_k("completion", batch["rows"].numpy())
    assert batch["teacher_ids"].shape[:2] == batch["teacher_tail_logp"].shape == (3, max(len(x) for x in
                                                                                        records["ids"]))
    for i, (ids, logps, tail) in enumerate(zip(records["ids"], records["logps"], records["tail_logp"])):
        assert batch["teacher_ids"][i, :len(ids)].numpy().tolist() == ids.tolist()
        assert np.array_equal(batch["teacher_logps"][i, :len(ids)].numpy(), logps)
        assert np.array_equal(batch["teacher_tail_logp"][i, :len(ids)].numpy(), tail)
        completion = store.ragged("completion_ids", [int(batch["rows"][i])])[0]
        scored = batch["labels"][i] != -100
        assert batch["input_ids"][i][scored].tolist() == completion.tolist()


# ---- refusals ---------------------------------------------------------------------------------------------------

def refusal(store, student, args, data=None, model=None) -> str:
    with pytest.raises(logitstore.LogitstoreError) as info:
        trainer(store, student, args, data, model)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_pairs_or_unpaired_store_is_refused(byte_model, tmp_path):
    from synthetic import fill
    from test_unpaired_store import write_unpaired

    fill(tmp_path / "pairs", n=4)
    write_unpaired(tmp_path / "kto")
    for store, kind in ((tmp_path / "pairs", "pairs"), (tmp_path / "kto", "unpaired")):
        assert refusal(store, byte_model, config(tmp_path / "trl")) == (
            f"{store} is a {kind} store; StoreDistillationTrainer trains on a completion store's teacher records "
            "(logitstore build --data prompt-completion.jsonl --top-k K or --sample-k K)")


def test_a_store_without_teacher_records_is_refused(byte_model, teacher, tmp_path):
    store = build(teacher, tmp_path / "plain")
    assert refusal(store, byte_model, config(tmp_path / "trl")) == (
        f"{store} holds no top-k teacher records; rebuild with --top-k K (or --sample-k K)")


def test_sampled_records_train_only_the_forward_kl(byte_model, sampled_store, tmp_path):
    assert refusal(sampled_store, byte_model, config(tmp_path / "trl", beta=0.5)) == (
        f"{sampled_store} holds sampled teacher records, which estimate only the forward KL; pass "
        "StoreDistillationConfig(beta=0.0) (got 0.5)")


@pytest.mark.parametrize("options, message", [
    ({"max_length": 256}, "{store} holds teacher records for sequences cut at 128 tokens; pass "
                          "StoreDistillationConfig(max_length=128)"),
    ({"packing": True}, "StoreDistillationTrainer scores each example against its own records; pass packing=False "
                        "and padding_free=False"),
    ({"completion_only_loss": False}, "StoreDistillationTrainer trains on the completion tokens the store holds "
                                      "records for; leave completion_only_loss unset (or True)"),
])
def test_options_that_change_trls_rows_are_refused(byte_model, topk_store, tmp_path, options, message):
    assert refusal(topk_store, byte_model, config(tmp_path / "trl", **options)) == message.format(store=topk_store)


def test_a_student_with_another_tokenizer_is_refused(mistral_model, topk_store, tmp_path):
    """The Mistral tokenizer's tokens are not the store's (built with the byte-level one)."""
    text = refusal(topk_store, mistral_model, config(tmp_path / "trl"))
    assert text.startswith("train_dataset example ") and text.endswith(
        ": TRL's tokens differ from the store's; the store was built with another tokenizer, chat template or data")


def test_a_student_vocabulary_smaller_than_the_teachers_is_refused(byte_model, topk_store, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = AutoConfig.from_pretrained(str(byte_model))
    small.vocab_size = 300
    model = AutoModelForCausalLM.from_config(small)
    assert refusal(topk_store, byte_model, config(tmp_path / "trl"), model=model) == (
        f"{topk_store} holds a teacher of 384 tokens, more than the student's vocabulary of 300; the store was built "
        "for another tokenizer")


def test_examples_the_store_does_not_hold_are_refused(byte_model, topk_store, tmp_path):
    data = [dict(r, id=f"ex-{i}") for i, r in enumerate(rows())]
    assert refusal(topk_store, byte_model, config(tmp_path / "trl"), data=data) == (
        f"{topk_store}: 8 unknown example IDs: 'ex-0', 'ex-1', 'ex-2', 'ex-3', 'ex-4' and 3 more; the dataset's 'id' "
        "column (without one, the hash of each prompt and completion) must name the store's examples")


def test_datasets_that_cannot_be_checked_up_front_are_refused(byte_model, topk_store, tmp_path):
    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreDistillationTrainer

    for dataset, message in (
            (datasets.Dataset.from_list(rows()).to_iterable_dataset(),
             "StoreDistillationTrainer needs a datasets.Dataset as train_dataset (every example is checked against "
             "the store before training); got IterableDataset"),
            (datasets.Dataset.from_list([{"text": "Hi there"}]),
             "the train_dataset needs an 'id' column holding the store's example IDs, or 'prompt' and 'completion' "
             "columns to derive them from")):
        with pytest.raises(logitstore.LogitstoreError) as info:
            StoreDistillationTrainer(store=str(topk_store), model=str(byte_model), args=config(tmp_path),
                                     processing_class=load_tokenizer(byte_model), train_dataset=dataset)
        assert str(info.value) == message


def test_config_checks_beta_and_nll_weight(tmp_path):
    with pytest.raises(ValueError, match=r"^beta must be in \[0.0, 1.0\], got 1.5.$"):
        config(tmp_path, beta=1.5)
    with pytest.raises(ValueError, match=r"^nll_weight must be at least 0.0, got -1.0.$"):
        config(tmp_path, nll_weight=-1.0)
