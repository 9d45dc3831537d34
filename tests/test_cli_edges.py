"""What a new user meets first: options checked before anything is written, Ctrl-C, missing extras, help texts,
and shards small enough that an interruption loses little."""

from __future__ import annotations

import importlib.util

import click
import numpy as np
import pytest

import logitstore
from logitstore import format as fmt
from logitstore.cli.main import cli, main

from cli_process import run_cli
from sample_data import implicit_rows, write_jsonl


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process: (exit status, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_has_help(name):
    missing = [p.opts[0] for p in cli.commands[name].params if isinstance(p, click.Option) and not p.help]
    assert missing == []


# ---- nothing is written before the inputs and extras are checked ----------------------------------------------

@pytest.fixture
def no_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a))


def test_quantize_without_bitsandbytes_writes_nothing(byte_model, tmp_path, capsys, no_bitsandbytes):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    out = tmp_path / "s"
    code, _, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out", str(out),
                            "--quantize", "4bit", "--quiet")
    assert (code, err) == (1, "Error: --quantize 4bit needs bitsandbytes, which is not installed: pip install "
                              "'logitstore[quantize]'\n")
    assert not out.exists()
    code, _, _ = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out", str(out),
                          "--max-length", "256", "--quiet")
    assert code == 0 and logitstore.open(out).complete  # the same path, without --quantize: nothing in the way


def test_train_with_an_8bit_optimizer_without_bitsandbytes_writes_nothing(byte_model, tmp_path, capsys,
                                                                          no_bitsandbytes):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(4))
    assert run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                    str(tmp_path / "s"), "--max-length", "256", "--quiet")[0] == 0
    code, _, err = run_main(capsys, "train", "--model", str(byte_model), "--store", str(tmp_path / "s"), "--out",
                            str(tmp_path / "run"), "--optimizer", "paged_adamw_8bit", "--quiet")
    assert (code, err) == (1, "Error: --optimizer paged_adamw_8bit needs bitsandbytes, which is not installed: pip "
                              "install 'logitstore[quantize]'\n")
    assert not (tmp_path / "run").exists()


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, line", [
    ("build", "Interrupted; run the same command again to resume: committed shards are kept, only the shard in "
              "progress is redone."),
    ("train", "Interrupted; checkpoints written with --save-every are kept; add --resume to continue from the "
              "latest."),
])
def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tmp_path, command, line):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("logitstore.dpo.reference.build", interrupted)
    monkeypatch.setattr("logitstore.dpo.training.train", interrupted)
    monkeypatch.setattr("logitstore.dpo.objectives.objective.objective_of", lambda cfg: None)
    args = {"build": ["--data", str(tmp_path / "d.jsonl")], "train": ["--store", str(tmp_path / "s")]}[command]
    code, _, err = run_main(capsys, command, "--model", "m", "--out", str(tmp_path / "o"), *args)
    assert code == 130 and err.strip() == line


def test_ctrl_c_elsewhere_is_one_line(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("logitstore.describe.describe", interrupted)
    logitstore.create(tmp_path / "s", ["a"], fingerprint={}, vocab_size=10, max_length=4)
    code, _, err = run_main(capsys, "info", str(tmp_path / "s"))
    assert code == 130 and err.strip() == "Interrupted."


# ---- shards sized by the model work in them ----------------------------------------------------------------------

@pytest.mark.parametrize("mean, rows", [(1, 1024), (100, 1024), (256, 1024), (257, 1020), (1000, 262),
                                        (4096, 64), (1 << 20, 8)])
def test_build_shards_hold_about_2_to_the_18_positions(mean, rows):
    assert fmt.build_rows_per_shard(np.full(10, mean)) == rows


def test_a_default_build_sizes_its_shards_from_the_data(byte_model, tmp_path, capsys):
    rows = [{"id": f"p{i}", "prompt": "x" * 900, "chosen": "y" * 60, "rejected": "z" * 40} for i in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, _, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                            str(tmp_path / "s"), "--max-length", "1024", "--quiet")
    assert code == 0, err
    store = logitstore.open(tmp_path / "s")
    offsets = {f: np.diff(store.offsets(f), axis=1)[:, 0] for f in fmt.TOKEN_FIELDS}
    positions = 2 * offsets["prompt_ids"] + offsets["chosen_ids"] + offsets["rejected_ids"]
    assert store.header["rows_per_shard"] == fmt.build_rows_per_shard(positions) == 137  # 2^18 // 1902
    assert store.fingerprint["layout"]["rows_per_shard"] == 137
    again = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                     str(tmp_path / "s"), "--max-length", "1024")
    assert again[0] == 0 and "is already complete" in again[1]  # the same data resolves the same size


# ---- missing extras, demo, verify ----------------------------------------------------------------------------------

