"""Completion stores (format version 4): plain prompt/completion data (TRL's prompt-completion format) with one
scored side, "completion", and its teacher records, for distillation without pairs. Builds are checked against a
direct forward pass and against TRL 1.16 SFTTrainer's tokenization."""

from __future__ import annotations

import json
import re
import unittest.mock
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.errors import FormatError
from logitstore.kinds import COMPLETION, kind_of

from cli_process import run_cli
from sample_data import completion_rows, write_jsonl

def test_the_kind_is_version_4_and_mismatches_are_refused():
    assert kind_of({"format_version": 4, "kind": "completion"}) is COMPLETION
    assert COMPLETION.per_token_fields == ("completion_token_logps",)
    with pytest.raises(FormatError, match=r"^format version 4 without the kind 'completion' it requires \(got "
                                          r"'unpaired'\)$"):
        kind_of({"format_version": 4, "kind": "unpaired"})
    with pytest.raises(FormatError, match=r"^format version 5; this logitstore reads versions 2 \(pairs\), 3 "
                                          r"\(unpaired\) and 4 \(completion\)$"):
        kind_of({"format_version": 5, "kind": "completion"})


def test_a_reader_of_versions_2_and_3_refuses_a_completion_store(tmp_path, monkeypatch):
    from logitstore import kinds

    writer = logitstore.create(tmp_path / "s", ["a"], fingerprint={"model": "m"}, vocab_size=50, max_length=8,
                               kind="completion")
    writer.write_shard(0, {"prompt_ids": [np.array([1, 2])], "completion_ids": [np.array([3, 4])],
                           "completion_logps": [-1.5], "completion_tokens": [2]})
    writer.finalize()
    assert logitstore.open(tmp_path / "s").get(["a"])["completion_logps"].tolist() == [-1.5]
    monkeypatch.setattr(kinds, "VERSIONS", {2: kinds.PAIRS, 3: kinds.UNPAIRED})  # as the previous release
    with pytest.raises(FormatError, match=r"has format version 4; this logitstore reads versions 2 \(pairs\) and 3 "
                                          r"\(unpaired\)$"):
        logitstore.open(tmp_path / "s")


def write_completion(path: Path) -> None:
    writer = logitstore.create(path, ["a", "b"], fingerprint={"model": "m"}, vocab_size=50, max_length=8,
                               kind="completion", per_token=True)
    writer.write_shard(0, {"prompt_ids": [np.array([1, 2]), np.array([1])], "completion_ids": [np.array([3, 4]),
                                                                                               np.array([5])],
                           "completion_logps": [-1.5, -0.5], "completion_tokens": [2, 1],
                           "completion_token_logps": [np.array([-1.0, -0.5]), np.array([-0.5])]})
    writer.finalize()


@pytest.mark.parametrize("change,message", [
    (lambda h: h.pop("kind"), r"format version 4 without the kind 'completion' it requires \(got None\)"),
    (lambda h: h.update(kind="pairs"), r"format version 4 without the kind 'completion' it requires"),
    (lambda h: h.update(format_version=3), r"format version 3 without the kind 'unpaired' it requires"),
    (lambda h: h.update(kl_pairing={"rule": "rotate-within-batches", "batch_size": 2}),
     "header kl_pairing belongs to unpaired stores only"),
    (lambda h: h["fields"].update(rejected_ids=h["fields"]["completion_ids"]),
     "unknown field 'rejected_ids' in the header of a completion store"),
])
def test_hostile_headers_are_refused(tmp_path, change, message):
    import forge

    write_completion(tmp_path / "c")
    assert logitstore.open(tmp_path / "c").ragged("completion_token_logps", [0])[0].tolist() == [-1.0, -0.5]
    h = forge.header(tmp_path / "c")
    change(h)
    forge.write_header(tmp_path / "c", h)
    with pytest.raises(FormatError, match=message):
        logitstore.open(tmp_path / "c")


