"""Unpaired stores (KTO, BCO): the kind and its version, reading and verifying, the KL pairing, and builds from TRL's
unpaired format checked against TRL 1.16's KTOTrainer (its tokenization, KL pairing and precomputed reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.errors import FormatError, InputDataError
from logitstore.kinds import UNPAIRED, kind_of, kl_rows

import forge
from cli_process import run_cli
from sample_data import unpaired_rows, write_jsonl

def write_unpaired(path: Path, n: int = 5, *, kl_batch_size: int = 2, per_token: bool = True,
                   kl_shift: int = 0) -> logitstore.StoreWriter:
    """A small unpaired store written through the library; `kl_shift` != 0 stores wrong KL completions."""
    ids = [f"e{i}" for i in range(n)]
    writer = logitstore.create(path, ids, fingerprint={"model": "m"}, vocab_size=100, max_length=16,
                               kind="unpaired", kl_batch_size=kl_batch_size, per_token=per_token, rows_per_shard=3)
    completions = [np.array([3 + i, 2]) for i in range(n)]
    source = kl_rows(n, kl_batch_size)
    for shard in range(writer.geometry.num_shards):
        rows = writer.shard_rows(shard)
        data = {"prompt_ids": [np.array([1, 5])] * len(rows),
                "completion_ids": [completions[i] for i in rows],
                "kl_completion_ids": [completions[(source[i] + kl_shift) % n] for i in rows],
                "completion_logps": [-0.75 - i for i in rows], "kl_logps": [-1.5 - i for i in rows],
                "completion_tokens": [2] * len(rows), "kl_tokens": [2] * len(rows),
                "label": [i % 2 for i in rows]}
        if per_token:
            data["completion_token_logps"] = [np.array([-0.5, -0.25 - i]) for i in rows]
            data["kl_token_logps"] = [np.array([-0.5, -1.0 - i]) for i in rows]
        writer.write_shard(shard, data)
    writer.finalize()
    return writer


def test_kl_rows_rotate_by_one_within_each_chunk():
    assert kl_rows(7, 3) == [2, 0, 1, 5, 3, 4, 6]
    assert kl_rows(4, 2) == [1, 0, 3, 2]


def test_round_trip_header_and_get(tmp_path):
    write_unpaired(tmp_path / "u")
    store = logitstore.open(tmp_path / "u")
    h = store.header
    assert (h["format_version"], h["kind"], h["kl_pairing"]) == (3, "unpaired",
                                                                  {"rule": "rotate-within-batches", "batch_size": 2})
    assert store.kind is UNPAIRED and store.kl_batch_size == 2
    assert h["shard_files"][:6] == ["completion_logps", "kl_logps", "completion_tokens", "kl_tokens", "label",
                                    "content_key"]
    got = store.get(["e3", "e0"])
    assert got["completion_logps"].tolist() == [-3.75, -0.75]
    assert got["kl_logps"].tolist() == [-4.5, -1.5]
    assert got["label"].tolist() == [1, 0] and got["row"].tolist() == [3, 0]
    assert store.ragged("kl_completion_ids", [0])[0].tolist() == [4, 2]  # row 0's KL completion is row 1's
    assert store.ragged("kl_token_logps", [4])[0].tolist() == [-0.5, -5.0]
    report = logitstore.verify(tmp_path / "u")
    assert report.ok, report.problems


def test_versions_and_kinds_are_refused_when_they_disagree():
    assert kind_of({"format_version": 3, "kind": "unpaired"}) is UNPAIRED
    with pytest.raises(FormatError, match=r"^format version 3 without the kind 'unpaired' it requires \(got None\)$"):
        kind_of({"format_version": 3})
    with pytest.raises(FormatError, match=r"^format version 2 with a kind key \('unpaired'\); version 2 stores are "):
        kind_of({"format_version": 2, "kind": "unpaired"})
    with pytest.raises(FormatError, match=r"^format version 5; this logitstore reads versions 2 \(pairs\), 3 "):
        kind_of({"format_version": 5, "kind": "unpaired"})


@pytest.mark.parametrize("change,message", [
    (lambda h: h.update(format_version=2), "a kind key"),
    (lambda h: h.pop("kind"), "without the kind 'unpaired'"),
    (lambda h: h.update(kl_pairing={"rule": "rotate-within-batches", "batch_size": 1}), "header kl_pairing must be"),
    (lambda h: h.update(kl_pairing={"rule": "shuffle", "batch_size": 2}), "header kl_pairing must be"),
    (lambda h: h.pop("kl_pairing"), r"header lacks the required key kl_pairing \(an unpaired store records its KL "
                                    r"pairing\)$"),
])
def test_hostile_headers_are_refused(tmp_path, change, message):
    write_unpaired(tmp_path / "u")
    h = forge.header(tmp_path / "u")
    change(h)
    forge.write_header(tmp_path / "u", h)
    with pytest.raises(FormatError, match=message):
        logitstore.open(tmp_path / "u")


def test_a_pairs_header_with_a_kl_pairing_is_refused(tmp_path):
    from synthetic import fill

    fill(tmp_path / "p", n=10)
    h = forge.header(tmp_path / "p")
    h["kl_pairing"] = {"rule": "rotate-within-batches", "batch_size": 2}
    forge.write_header(tmp_path / "p", h)
    with pytest.raises(FormatError, match="header kl_pairing belongs to unpaired stores only"):
        logitstore.open(tmp_path / "p")


def test_a_label_that_is_not_a_boolean_is_damage_on_read(tmp_path):
    import numcodecs

    write_unpaired(tmp_path / "u")
    key = "label/c/1"
    labels = np.array([1, 7, 255], dtype=np.uint8)  # row 4 claims label 7 (row 5 is past the end)
    (tmp_path / "u" / key).write_bytes(numcodecs.Zstd(level=3).encode(labels.tobytes()))
    forge.recommit(tmp_path / "u", key)
    store = logitstore.open(tmp_path / "u")
    with pytest.raises(FormatError, match=r"label/c/1: row 4 has label 7, not 0 or 1$"):
        store.get(["e4"])
    assert store.get(["e0"])["label"].tolist() == [0]  # another shard still reads
    assert any("row 4 has label 7" in p for p in logitstore.verify(tmp_path / "u").problems)


def test_verify_finds_kl_completions_the_pairing_does_not_name(tmp_path):
    write_unpaired(tmp_path / "u", kl_shift=1)
    report = logitstore.verify(tmp_path / "u")
    assert report.problems == ["kl_completion_ids: 5 examples do not hold the completion the KL pairing "
                               "(batch size 2) names (first: e0)"]


def write_cut(path: Path, prompt_lengths: list[int], completion_length: int, max_length: int,
              kl_length: dict[int, int] | None = None, kl_extra: dict[int, list[int]] | None = None) -> None:
    """An unpaired store (KL batch size 2, no per-token values) whose rows are cut as TRL's collator cuts them:
    completion and KL completion each to what fits after the row's own prompt; `kl_length` (row: length) and
    `kl_extra` (row: tokens appended) forge KL completions."""
    n = len(prompt_lengths)
    writer = logitstore.create(path, [f"e{i}" for i in range(n)], fingerprint={"model": "m"}, vocab_size=100,
                               max_length=max_length, kind="unpaired", kl_batch_size=2, per_token=False)
    whole = [np.arange(completion_length) + 10 * (i + 1) for i in range(n)]
    source = kl_rows(n, 2)
    room = [max_length - p for p in prompt_lengths]
    completion = [whole[i][:room[i]] for i in range(n)]
    kl = [np.concatenate([whole[source[i]][:(kl_length or {}).get(i, room[i])], (kl_extra or {}).get(i, [])])
          .astype(np.int64) for i in range(n)]
    writer.write_shard(0, {"prompt_ids": [np.ones(p, dtype=np.int64) for p in prompt_lengths],
                           "completion_ids": completion, "kl_completion_ids": kl,
                           "completion_logps": [-1.0] * n, "kl_logps": [-2.0] * n,
                           "completion_tokens": [len(c) for c in completion], "kl_tokens": [len(c) for c in kl],
                           "label": [i % 2 for i in range(n)]})
    writer.finalize()


def test_verify_accepts_kl_completions_cut_only_where_max_length_requires(tmp_path):
    # prompts of 2 and 5 tokens, completions of 5, max length 8: a 5-token prompt's completion and KL completion
    # are cut to 3, so the KL completion is sometimes longer and sometimes shorter than its source's stored one
    write_cut(tmp_path / "u", [2, 5, 5, 2], completion_length=5, max_length=8)
    store = logitstore.open(tmp_path / "u")
    assert [len(c) for c in store.ragged("kl_completion_ids", range(4))] == [5, 3, 3, 5]  # source: 1, 0, 3, 2
    assert [len(c) for c in store.ragged("completion_ids", range(4))] == [5, 3, 3, 5]
    assert logitstore.verify(tmp_path / "u").problems == []


def test_verify_refuses_a_kl_completion_cut_where_it_fits_whole(tmp_path):
    # row 1's KL completion (row 0's 6 tokens, which fit after its 2-token prompt) cut to 3
    write_cut(tmp_path / "u", [2, 2, 2, 2], completion_length=6, max_length=16, kl_length={1: 3})
    assert logitstore.verify(tmp_path / "u").problems == [
        "kl_completion_ids: 1 examples hold the completion the KL pairing names cut where max_length 16 does not "
        "require it (first: e1)"]


def test_verify_refuses_a_kl_completion_longer_than_its_whole_source(tmp_path):
    # row 2's KL completion: row 3's whole 4-token completion and one token more
    write_cut(tmp_path / "u", [2, 2, 2, 2], completion_length=4, max_length=16, kl_extra={2: [99]})
    assert logitstore.verify(tmp_path / "u").problems == [
        "kl_completion_ids: 1 examples do not hold the completion the KL pairing (batch size 2) names (first: e2)"]


def test_writer_refuses_labels_other_than_0_and_1(tmp_path):
    writer = logitstore.create(tmp_path / "u", ["a", "b"], fingerprint={}, vocab_size=10, max_length=4,
                               kind="unpaired", kl_batch_size=2)
    data = {"prompt_ids": [np.array([1])] * 2, "completion_ids": [np.array([2])] * 2,
            "kl_completion_ids": [np.array([2])] * 2, "completion_logps": [-1.0, -1.0], "kl_logps": [-1.0, -1.0],
            "completion_tokens": [1, 1], "kl_tokens": [1, 1], "label": [1, 2]}
    with pytest.raises(ValueError, match="label: expected 0 or 1"):
        writer.write_shard(0, data)


@pytest.mark.parametrize("verb", ["subset", "merge"])
def test_subset_and_merge_refuse_unpaired_stores(tmp_path, verb):
    write_unpaired(tmp_path / "u")
    with pytest.raises(InputDataError, match=rf"cannot {verb} .*: it is an unpaired store, and moving its rows would "
                                             r"break the KL pairing"):
        if verb == "subset":
            logitstore.subset(tmp_path / "u", tmp_path / "s", ids=["e0"])
        else:
            logitstore.merge([tmp_path / "u"], tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ---- builds from data, against TRL ------------------------------------------------------------------------------

def trl_kto_dataset(model_dir: Path, rows: list[dict], tmp_path: Path, *, max_length: int, batch_size: int):
    """TRL 1.16's KTOTrainer preparing the same data with its own precompute_ref_log_probs."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from logitstore.dpo.model.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    args = KTOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=max_length,
                     per_device_train_batch_size=batch_size, report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False)
    trainer = KTOTrainer(model=model, ref_model=None, args=args, processing_class=load_tokenizer(model_dir),
                         train_dataset=datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")}
                                                                   for r in rows]))
    return trainer.train_dataset