def test_a_missing_s3fs_behind_fsspec_names_the_remote_extra(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)  # importing s3fs now fails as if it were not installed
    code, _, err = run_main(capsys, "info", "s3://bucket/pairs.lstore")
    assert (code, err) == (1, "Error: this command needs s3fs, which this install leaves out: pip install "
                              "'logitstore[remote]'\n")


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, "demo", "--out", str(tmp_path), "--quiet")
    assert (code, err) == (1, f"Error: {tmp_path} holds 'notes.txt', which no demo writes; the demo replaces only an "
                              "earlier demo's folder: choose another --out\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow  # two demos
def test_demo_says_what_it_replaces(tmp_path, capsys):
    assert run_main(capsys, "demo", "--out", str(tmp_path / "d"), "--pairs", "20", "--steps", "1", "--quiet")[0] == 0
    code, out, _ = run_main(capsys, "demo", "--out", str(tmp_path / "d"), "--pairs", "20", "--steps", "1", "--quiet")
    assert code == 0
    assert out.splitlines()[0] == (f"Replacing the earlier demo in {tmp_path / 'd'} (eval.jsonl, eval.lstore, model, "
                                   "run, train.jsonl, train.lstore).")


def test_verify_of_a_missing_path_exits_1_as_its_help_says(tmp_path, capsys):
    code, out, _ = run_main(capsys, "verify", "--help")
    assert "1 problems found, or no store at STORE; 2 usage error" in " ".join(out.split())
    code, _, err = run_main(capsys, "verify", str(tmp_path / "nothing"))
    assert (code, err) == (1, f"Error: no logitstore store at {tmp_path / 'nothing'}\n")
    assert run_main(capsys, "verify", "--bogus")[0] == 2


def test_train_names_the_plot_last(byte_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(8))
    assert run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                    str(tmp_path / "s"), "--max-length", "256", "--quiet")[0] == 0
    code, out, err = run_main(capsys, "train", "--model", str(byte_model), "--store", str(tmp_path / "s"), "--out",
                              str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--quiet")
    assert code == 0, err
    assert out.splitlines()[-1].endswith(f"metrics in {tmp_path / 'run' / 'metrics.jsonl'} (plot: "
                                         f"{tmp_path / 'run' / 'metrics.png'}).")
    assert (tmp_path / "run" / "metrics.png").is_file()


@pytest.mark.slow
def test_train_prints_no_gradient_checkpointing_deprecation(byte_model, tmp_path):
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(8))
    common = [sys.executable, "-m", "logitstore.cli.main"]
    assert run_cli("build", "--model", str(byte_model), "--data", str(data), "--out", str(tmp_path / "s"),
                   "--max-length", "256", "--quiet").returncode == 0
    done = subprocess.run([*common, "train", "--model", str(byte_model), "--store", str(tmp_path / "s"), "--out",
                           str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--gradient-checkpointing"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "is_gradient_checkpointing" not in done.stderr and "FutureWarning" not in done.stderr


def test_gitignore_covers_what_the_readme_commands_write():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ignored = (root / ".gitignore").read_text().split()
    for name in ["pairs.lstore", "run", "pairs-trl", "demo-out", "train-v2.jsonl", "pairs-v2.lstore", "flagged.txt",
                 "clean.lstore", "eval.lstore", "all.lstore", "example.lstore", ".venv"]:
        assert f"/{name}/" in ignored or f"/{name}" in ignored or f"{name}/" in ignored, name


def test_two_builds_with_source_date_epoch_are_byte_identical(byte_model, tmp_path, capsys, monkeypatch):
    import hashlib

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(12))
    digests, files = [], []
    for name in ("a", "b"):
        code, out, err = run_main(capsys, "build", "--model", str(byte_model), "--data", str(data), "--out",
                                  str(tmp_path / name), "--max-length", "256", "--per-token", "--rows-per-shard", "5")
        assert code == 0, err
        digests.append(out.splitlines()[-1].rsplit(" ", 3)[1:])
        files.append({p.relative_to(tmp_path / name).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert digests[0] == digests[1] == ["Store", "digest:", logitstore.open(tmp_path / "a").digest]
    assert files[0] == files[1] and len(files[0]) == 3 * 16 + 4 + 28  # shard and commit files, plan files, documents
    assert logitstore.open(tmp_path / "a").header["created"] == "2023-11-14T22:13:20+00:00"


@pytest.mark.slow  # two CLI builds in subprocesses
def test_a_build_interrupted_after_a_shard_keeps_it_and_resumes(byte_model, tmp_path):
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(12))
    command = [sys.executable, "-m", "logitstore.cli.main", "build", "--model", str(byte_model), "--data", str(data),
               "--out", str(tmp_path / "s"), "--max-length", "256", "--rows-per-shard", "4", "--quiet"]
    env = {**os.environ, "LOGITSTORE_FAULT": "after-commit:1", "LOGITSTORE_FAULT_SIGNAL": "SIGINT"}
    stopped = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1] == (
        "Interrupted; run the same command again to resume: committed shards are kept, only the shard in progress "
        "is redone.")
    assert logitstore.open(tmp_path / "s").missing_shards == [2]
    again = run_cli(*command[3:])
    assert again.returncode == 0 and again.stdout.startswith("Resuming ")
    assert "1 shard written" in again.stdout and logitstore.verify(tmp_path / "s").ok
