"""The reference pass: TRL parity, 4-bit, resume after SIGKILL, and every bad input refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.dpo.inputs.pairs import load_examples
from logitstore.dpo.model.loading import load_tokenizer
from logitstore.dpo.reference import BuildConfig, build
from logitstore.dpo.inputs.tokenization import tokenize_pair

from cli_process import run_cli
from sample_data import implicit_rows, write_jsonl


def trl_reference(model_dir: Path, rows: list[dict], tmp_path: Path, max_length: int, batch_size: int):
    """TRL 1.16's own precompute_ref_log_probs on the same model and data."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=max_length,
                     precompute_ref_batch_size=batch_size, per_device_train_batch_size=batch_size, report_to=[],
                     use_cpu=True, bf16=False, dataset_num_proc=None)  # TRL defaults to bf16 autocast
    trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=load_tokenizer(model_dir),
                         train_dataset=datasets.Dataset.from_list(rows))
    return trainer.train_dataset


@pytest.fixture(scope="module")
def parity_rows() -> list[dict]:
    return implicit_rows(12)


@pytest.mark.slow  # TRL trainer set-up and its reference pass
@pytest.mark.parametrize("batched_alike", [True, False])
def test_sums_equal_trl_precompute(mistral_model, parity_rows, tmp_path, batched_alike):
    data = write_jsonl(tmp_path / "d.jsonl", parity_rows)
    trl = trl_reference(mistral_model, parity_rows, tmp_path, max_length=48, batch_size=1 if batched_alike else 4)
    cfg = BuildConfig(model=str(mistral_model), data=str(data), out=str(tmp_path / "s"), max_length=48,
                      rows_per_shard=5)
    if batched_alike:  # one pair per forward, prompt and completion together: TRL's computation
        cfg.batch_size, cfg.share_prompt = 1, False
    build(cfg, progress=False)
    store = logitstore.open(tmp_path / "s")
    ids = [ex.id for ex in load_examples(data)]
    got = store.get(ids)
    tolerance = 1e-4 if batched_alike else 1e-3
    assert np.max(np.abs(got["chosen_logps"] - np.array(trl["ref_chosen_logps"]))) < tolerance
    assert np.max(np.abs(got["rejected_logps"] - np.array(trl["ref_rejected_logps"]))) < tolerance
    # The exact token ids TRL trains on (its collator truncates prompt+completion to max_length).
    for i, row in enumerate(store.rows(ids)):
        prompt = trl[i]["prompt_ids"]
        assert list(store.ragged("prompt_ids", [row])[0]) == prompt
        assert list(store.ragged("chosen_ids", [row])[0]) == trl[i]["chosen_ids"][:48 - len(prompt)]
        assert list(store.ragged("rejected_ids", [row])[0]) == trl[i]["rejected_ids"][:48 - len(prompt)]


def test_tokenization_matches_trl_for_conversational_and_standard_data(mistral_model):
    from trl.data_utils import extract_prompt as trl_extract

    from logitstore.dpo.inputs.tokenization import extract_prompt

    for row in implicit_rows(6):
        assert extract_prompt(row["chosen"], row["rejected"]) == tuple(trl_extract(row).values())
    messages = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    assert extract_prompt(messages["chosen"], messages["rejected"]) == tuple(trl_extract(messages).values())


def test_prompt_sharing_agrees_with_one_pass_scoring(mistral_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(16))
    for name, share in (("shared", True), ("full", False)):
        build(BuildConfig(model=str(mistral_model), data=str(data), out=str(tmp_path / name), max_length=64,
                          share_prompt=share, batch_size=8), progress=False)
    a, b = logitstore.open(tmp_path / "shared"), logitstore.open(tmp_path / "full")
    ids = a.ids
    for key in ("chosen_logps", "rejected_logps"):
        assert np.max(np.abs(a.get(ids)[key] - b.get(ids)[key])) < 1e-3


def test_byte_level_tokenizer_and_per_token_values(byte_model, tmp_path):
    rows = [{"prompt": f"Q{i}: is water wet?", "chosen": " Yes.", "rejected": " No, never."} for i in range(10)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(tmp_path / "s"), max_length=64,
                      per_token=True, codec="float32"), progress=False)
    store = logitstore.open(tmp_path / "s")
    ex = store.example(store.ids[0])
    assert ex["chosen_tokens"] == len(" Yes.") + 1  # bytes + EOS
    assert abs(float(ex["chosen_token_logps"].sum()) - ex["chosen_logps"]) < 1e-4
    assert logitstore.verify(tmp_path / "s").ok