@pytest.mark.slow  # TRL trainer set-up and its reference pass
def test_build_equals_trl_kto_precompute(mistral_model, tmp_path):
    from logitstore.dpo.reference import BuildConfig, build

    rows = unpaired_rows(11)  # chunks of 4, 4 and 3: the last one shorter
    max_length = 40  # cuts some completions, and some KL completions differently from their own
    trl = trl_kto_dataset(mistral_model, rows, tmp_path, max_length=max_length, batch_size=4)
    build(BuildConfig(model=str(mistral_model), data=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                      out=str(tmp_path / "s"), max_length=max_length, kl_batch_size=4, per_token=True,
                      rows_per_shard=5), progress=False)
    store = logitstore.open(tmp_path / "s")
    cut = 0
    for i in range(len(rows)):
        prompt = trl[i]["prompt_ids"]
        room = max_length - len(prompt)
        assert store.ragged("prompt_ids", [i])[0].tolist() == prompt
        assert store.ragged("completion_ids", [i])[0].tolist() == trl[i]["completion_ids"][:room]
        assert store.ragged("kl_completion_ids", [i])[0].tolist() == trl[i]["KL_completion_ids"][:room]
        cut += len(trl[i]["KL_completion_ids"]) > room
    assert cut > 0
    got = store.get(store.ids)
    assert got["label"].tolist() == [int(r["label"]) for r in rows]
    assert np.max(np.abs(got["completion_logps"] - np.array(trl["ref_logps"]))) < 1e-4
    assert np.max(np.abs(got["kl_logps"] - np.array(trl["ref_KL_logps"]))) < 1e-4
    assert logitstore.verify(tmp_path / "s").ok