@pytest.fixture(scope="module")
def completion_store(byte_model, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("completion")
    data = write_jsonl(folder / "d.jsonl", completion_rows(6))
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(folder / "s"),
                     "--max-length", "96", "--per-token", "--top-k", "384", "--topk-codec", "exact", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "6 examples (6 computed, 0 reused)" in result.stdout
    return folder / "s", data


def direct_logits(model_dir: Path, prompt: np.ndarray, completion: np.ndarray):
    """Log-softmax of the model's logits at the completion's scored positions, from one plain forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.concatenate([prompt, completion]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1), ids[0, len(prompt):]


def test_build_values_and_full_top_k_equal_a_direct_forward_pass(completion_store, byte_model):
    store = logitstore.open(completion_store[0])
    assert (store.kind.name, store.header["format_version"], store.header["kind"]) == ("completion", 4, "completion")
    row = 3
    prompt, completion = (store.ragged(f, [row])[0].astype(np.int64) for f in ("prompt_ids", "completion_ids"))
    logps, targets = direct_logits(byte_model, prompt, completion)
    token = logps.gather(1, targets[:, None])[:, 0].numpy()
    values = store.row_values([row])
    assert values["completion_tokens"].tolist() == [len(completion)]
    assert abs(float(values["completion_logps"][0]) - float(token.sum())) < 1e-3
    assert np.max(np.abs(store.ragged("completion_token_logps", [row])[0] - token)) <= 2**-7  # the fixed codec: one step per token
    rec = store.top_k("completion", np.array([row]))
    assert rec["ids"][0].shape == (len(completion), 384) and np.all(np.isneginf(rec["tail_logp"][0]))
    full = np.take_along_axis(logps.numpy(), rec["ids"][0].astype(np.int64), axis=1)
    assert np.max(np.abs(rec["logps"][0] - full)) < 1e-5  # the exact preset: float32 values of every token


def test_tokenization_equals_trl_sft_trainer(completion_store, byte_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    rows = completion_rows(6)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_length=96, report_to=[], use_cpu=True, bf16=False,
                     completion_only_loss=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(byte_model)), args=args,
                         processing_class=load_tokenizer(byte_model),
                         train_dataset=datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "completion")}
                                                                   for r in rows]))
    store = logitstore.open(completion_store[0])
    for i, example in enumerate(trainer.train_dataset):
        ids, labels = example["input_ids"][:96], example["labels"][:96]  # TRL: -100 outside the completion
        start = next(j for j, label in enumerate(labels) if label != -100)
        assert all(label != -100 for label in labels[start:])
        assert store.ragged("prompt_ids", [i])[0].tolist() == ids[:start]
        assert store.ragged("completion_ids", [i])[0].tolist() == ids[start:]


def test_cli_verify_info_and_refusals(completion_store, byte_model, tmp_path):
    path, data = completion_store
    result = run_cli("verify", str(path), "--model", str(byte_model), "--data", str(data), "--sample", "3")
    assert result.returncode == 0 and result.stdout.strip().endswith("sound"), result.stdout + result.stderr
    assert result.stderr == ""  # K = V: no tail on either side, and no warning about it
    info = json.loads(run_cli("info", str(path), "--json").stdout)
    assert (info["kind"], info["format_version"]) == ("completion", 4)
    (tmp_path / "ids.txt").write_text("c1\n")
    for args, message in [
        (("subset", str(path), "--out", str(tmp_path / "o"), "--ids", str(tmp_path / "ids.txt")),
         f"Error: cannot subset {path}: it is a completion store, and subset handles pairs stores only; build a new "
         "store from the data instead"),
        (("export", str(path), "--to", "trl", "--data", str(data), "--out", str(tmp_path / "o")),
         f"Error: {path} is a completion store: its values feed distillation (logitstore train --loss distill), "
         "not a TRL reference column; nothing to export"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 1 and result.stderr.strip() == message, result.stderr
    assert not (tmp_path / "o").exists()
    store = logitstore.open(path)
    with pytest.raises(ValueError, match=r"^side must be one of completion, got 'chosen'$"):
        store.top_k("chosen", np.array([0]))


def test_top_k_of_a_completion_store_without_records_is_one_line(tmp_path):
    writer = logitstore.create(tmp_path / "s", ["a"], fingerprint={"model": "m"}, vocab_size=50, max_length=8,
                               kind="completion")
    writer.write_shard(0, {"prompt_ids": [np.array([1])], "completion_ids": [np.array([3])],
                           "completion_logps": [-1.0], "completion_tokens": [1]})
    writer.finalize()
    with pytest.raises(logitstore.LogitstoreError, match=r"holds no top-k teacher records; rebuild with --top-k K"):
        logitstore.open(tmp_path / "s").top_k("completion", np.array([0]))


@pytest.mark.parametrize("rows,args,rc,message", [
    ([{"prompt": "p", "completion": ""}], (), 1, r"d.jsonl: line 1 \(id '[0-9a-f]+'\): empty completion \(use "
                                                 r"--skip-invalid to leave such examples out\)$"),
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "c", "label": True}], (), 1,
     r"d.jsonl:2: a labelled \(unpaired, KTO\) record in prompt/completion data \(the first record, line 1, has no "
     r"label\); keep kinds in separate files$"),
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p", "chosen": "a", "rejected": "b"}], (), 1,
     r"d.jsonl:2: a preference pair \(chosen/rejected\) in prompt/completion data \(the first record, line 1, is "
     r"prompt/completion\); keep kinds in separate files$"),
    ([{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "c"}], (), 1,
     r"d.jsonl:2: a prompt/completion record without a label in unpaired data \(the first record, line 1, has "
     r"one\); keep kinds in separate files$"),
    ([{"completion": "c"}], (), 1, r"d.jsonl:1: missing field 'prompt'$"),
    ([{"prompt": "p", "completion": "c"}], ("--top-k", "385"), 2, r"--top-k 385 is larger than the vocabulary "
                                                                 r"\(384 tokens\)$"),
    ([{"prompt": "p", "completion": "c"}], ("--max-prompt-length", "4"), 1, r"--max-prompt-length does not apply to "
                                                                           r"prompt/completion data"),
])
def test_bad_input_is_one_line_and_nothing_is_written(byte_model, tmp_path, rows, args, rc, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s"), *args)
    assert result.returncode == rc
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert not (tmp_path / "s").exists()


# ---- loader ------------------------------------------------------------------------------------------------------

def test_loader_gives_one_row_per_example_with_the_pair_loaders_teacher_keys(completion_store):
    from logitstore.completion_loader import make_completion_loader

    path, _ = completion_store
    store = logitstore.open(path)
    loader, _ = make_completion_loader(str(path), 4, shuffle=False, pin_memory=False, teacher=True)
    batch = next(iter(loader))
    assert sorted(batch) == ["attention_mask", "completion_mask", "completion_tokens", "input_ids", "ref_logps",
                             "rows", "teacher_ids", "teacher_logps", "teacher_tail_logp"]
    rows = batch["rows"].tolist()
    assert rows == [0, 1, 2, 3]
    longest = max(len(store.ragged("completion_ids", [r])[0]) for r in rows)
    assert tuple(batch["teacher_ids"].shape) == (4, longest, 384) and tuple(batch["teacher_tail_logp"].shape) == (
        4, longest)
    assert batch["completion_mask"].sum(1).tolist() == store.row_values(rows)["completion_tokens"].tolist()
    assert batch["ref_logps"].tolist() == store.row_values(rows)["completion_logps"].tolist()
    rec = store.top_k("completion", np.array(rows))
    for i, row in enumerate(rows):
        t = rec["ids"][i].shape[0]
        assert np.array_equal(batch["teacher_ids"][i, :t].numpy(), rec["ids"][i])
        assert np.array_equal(batch["teacher_logps"][i, :t].numpy(), rec["logps"][i])
        assert np.all(np.isneginf(batch["teacher_logps"][i, t:].numpy()))  # padding
        mask = batch["completion_mask"][i].bool()
        assert np.array_equal(batch["input_ids"][i][mask].numpy(), store.ragged("completion_ids", [row])[0])


def test_loader_refuses_other_kinds_and_stores_without_records(tmp_path):
    from logitstore.completion_loader import make_completion_loader

    writer = logitstore.create(tmp_path / "p", ["a"], fingerprint={"model": "m"}, vocab_size=50, max_length=8)
    writer.write_shard(0, {"prompt_ids": [np.array([1])], "chosen_ids": [np.array([3])],
                           "rejected_ids": [np.array([4])], "chosen_logps": [-1.0], "rejected_logps": [-2.0],
                           "chosen_tokens": [1], "rejected_tokens": [1]})
    writer.finalize()
    with pytest.raises(logitstore.LogitstoreError, match=r"p is a pairs store; this loader reads completion stores "
                                                         r"\(prompt/completion data\)$"):
        make_completion_loader(str(tmp_path / "p"), 1)
    writer = logitstore.create(tmp_path / "c", ["a"], fingerprint={"model": "m"}, vocab_size=50, max_length=8,
                               kind="completion")
    writer.write_shard(0, {"prompt_ids": [np.array([1])], "completion_ids": [np.array([3])],
                           "completion_logps": [-1.0], "completion_tokens": [1]})
    writer.finalize()
    with pytest.raises(logitstore.LogitstoreError, match=r"holds no top-k teacher records"):
        make_completion_loader(str(tmp_path / "c"), 1, teacher=True)
    batch = next(iter(make_completion_loader(str(tmp_path / "c"), 1, pin_memory=False)[0]))
    assert batch["input_ids"].tolist() == [[1, 3]] and batch["completion_mask"].tolist() == [[0, 1]]


def test_reuse_between_completion_builds_copies_unchanged_examples(completion_store, byte_model, tmp_path):
    path, _ = completion_store
    rows = completion_rows(6)
    rows[2]["completion"] = " Something else entirely."
    data = write_jsonl(tmp_path / "d2.jsonl", rows)
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s2"),
                     "--max-length", "96", "--per-token", "--reuse", str(path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "6 examples (1 computed, 5 reused)" in result.stdout
    old, new = logitstore.open(path), logitstore.open(tmp_path / "s2")
    same = [f"c{i}" for i in range(6) if i != 2]
    assert np.array_equal(old.get(same)["completion_logps"], new.get(same)["completion_logps"])
    assert logitstore.verify(tmp_path / "s2").ok


@pytest.mark.parametrize("records", [[], ["--top-k", "8"], ["--sample-k", "4"]], ids=["plain", "top-k", "sampled"])
def test_each_completion_is_scored_once_with_the_two_sided_scorers_values(mistral_model, tmp_path, records):
    """The build scores one row per example, and its values, per-token values and teacher records are bit for bit
    those of the pairs scorer on the same prompt and completion (both sides the completion): the values completion
    stores held when each completion was scored twice."""
    from logitstore.dpo.model import scoring
    from logitstore.dpo.reference import BuildConfig, build

    rows = completion_rows(12)
    comp = write_jsonl(tmp_path / "c.jsonl", rows)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
                                                 "rejected": r["completion"]} for r in rows])
    scored: list[int] = []
    real = scoring.sequence_logps

    def count(model, input_ids, *args, **kwargs):
        scored.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    cfg = dict(model=str(mistral_model), max_length=64, per_token=True, rows_per_shard=5,
               **({"top_k": 8} if "--top-k" in records else {"sample_k": 4} if records else {}))
    with unittest.mock.patch.object(scoring, "sequence_logps", count):
        build(BuildConfig(data=str(comp), out=str(tmp_path / "c.lstore"), **cfg), progress=False)
    if not records:  # the plain scorer: one row per example, not two
        assert sum(scored) == len(rows)
    build(BuildConfig(data=str(pairs), out=str(tmp_path / "p.lstore"), **cfg), progress=False)
    one, two = logitstore.open(tmp_path / "c.lstore"), logitstore.open(tmp_path / "p.lstore")
    everything = np.arange(len(rows))
    a, b = one.row_values(everything), two.row_values(everything)
    assert a["completion_logps"].view(np.uint32).tolist() == b["chosen_logps"].view(np.uint32).tolist()
    assert a["completion_tokens"].tolist() == b["chosen_tokens"].tolist()
    assert [x.tolist() for x in one.ragged("completion_token_logps", everything, decode=False)] == \
        [x.tolist() for x in two.ragged("chosen_token_logps", everything, decode=False)]
    if records:
        got, want = one.top_k("completion", everything), two.top_k("chosen", everything)
        assert set(got) == set(want)
        for field in got:
            assert all(np.array_equal(x, y) for x, y in zip(got[field], want[field])), field