def test_4bit_build_runs_on_cpu(byte_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    rows = [{"prompt": f"Q{i}?", "chosen": " Yes.", "rejected": " No."} for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    build(BuildConfig(model=str(byte_model), data=str(data), out=str(tmp_path / "s"), max_length=32,
                      quantize="4bit"), progress=False)
    store = logitstore.open(tmp_path / "s")
    assert store.complete and store.fingerprint["precision"] == {"dtype": "float32", "quantize": "4bit"}
    assert np.all(np.isfinite(store.get(store.ids)["chosen_logps"]))


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logitstore.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow  # three builds of 60 pairs, one killed in a process of its own
def test_resume_after_sigkill_is_bit_identical(mistral_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(60))
    env = {"SOURCE_DATE_EPOCH": "1700000000", "TQDM_DISABLE": "1"}
    common = ["build", "--model", str(mistral_model), "--data", str(data), "--max-length", "64",
              "--rows-per-shard", "4", "--batch-size", "2", "--quiet"]
    assert run_cli(*common, "--out", str(tmp_path / "whole"), env=env).returncode == 0
    killed = _cli(*common, "--out", str(tmp_path / "cut"), env={**env, "LOGITSTORE_FAULT": "before-commit:3"})
    assert killed.returncode == -signal.SIGKILL  # died at the named point: shard 3's files written, not committed
    partial = logitstore.open(tmp_path / "cut")
    assert partial.committed.tolist() == [True] * 3 + [False] * 12
    assert (tmp_path / "cut" / "chosen_ids" / "values" / "c" / "3").is_file()
    again = run_cli(*common, "--out", str(tmp_path / "cut"), env=env)
    assert again.returncode == 0, again.stderr
    assert "Resuming" in again.stdout
    assert _digest(tmp_path / "cut") == _digest(tmp_path / "whole")
    done = run_cli(*common, "--out", str(tmp_path / "cut"), env=env)
    assert done.stdout.strip().endswith(f"{tmp_path / 'cut'} is already complete (60 pairs: 60 computed, 0 reused); "
                                     f"nothing to do. Store digest: {logitstore.open(tmp_path / 'cut').digest}")


BAD_INPUTS = [
    ("{not json}\n",
     "Error: bad.jsonl:1: malformed JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('{"prompt": "p, "chosen": "a"}\n', "Error: bad.jsonl:1: malformed JSON (Expecting ',' delimiter at column 17)"),
    ('{"prompt": "p\n', "Error: bad.jsonl:1: malformed JSON (Unterminated string starting at column 12)"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"\n',
     "Error: bad.jsonl:1: malformed JSON (Expecting ',' delimiter at column 47, the end of the line)"),
    ('{"prompt": "p', "Error: bad.jsonl:1: malformed JSON (Unterminated string starting at column 12)"),
    ('{"chosen": "a"}\n', "Error: bad.jsonl:1: missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}\n',
     "Error: bad.jsonl:1: field 'chosen' must be a string or a list of {role, content} messages, got int"),
    ('{"prompt": "p", "chosen": "", "rejected": "b"}\n',
     "Error: bad.jsonl: line 1 (id 'x'): empty chosen completion (use --skip-invalid to leave such pairs out)"),
    ('{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}\n{"id": "a", "prompt": "q", "chosen": "x", '
     '"rejected": "y"}\n', "Error: bad.jsonl:2: duplicate example ID 'a' (first on line 1)"),
    ('{"id": "x", "prompt": "' + "word " * 40 + '", "chosen": "a", "rejected": "b"}\n',
     "Error: bad.jsonl: line 1 (id 'x'): the prompt alone is 40 tokens, at or over --max-length 16 (use "
     "--skip-invalid to leave such pairs out)"),
]


@pytest.mark.slow  # the tokenizer loaded for each of 9 cases
@pytest.mark.parametrize("content,message", BAD_INPUTS)
def test_bad_data_is_refused_in_one_line(mistral_model, tmp_path, content, message):
    content = content.replace('"prompt": "p", "chosen": ""', '"id": "x", "prompt": "p", "chosen": ""')
    (tmp_path / "bad.jsonl").write_text(content)
    out = run_cli("build", "--model", str(mistral_model), "--data", str(tmp_path / "bad.jsonl"), "--out",
               str(tmp_path / "s"), "--max-length", "16", "--quiet")
    assert out.returncode == 1
    assert out.stderr.strip() == message.replace("bad.jsonl", str(tmp_path / "bad.jsonl"))
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.slow  # two CLI builds
def test_bad_model_and_foreign_store_are_refused(mistral_model, byte_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    out = run_cli("build", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "s"))
    assert (out.returncode, out.stderr.strip()) == (1, f"Error: {tmp_path / 'nope'}: no such model folder")
    assert run_cli("build", "--model", str(mistral_model), "--data", str(data), "--out", str(tmp_path / "s"),
                   "--quiet").returncode == 0
    other = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s"), "--quiet")
    assert other.returncode == 1 and "Traceback" not in other.stderr
    # the layout too: default shards are sized from the tokenized data
    assert other.stderr.startswith(f"Error: {tmp_path / 's'} was built for a different layout, model, tokenizer (store "
                                   "fingerprint ")
    debug = run_cli("build", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "t"),
                    "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_tokenizer_without_eos_is_refused(mistral_model, tmp_path):
    import shutil

    folder = tmp_path / "noeos"
    shutil.copytree(mistral_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    from logitstore.errors import ModelError

    with pytest.raises(ModelError) as refused:
        load_tokenizer(folder)
    assert str(refused.value) == f"{folder}: the tokenizer has no EOS token, which DPO needs to end completions"


@pytest.mark.slow  # a CLI build
def test_skip_invalid_records_what_was_left_out(mistral_model, tmp_path):
    rows = implicit_rows(5) + [{"id": "empty", "prompt": "p", "chosen": "", "rejected": "b"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = run_cli("build", "--model", str(mistral_model), "--data", str(data), "--out", str(tmp_path / "s"),
                  "--skip-invalid", "--quiet")
    assert out.returncode == 0, out.stderr
    store = logitstore.open(tmp_path / "s")
    assert len(store) == 5
    assert store.header["skipped"] == [{"id": "empty", "line": 6, "reason": "line 6 (id 'empty'): empty chosen "
                                                                              "completion"}]


def test_tokenize_pair_truncates_completions_at_the_end(mistral_model):
    tok = load_tokenizer(mistral_model)
    ex = load_examples.__globals__["PreferenceExample"]("a", "Hello there", " one two three four five six",
                                                        " no", 1)
    pair = tokenize_pair(tok, ex, max_length=6)
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 6
    assert pair.rejected_ids[-1] == tok.eos_token_id


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture
def chat_model(mistral_model, tmp_path):
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(mistral_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def conversational_rows(n: int) -> list[dict]:
    rows = []
    for i, row in enumerate(implicit_rows(n)):
        question = row["chosen"].split("\n\nAssistant:")[0].replace("\n\nHuman: ", "")
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": row["chosen"].split("Assistant: ")[1]}],
                     "rejected": [{"role": "assistant", "content": row["rejected"].split("Assistant: ")[1]}]})
    return rows


@pytest.mark.slow  # TRL trainer set-up and its reference pass
def test_conversational_data_from_parquet_matches_trl(chat_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = conversational_rows(8)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    build(BuildConfig(model=str(chat_model), data=str(tmp_path / "d.parquet"), out=str(tmp_path / "s"),
                      max_length=64, batch_size=1, share_prompt=False), progress=False)
    trl = trl_reference(chat_model, rows, tmp_path, max_length=64, batch_size=1)
    store = logitstore.open(tmp_path / "s")
    for i in range(len(rows)):
        prompt = trl[i]["prompt_ids"]
        assert list(store.ragged("prompt_ids", [i])[0]) == prompt
        assert list(store.ragged("chosen_ids", [i])[0]) == trl[i]["chosen_ids"][:64 - len(prompt)]
    got = store.get(store.ids)
    assert np.max(np.abs(got["chosen_logps"] - np.array(trl["ref_chosen_logps"]))) < 1e-4


def test_datasets_folder_with_splits(mistral_model, tmp_path):
    import datasets

    rows = [dict(r, id=f"r{i}") for i, r in enumerate(implicit_rows(6))]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dd"))
    build(BuildConfig(model=str(mistral_model), data=str(tmp_path / "dd"), out=str(tmp_path / "train"),
                      max_length=64), progress=False)
    build(BuildConfig(model=str(mistral_model), data=str(tmp_path / "dd"), split="test", out=str(tmp_path / "test"),
                      max_length=64), progress=False)
    assert logitstore.open(tmp_path / "train").ids == ["r0", "r1", "r2", "r3"]
    assert logitstore.open(tmp_path / "test").ids == ["r4", "r5"]
    from logitstore.errors import InputDataError

    with pytest.raises(InputDataError, match=r"choose a split with --split \(it has train, test\)"):
        build(BuildConfig(model=str(mistral_model), data=str(tmp_path / "dd"), split="dev", out=str(tmp_path / "x"),
                          max_length=64), progress=False)


def test_shared_prompt_path_matches_one_pass_where_it_is_taken(mistral_model):
    import torch

    from logitstore.dpo.model.scoring import padded_positions, pair_logps_full, pair_logps_shared
    from logitstore.dpo.model.loading import load_model

    model = load_model(mistral_model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (n,), generator=g) for n in (40, 37, 40, 33)]
    chosen = [torch.randint(3, 32000, (n,), generator=g) for n in (3, 5, 1, 4)]
    rejected = [torch.randint(3, 32000, (n,), generator=g) for n in (4, 2, 5, 5)]
    assert padded_positions(prompts, chosen, rejected, True) < padded_positions(prompts, chosen, rejected, False)
    shared = pair_logps_shared(model, prompts, chosen, rejected, pad_id=0)
    full = pair_logps_full(model, prompts, chosen, rejected, pad_id=0)
    for side in (0, 1):
        for a, b in zip(shared[side], full[side]):
            assert a.shape == b.shape and torch.max(torch.abs(a - b)) < 1e-4


def test_device_map_split_with_disk_offload_equals_a_normal_build(byte_model, tmp_path):
    """--device-map auto in one process: max_memory forces the layers past 6 MB of CPU memory onto disk
    (accelerate's offload, read back layer by layer); the values equal a build on one device."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    model = tmp_path / "model"  # 4 layers of 2.6 MB and a small vocabulary: the layers decide the split
    shutil.copytree(byte_model, model)
    small = json.loads((byte_model / "config.json").read_text())
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(
        vocab_size=small["vocab_size"], hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=small["pad_token_id"], eos_token_id=small["eos_token_id"], bos_token_id=None,
    )).save_pretrained(str(model))
    rows = [{"prompt": f"Q{i}: is water wet?", "chosen": " Yes.", "rejected": " No, never."} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = dict(model=str(model), data=str(data), max_length=64, per_token=True, codec="float32", batch_size=4)
    build(BuildConfig(out=str(tmp_path / "one"), **common), progress=False)
    lines: list[str] = []
    build(BuildConfig(out=str(tmp_path / "split"), device_map="auto", max_memory=("cpu=6MB",), **common),
          progress=False, log=lines.append)
    assert lines == ["--device-map auto: 2 modules on cpu, 6 modules on disk"]
    a, b = logitstore.open(tmp_path / "one"), logitstore.open(tmp_path / "split")
    assert a.fingerprint == b.fingerprint  # the placement is not part of what the values are
    ids = a.ids
    x, y = a.get(ids), b.get(ids)
    for key in ("chosen_logps", "rejected_logps"):
        assert np.max(np.abs(x[key] - y[key])) < 1e-4
    for row in range(len(ids)):
        for field in ("chosen_token_logps", "rejected_token_logps"):
            assert np.max(np.abs(a.ragged(field, [row])[0] - b.ragged(field, [row])[0]), initial=0) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["--max-memory", "cpu=1GiB"], "Error: --max-memory limits what --device-map places on each device; pass "
                                   "--device-map auto"),
    (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], "Error: --max-memory 'gpu0=1GiB': write DEVICE=SIZE, "
                                                            "DEVICE a GPU index (0, cuda:0), cpu or disk"),
    (["--device-map", "auto", "--max-memory", "0=lots"], "Error: --max-memory '0=lots': 'lots' is not a size "
                                                         "(20GiB, 500MB)"),
    (["--device-map", "auto", "--device", "cpu"], "Error: --device-map places the layers itself; drop --device cpu"),
    (["--device-map", "auto", "--prompt-sharing"], "Error: --prompt-sharing runs on one device; drop it with "
                                                   "--device-map"),
])
def test_device_map_misuse_is_one_line(mistral_model, tmp_path, args, message):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    out = run_cli("build", "--model", str(mistral_model), "--data", str(data), "--out", str(tmp_path / "s"), *args)
    assert (out.returncode, out.stderr.strip()) == (1, message)
    assert not (tmp_path / "s").exists()