@pytest.fixture(scope="module")
def unpaired_store(byte_model, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("unpaired")
    data = write_jsonl(folder / "d.jsonl", unpaired_rows(12))
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(folder / "s"),
                     "--kl-batch-size", "4", "--max-length", "128", "--per-token", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Built" in result.stdout and "12 examples (12 computed, 0 reused)" in result.stdout
    return folder / "s", data


def test_cli_build_verify_and_info(unpaired_store, byte_model):
    store_path, data = unpaired_store
    result = run_cli("verify", str(store_path), "--model", str(byte_model), "--data", str(data), "--sample", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("sound")
    info = json.loads(run_cli("info", str(store_path), "--json").stdout)
    assert (info["kind"], info["kl_batch_size"], info["format_version"]) == ("unpaired", 4, 3)


@pytest.mark.parametrize("rows,args,message", [
    ([{"prompt": "p", "completion": "c", "label": 1}], (), r"d.jsonl:1: field 'label' must be true or false, got "
                                                           r"int 1"),
    ([{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "chosen": "a", "rejected": "b"}], (),
     r"d.jsonl:2: a preference pair \(chosen/rejected\) in unpaired data \(the first record, line 1, is unpaired\)"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "completion": "c", "label": True}], (),
     r"d.jsonl:2: an unpaired record \(completion/label\) in preference-pair data \(the first record, line 1, is "
     r"a pair\)"),
    ([{"completion": "c", "label": True}], (), r"d.jsonl:1: missing field 'prompt' \(TRL's KTOTrainer extracts an "
                                               r"implicit prompt only from chosen/rejected pairs\)"),
    ([{"prompt": f"p{i}", "completion": "c", "label": True} for i in range(3)], ("--kl-batch-size", "4"),
     r"d.jsonl: 3 examples are fewer than one KL batch of 4 \(--kl-batch-size\)"),
])
def test_bad_input_is_one_line_and_nothing_is_written(byte_model, tmp_path, rows, args, message):
    import re

    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s"), *args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_kl_batch_size_of_one_is_a_usage_error(byte_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", unpaired_rows(4))
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s"),
                     "--kl-batch-size", "1")
    assert result.returncode == 2
    assert ("Invalid value for --kl-batch-size: 1: KTO's KL term needs batches of at least 2 (TRL refuses a "
            "per-device batch size of 1: the KL term would equal the reward)") in result.stderr
    assert not (tmp_path / "s").exists()


