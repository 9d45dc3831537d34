"""The CLI through click's runner and as a real subprocess; export; the TRL adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import logitstore
from logitstore.cli.main import cli

from cli_process import run_cli
from sample_data import implicit_rows, write_jsonl

COMMANDS = ["build", "verify", "info", "export", "train", "demo", "subset", "merge"]


@pytest.fixture(scope="module")
def built(mistral_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    rows = [dict(r, id=f"pair-{i}") for i, r in enumerate(implicit_rows(20))]
    data = write_jsonl(folder / "d.jsonl", rows)
    result = CliRunner().invoke(cli, ["build", "--model", str(mistral_model), "--data", str(data), "--out",
                                      str(folder / "s"), "--max-length", "64", "--rows-per-shard", "8",
                                      "--per-token", "--quiet"])
    assert result.exit_code == 0, result.output
    return folder, data


def run_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m logitstore.cli.main ARGS` in a process of its own: exit statuses as the shell sees them."""
    return subprocess.run([sys.executable, "-m", "logitstore.cli.main", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_ends_with_examples(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    tail = result.output[result.output.index("Examples:"):]
    assert "Options:" in tail and f"logitstore {command}" in tail


@pytest.mark.parametrize("command,internal", [("build", set()), ("train", {"plot"})])
def test_command_options_are_the_config_fields(command, internal):
    """The command hands its options to the config unchanged: each option is a field and each field an option."""
    import dataclasses

    from logitstore.dpo.reference import BuildConfig
    from logitstore.dpo.training import TrainConfig

    config = {"build": BuildConfig, "train": TrainConfig}[command]
    fields = {f.name for f in dataclasses.fields(config)}
    options = {p.name for p in cli.commands[command].params if p.expose_value} - {"quiet"}
    assert options == fields - internal


def test_info_json_schema(built):
    folder, _ = built
    result = CliRunner().invoke(cli, ["info", str(folder / "s"), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["examples"] == 20 and info["complete"] is True
    assert isinstance(info["fingerprint"], dict) and info["fingerprint"]["tokenization"]["max_length"] == 64
    assert isinstance(info["bytes"], int) and info["bytes"] == logitstore.open(folder / "s").location.total_bytes()
    text = CliRunner().invoke(cli, ["info", str(folder / "s")]).output
    assert "examples      20 in 3 shards" in text and "complete" in text.splitlines()[0]


def test_verify_exit_codes_and_damage(built, tmp_path):
    import shutil

    folder, _ = built
    assert run_cli("verify", str(folder / "s")).returncode == 0
    assert run_cli("verify", str(folder / "s"), "--model", "x").returncode == 2
    damaged = tmp_path / "damaged"
    shutil.copytree(folder / "s", damaged)
    target = damaged / "rejected_ids" / "values" / "c" / "1"
    data = bytearray(target.read_bytes())
    data[5] ^= 0x10
    target.write_bytes(bytes(data))
    out = run_cli("verify", str(damaged))
    assert out.returncode == 1
    assert "  problem: damaged file rejected_ids/values/c/1: shard 1, 8 examples (pair-8, pair-9, pair-10 and 5 more)" \
        in out.stdout
    report = json.loads(run_cli("verify", str(damaged), "--json").stdout)
    assert report["ok"] is False and report["damaged_examples"] == [f"pair-{i}" for i in range(8, 16)]


@pytest.mark.slow  # a CLI subprocess loading the model
def test_verify_recomputes_a_sample_with_the_model(built, mistral_model):
    folder, data = built
    out = run_cli("verify", str(folder / "s"), "--model", str(mistral_model), "--data", str(data), "--sample", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("sound")


def test_export_values_equal_store_values(built, tmp_path):
    import datasets

    folder, data = built
    store = logitstore.open(folder / "s")
    result = CliRunner().invoke(cli, ["export", str(folder / "s"), "--to", "trl", "--data", str(data), "--out",
                                      str(tmp_path / "trl")])
    assert result.exit_code == 0, result.output
    ds = datasets.load_from_disk(str(tmp_path / "trl"))
    got = store.get(list(ds["id"]))
    assert np.array_equal(np.array(ds["ref_chosen_logps"], dtype=np.float32), got["chosen_logps"])
    assert np.array_equal(np.array(ds["ref_rejected_logps"], dtype=np.float32), got["rejected_logps"])
    for to, name in (("jsonl", "e.jsonl"), ("parquet", "e.parquet")):
        assert CliRunner().invoke(cli, ["export", str(folder / "s"), "--to", to, "--data", str(data), "--out",
                                        str(tmp_path / name)]).exit_code == 0
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["ref_chosen_logps"] for r in rows] == [float(v) for v in store.get([r["id"] for r in rows])["chosen_logps"]]
    again = run_cli("export", str(folder / "s"), "--to", "jsonl", "--data", str(data), "--out", str(tmp_path / "e.jsonl"))
    assert (again.returncode, again.stderr.strip()) == (1, f"Error: {tmp_path / 'e.jsonl'} already exists; choose a new path")


def test_errors_are_one_line_with_exit_1_and_usage_errors_exit_2(tmp_path):
    missing = run_process("info", str(tmp_path / "nothing"))
    assert (missing.returncode, missing.stderr) == (1, f"Error: no logitstore store at {tmp_path / 'nothing'}\n")
    usage = run_process("export", "x", "--to", "csv", "--data", "d", "--out", "o")
    assert usage.returncode == 2 and "Invalid value for '--to'" in usage.stderr
    unknown = run_process("frobnicate")
    assert unknown.returncode == 2


@pytest.mark.slow  # a TRL training step
def test_trl_adapter_gives_ln2_at_step_zero_without_a_reference_pass(built, mistral_model, tmp_path):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreDPOTrainer

    folder, data = built
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(mistral_model), dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=64, bf16=False,
                     use_cpu=True, per_device_train_batch_size=4, max_steps=1, logging_steps=1, report_to=[],
                     learning_rate=1e-3, save_strategy="no", dataset_num_proc=None)
    calls = []
    trainer = StoreDPOTrainer(store=str(folder / "s"), model=model, args=args,
                              processing_class=load_tokenizer(mistral_model),
                              train_dataset=datasets.Dataset.from_list(rows),
                              peft_config=LoraConfig(r=4, target_modules="all-linear"))
    original = trainer.compute_ref_log_probs
    trainer.compute_ref_log_probs = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/margins"]) < 1e-5
    assert calls == []  # no reference forward pass ran


@pytest.mark.slow  # the demo in a subprocess
def test_console_script_and_demo_end_to_end(tmp_path):
    out = subprocess.run(["logitstore", "demo", "--out", str(tmp_path / "demo"), "--pairs", "40", "--steps", "4",
                          "--quiet"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("1/4 Made a tiny model") and lines[3].startswith("4/4 Trained 4 steps: loss 0.6931 ")
    assert "3/4 Verified" in lines[2] and lines[2].endswith("sound.")
    assert (tmp_path / "demo" / "run" / "metrics.png").is_file()
    run = tmp_path / "demo" / "run"
    assert lines[-1] == (f"Files: stores {tmp_path / 'demo' / 'train.lstore'}, {tmp_path / 'demo' / 'eval.lstore'}; "
                         f"adapter {run / 'adapter'} (the one with the lowest eval loss: {run / 'best'}); metrics "
                         f"{run / 'metrics.jsonl'}; plot {run / 'metrics.png'}")
    assert (run / "best" / "adapter_model.safetensors").is_file()
