"""Builds that reuse another store: only changed and added pairs run through the model, reused values keep their
bits, the rest match a full rebuild; other models are refused; kill -9 and torchrun behave as for plain builds."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from ports import free_port
from ranks import torchrun
from sample_data import implicit_rows, write_jsonl

ENV = {"SOURCE_DATE_EPOCH": "1700000000", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
MAX_LENGTH = 128
# Computed values against a full rebuild batched otherwise: float32 differences from padding and batch shape. The
# largest measured here is 7.6e-6 nats per sequence sum (one float32 step at these sums, on 1 of 24 computed
# values); the bound leaves room for other CPUs and thread counts.
NOISE_FLOOR = 1e-4


def edit(rows: list[dict]) -> tuple[list[dict], dict[str, list[str]]]:
    """The base data edited: 10% of pairs changed, 10% added (in the middle), 5% removed, some IDs renamed."""
    n = len(rows)
    changed = list(range(0, n, 10))
    removed = [3, 23, 43]
    renamed = [5, 15, 25, 35]
    out, kinds = [], {"changed": [], "added": [], "renamed": []}
    for i, row in enumerate(rows):
        if i in removed:
            continue
        row = dict(row)
        if i in changed:
            row["chosen"] = row["chosen"].replace("Assistant: ", "Assistant: Certainly. ")
            kinds["changed"].append(row["id"])
        if i in renamed:
            row["id"] = f"renamed-{i}"
            kinds["renamed"].append(row["id"])
        out.append(row)
        if i == n // 2:
            for j, extra in enumerate(implicit_rows(n + n // 10)[n:]):
                out.append({"id": f"new-{j}", **extra})
                kinds["added"].append(f"new-{j}")
    return out, kinds


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reuse")
    base = [{"id": f"p{i}", **r} for i, r in enumerate(implicit_rows(60))]
    edited, kinds = edit(base)
    return {"folder": folder, "base": write_jsonl(folder / "base.jsonl", base),
            "edited": write_jsonl(folder / "edited.jsonl", edited), "kinds": kinds, "base_rows": base}


def config(model: Path, data: Path, out: Path, **kw) -> BuildConfig:
    kw.setdefault("rows_per_shard", 8)
    return BuildConfig(model=str(model), data=str(data), out=str(out), max_length=MAX_LENGTH, **kw)


def record_scored(monkeypatch) -> list[tuple[int, ...]]:
    """Every pair the model scores, as prompt + chosen + rejected ids."""
    from logitstore.dpo.model import scoring

    seen: list[tuple[int, ...]] = []

    def note(prompts, chosen, rejected):
        seen.extend(tuple(p.tolist()) + (-1,) + tuple(c.tolist()) + (-1,) + tuple(r.tolist())
                    for p, c, r in zip(prompts, chosen, rejected))

    full, shared = scoring.sides_logps, scoring.pair_logps_shared

    def spy_full(model, prompts, sides, pad_id):
        note(prompts, *sides)
        return full(model, prompts, sides, pad_id)

    def spy_shared(model, prompts, chosen, rejected, pad_id):
        note(prompts, chosen, rejected)
        return shared(model, prompts, chosen, rejected, pad_id)

    monkeypatch.setattr(scoring, "sides_logps", spy_full)
    monkeypatch.setattr(scoring, "pair_logps_shared", spy_shared)
    return seen


def key_of(pair) -> tuple[int, ...]:
    return tuple(pair.prompt_ids.tolist()) + (-1,) + tuple(pair.chosen_ids.tolist()) + (-1,) + \
        tuple(pair.rejected_ids.tolist())


def bits(store: logitstore.Store, ids: list[str]) -> dict[str, list]:
    got = store.get(ids)
    out = {f: got[f].view(np.uint32 if got[f].dtype == np.float32 else got[f].dtype).tolist()
           for f in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")}
    for field in store.fields:
        out[field] = [v.tolist() for v in store.ragged(field, got["row"], decode=False)]
    return out


def test_reuse_runs_the_model_on_exactly_the_changed_and_added_pairs(mistral_model, datasets, monkeypatch):
    folder, kinds = datasets["folder"], datasets["kinds"]
    # One pair per forward, prompt and completion together: every value is then independent of batching, so a
    # reuse build must equal a full rebuild bit for bit.
    alone = {"batch_size": 1, "share_prompt": False, "per_token": True}
    build(config(mistral_model, datasets["base"], folder / "old1", **alone), progress=False)
    scored = record_scored(monkeypatch)
    result = build(config(mistral_model, datasets["edited"], folder / "new1", reuse=(str(folder / "old1"),),
                          **alone), progress=False)
    tok = load_tokenizer(mistral_model)
    expected_ids = kinds["changed"] + kinds["added"]
    by_id = {ex.id: ex for ex in load_examples(datasets["edited"])}
    expected = sorted(key_of(tokenize_pair(tok, by_id[k], MAX_LENGTH)) for k in expected_ids)
    assert (len(expected_ids), result.pairs_scored, len(scored)) == (12, 12, 12)
    assert sorted(scored) == expected  # exactly the changed and added pairs, each once
    assert (result.computed, result.reused, result.examples) == (12, 51, 63)
    assert f"63 pairs (12 computed, 51 reused), 8 shards written, 12 pairs (" in result.summary()

    monkeypatch.undo()
    build(config(mistral_model, datasets["edited"], folder / "full1", **alone), progress=False)
    new, full, old = (logitstore.open(folder / n) for n in ("new1", "full1", "old1"))
    assert new.ids == full.ids
    assert bits(new, new.ids) == bits(full, full.ids)  # every value, reused or computed, bit for bit
    assert np.array_equal(new.content_keys(), full.content_keys())
    reused = [k for k in new.ids if k not in expected_ids]
    old_ids = [k if not k.startswith("renamed-") else f"p{k.split('-')[1]}" for k in reused]
    assert bits(new, reused) == bits(old, old_ids)  # renamed pairs were reused too
    assert new.provenance == {"sources": [{"path": str(folder / "old1"), "fingerprint_digest":
                                           old.header["fingerprint_digest"], "digest": new.provenance["sources"][0][
                                               "digest"], "reused": 51}], "reused": 51, "computed": 12}
    assert full.provenance == {"sources": [], "reused": 0, "computed": 63}
    assert logitstore.verify(folder / "new1").ok


def test_reused_values_keep_their_bits_and_computed_ones_match_a_full_rebuild(mistral_model, datasets):
    folder, kinds = datasets["folder"], datasets["kinds"]
    batched = {"batch_size": 4, "per_token": True}  # the default codec: fixed point
    build(config(mistral_model, datasets["base"], folder / "old2", **batched), progress=False)
    result = build(config(mistral_model, datasets["edited"], folder / "new2", reuse=(str(folder / "old2"),),
                          **batched), progress=False)
    assert result.pairs_scored == 12
    build(config(mistral_model, datasets["edited"], folder / "full2", **batched), progress=False)
    new, full, old = (logitstore.open(folder / n) for n in ("new2", "full2", "old2"))
    computed = kinds["changed"] + kinds["added"]
    reused = [k for k in new.ids if k not in computed]
    old_ids = [k if not k.startswith("renamed-") else f"p{k.split('-')[1]}" for k in reused]
    assert bits(new, reused) == bits(old, old_ids)
    for ids in (computed, reused):
        a, b = new.get(ids), full.get(ids)
        for side in ("chosen", "rejected"):
            assert np.array_equal(a[f"{side}_tokens"], b[f"{side}_tokens"])
            assert np.max(np.abs(a[f"{side}_logps"] - b[f"{side}_logps"])) < NOISE_FLOOR
    assert logitstore.verify(folder / "new2").ok


def test_per_token_builds_pass_over_stores_without_per_token_values(mistral_model, datasets):
    folder = datasets["folder"]
    build(config(mistral_model, datasets["base"], folder / "sums"), progress=False)
    logs: list[str] = []
    result = build(config(mistral_model, datasets["base"], folder / "pt", per_token=True,
                          reuse=(str(folder / "sums"),)), progress=False, log=logs.append)
    assert (result.reused, result.pairs_scored) == (0, 60)
    assert logs[0] == f"Note: {folder / 'sums'} has no per-token values in this build's codec; its pairs are " \
                      "computed again."
    sums_only = build(config(mistral_model, datasets["base"], folder / "again", reuse=(str(folder / "pt"),)),
                      progress=False)
    assert (sums_only.reused, sums_only.pairs_scored) == (60, 0)  # nothing to compute: the model never loads


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logitstore.cli.main", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV, **(env or {})})


@pytest.mark.slow
def test_stores_of_another_model_or_precision_are_refused(mistral_model, byte_model, datasets):
    folder = datasets["folder"]
    data = str(datasets["base"])
    assert run_cli("build", "--model", str(mistral_model), "--data", data, "--out", str(folder / "m"),
                   "--max-length", "128", "--quiet", env=ENV).returncode == 0
    other = run_cli("build", "--model", str(byte_model), "--data", data, "--out", str(folder / "x"), "--reuse",
                    str(folder / "m"), "--quiet", env=ENV)
    assert other.returncode == 1
    assert re.fullmatch(rf"Error: cannot reuse {folder / 'm'}: it was built with another model \(its fingerprint "
                        r"[0-9a-f]{12}, this build [0-9a-f]{12}\)\n", other.stderr), other.stderr
    half = run_cli("build", "--model", str(mistral_model), "--data", data, "--out", str(folder / "x"), "--dtype",
                   "bfloat16", "--reuse", str(folder / "m"), "--quiet", env=ENV)
    assert half.returncode == 1 and half.stderr.startswith(f"Error: cannot reuse {folder / 'm'}: it was built "
                                                           "with another precision (its fingerprint ")
    assert not (folder / "x").exists()  # refused before anything was written


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_old(mistral_model, datasets):
    folder = datasets["folder"]
    done = run_cli(*build_args(mistral_model, datasets["base"], folder / "cli-old"), env=ENV)
    assert done.returncode == 0, done.stderr
    whole = run_cli(*build_args(mistral_model, datasets["edited"], folder / "cli-whole"), "--reuse",
                    str(folder / "cli-old"), env=ENV)
    assert whole.returncode == 0, whole.stderr
    return folder / "cli-old", folder / "cli-whole", whole.stdout


def build_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["build", "--model", str(model), "--data", str(data), "--out", str(out), "--max-length", "128",
            "--rows-per-shard", "4", "--batch-size", "2", "--per-token", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after-commit:2", "before-commit:4"])
def test_kill_9_during_a_reuse_build_then_rerun_is_identical(mistral_model, datasets, cli_old, tmp_path, fault):
    old, whole, whole_out = cli_old
    assert whole_out.strip().splitlines()[-1].startswith(f"Built {whole}: 63 pairs (12 computed, 51 reused), "
                                                         "16 shards written, 12 pairs (")
    command = [*build_args(mistral_model, datasets["edited"], tmp_path / "cut"), "--reuse", str(old)]
    cut = _cli(*command, env={"LOGITSTORE_FAULT": fault})
    assert cut.returncode == -9
    partial = logitstore.open(tmp_path / "cut")
    assert int(partial.committed.sum()) == int(fault.split(":")[1]) + fault.startswith("after")  # shards go in order
    without = run_cli(*build_args(mistral_model, datasets["edited"], tmp_path / "cut"), env=ENV)
    assert without.returncode == 1 and without.stderr == (
        f"Error: {tmp_path / 'cut'} was planned with 51 pairs reused from 1 store and 12 computed, this run has 0 "
        "pairs reused from 0 stores and 63 computed; run with the same stores to reuse (or the same inputs), or "
        "use another output path\n")
    again = run_cli(*command, env=ENV)
    assert again.returncode == 0, again.stderr
    assert "Resuming" in again.stdout
    assert tree_digest(tmp_path / "cut") == tree_digest(whole)
    info = json.loads(run_cli("info", str(tmp_path / "cut"), "--json").stdout)
    assert (info["computed"], info["reused"]) == (12, 51)
    assert info["provenance"]["sources"][0]["path"] == str(old)


@pytest.mark.slow
def test_two_rank_reuse_build_splits_only_the_pairs_to_compute(mistral_model, datasets, cli_old, tmp_path):
    old, whole, _ = cli_old
    command = torchrun(*build_args(mistral_model, datasets["edited"], tmp_path / "two"), "--reuse", str(old),
                       port=free_port())
    two = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    scored = [int(n) for n in re.findall(r"shards? written, (\d+) pairs? \(", two.stdout)]
    assert len(scored) == 2 and sum(scored) == 12 and min(scored) >= 4  # both ranks share the model's work
    assert tree_digest(tmp_path / "two") == tree_digest(whole)