def test_reuse_between_unpaired_builds_copies_rows_whose_kl_completion_is_unchanged(unpaired_store, byte_model,
                                                                                    tmp_path):
    store_path, _ = unpaired_store
    rows = unpaired_rows(12)
    rows[5]["completion"] = " Something else entirely."  # changes row 5, and row 6's KL completion (same chunk)
    data = write_jsonl(tmp_path / "d2.jsonl", rows)
    result = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s2"),
                     "--kl-batch-size", "4", "--max-length", "128", "--per-token", "--reuse", str(store_path),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    assert "12 examples (2 computed, 10 reused)" in result.stdout
    old, new = logitstore.open(store_path), logitstore.open(tmp_path / "s2")
    same = [i for i in range(12) if i not in (5, 6)]
    a, b = old.get([f"u{i}" for i in same]), new.get([f"u{i}" for i in same])
    assert np.array_equal(a["kl_logps"], b["kl_logps"]) and np.array_equal(a["label"], b["label"])
    assert logitstore.verify(tmp_path / "s2").ok


def test_digest_pins_an_unpaired_store(tmp_path):
    write_unpaired(tmp_path / "u")
    digest = logitstore.open(tmp_path / "u").digest
    assert logitstore.open(tmp_path / "u", digest=digest).get(["e1"])["kl_logps"].tolist() == [-2.5]
    h = forge.header(tmp_path / "u")
    h["kl_pairing"]["batch_size"] = 3  # another pairing is another store
    forge.write_header(tmp_path / "u", h)
    with pytest.raises(logitstore.DigestMismatchError):
        logitstore.open(tmp_path / "u", digest=digest)


def test_a_non_finite_kl_value_is_found_by_verify_and_refused_by_training(tmp_path):
    import numcodecs
    import torch

    from logitstore.dpo.training.checks import check_batch
    from logitstore.unpaired_loader import make_unpaired_loader

    write_unpaired(tmp_path / "u")
    key = "kl_logps/c/0"
    values = np.array([-1.5, np.nan, -3.5], dtype="<f4")
    (tmp_path / "u" / key).write_bytes(numcodecs.Zstd(level=3).encode(values.tobytes()))
    forge.recommit(tmp_path / "u", key)
    assert "kl_logps: 1 values are not finite log-probs (first: e1)" in logitstore.verify(tmp_path / "u").problems
    store = logitstore.open(tmp_path / "u")
    batch = next(iter(make_unpaired_loader(str(tmp_path / "u"), 2, pin_memory=False)[0]))
    with pytest.raises(InputDataError, match=r"example 'e1' has a non-finite reference log-prob \(completion "
                                             r"-1.75, kl nan\); the store cannot be trained on$"):
        check_batch(batch, store, 100)
    assert torch.isfinite(batch["ref_logps"]).all()


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.mark.slow  # TRL trainer set-up and its reference pass
def test_conversational_build_equals_trl_kto_precompute(mistral_model, tmp_path):
    from logitstore.dpo.reference import BuildConfig, build

    folder = tmp_path / "chat"
    shutil.copytree(mistral_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
            for r in unpaired_rows(6)]
    trl = trl_kto_dataset(folder, rows, tmp_path, max_length=64, batch_size=3)
    build(BuildConfig(model=str(folder), data=str(write_jsonl(tmp_path / "d.jsonl", rows)), out=str(tmp_path / "s"),
                      max_length=64, kl_batch_size=3), progress=False)
    store = logitstore.open(tmp_path / "s")
    for i in range(len(rows)):
        room = 64 - len(trl[i]["prompt_ids"])
        assert store.ragged("prompt_ids", [i])[0].tolist() == trl[i]["prompt_ids"]
        assert store.ragged("completion_ids", [i])[0].tolist() == trl[i]["completion_ids"][:room]
        assert store.ragged("kl_completion_ids", [i])[0].tolist() == trl[i]["KL_completion_ids"][:room]
    got = store.get(store.ids)
    assert np.max(np.abs(got["completion_logps"] - np.array(trl["ref_logps"]))) < 1e-4
    assert np.max(np.abs(got["kl_logps"] - np.array(trl["ref_KL_logps"]))) < 1e-4
