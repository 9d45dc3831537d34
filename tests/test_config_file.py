"""`--config FILE`: options from YAML, the command line over it, one line for a key or value that cannot be used,
the README's worked example the same both ways, and a store built from a file the same as one built from flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import logitstore
from logitstore.cli.main import cli

from sample_data import implicit_rows, write_jsonl
from test_cli_edges import run_main

ROOT = Path(__file__).resolve().parent.parent


def params(command: str, args: list[str]) -> dict:
    """What the command hands its config: each option's resolved value."""
    with cli.commands[command].make_context(command, list(args)) as ctx:
        return dict(ctx.params)


def test_readme_worked_example_is_the_same_run_from_flags_and_from_its_yaml_file(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Worked example"):]
    section = section[:section.index("What each choice does")]
    shell = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [shlex.split(line) for block in shell for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("logitstore train")]
    flags, from_file = commands[0], commands[-1]
    assert from_file == ["logitstore", "train", "--config", "run.yaml"]
    (tmp_path / "run.yaml").write_text(re.search(r"```yaml\n# run\.yaml\n(.*?)```", section, re.S).group(1))
    assert params("train", flags[2:]) == params("train", ["--config", str(tmp_path / "run.yaml")])
    assert params("train", flags[2:])["optimizer"] == "paged_adamw_8bit"


def test_the_command_line_overrides_the_file_and_keys_take_either_spelling(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: ./tiny\nstore: pairs.lstore\nout: run\nmax-steps: 100\nbatch_size: 8\nlr: 5e-6\n"
                      "lora: false\nno-lora: true\nloss: [sigmoid, sft]\nloss-weights: [1, 0.5]\n"
                      "report-to: [tensorboard, wandb]\nstorage-option: []\n".replace("lora: false\n", ""))
    got = params("train", ["--config", str(config), "--max-steps", "7", "--out", "other"])
    flags = params("train", ["--model", "./tiny", "--store", "pairs.lstore", "--out", "other", "--max-steps", "7",
                             "--batch-size", "8", "--lr", "5e-6", "--no-lora", "--loss", "sigmoid,sft",
                             "--loss-weights", "1,0.5", "--report-to", "tensorboard,wandb"])
    assert got == flags
    assert (got["max_steps"], got["out"], got["lora"], got["loss_weights"]) == (7, "other", False, [1.0, 0.5])


def test_build_flags_from_a_file(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("model: m\ndata: d.jsonl\nout: s.lstore\nno-length-bucketing: true\nprompt-sharing: true\n"
                      "max_length: 64\nreuse: old.lstore\nmax-memory: [0=1GiB, cpu=2GiB]\nquiet: true\n")
    got = params("build", ["--config", str(config), "--no-prompt-sharing"])
    assert {k: got[k] for k in ("length_bucketing", "share_prompt", "max_length", "reuse", "max_memory", "quiet")} \
        == {"length_bucketing": False, "share_prompt": False, "max_length": 64, "reuse": ("old.lstore",),
            "max_memory": ("0=1GiB", "cpu=2GiB"), "quiet": True}


@pytest.mark.parametrize("text,line", [
    ("model: m\nmax-lenght: 12\n", "unknown key 'max-lenght'; keys are the options of `logitstore train` (see --help)"),
    ("batch-sise: 2\n", "unknown key 'batch-sise' (did you mean batch-size?); keys are the options of "
                        "`logitstore train` (see --help)"),
    ("debug: true\n", "unknown key 'debug'; keys are the options of `logitstore train` (see --help)"),
    ("max-steps: 1.5\n", "max-steps: expected an integer, got 1.5"),
    ("max_steps: many\n", "max_steps: 'many' is not a valid integer range."),
    ("max-steps: 0\n", "max-steps: 0 is not in the range x>=1."),
    ("lr: fast\n", "lr: 'fast' is not a valid float."),
    ("lora: 1\n", "lora: expected true or false, got 1"),
    ("dtype: true\n", "dtype: 'true' is not one of 'auto', 'float32', 'bfloat16', 'float16'."),
    ("revision: yes\n", "revision: expected text, got true (quote it to mean the word)"),
    ("model: [a, b]\n", "model: expected one value, got a YAML list"),
    ("max-steps: 1\nmax_steps: 2\n", "max_steps: max_steps is already set in this file"),
    ("a: [1\n", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
    ("- a\n", "expected a mapping of option names to values, got a YAML list"),
])
def test_a_key_or_value_that_cannot_be_used_is_one_line_naming_it(text, line, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, out, err = run_main(capsys, "train", "--config", str(config))
    assert (code, out, err) == (2, "", f"Error: {config}: {line}\n")


def test_a_missing_file_is_one_line(tmp_path, capsys):
    code, _, err = run_main(capsys, "build", "--config", str(tmp_path / "nothing.yaml"))
    assert (code, err) == (2, f"Error: {tmp_path / 'nothing.yaml'}: cannot be read (No such file or directory)\n")


def test_an_empty_file_sets_nothing(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "empty.yaml"))
    assert code == 2 and err.splitlines()[-1] == "Error: Missing option '--model'."


def test_a_store_built_from_a_file_records_the_settings_of_the_same_flags(byte_model, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(6))
    flags = ["--model", str(byte_model), "--data", str(data), "--max-length", "128", "--rows-per-shard", "4",
             "--per-token", "--quiet"]
    assert run_main(capsys, "build", *flags, "--out", str(tmp_path / "flags.lstore"))[0] == 0
    (tmp_path / "build.yaml").write_text(f"model: {byte_model}\ndata: {data}\nmax_length: 128\nrows-per-shard: 4\n"
                                         "per-token: true\nquiet: true\n")
    code, out, err = run_main(capsys, "build", "--config", str(tmp_path / "build.yaml"), "--out",
                              str(tmp_path / "file.lstore"))
    assert code == 0, err
    by_flags, by_file = logitstore.open(tmp_path / "flags.lstore"), logitstore.open(tmp_path / "file.lstore")
    assert by_file.header["settings"] == by_flags.header["settings"]
    assert by_file.header["max_length"] == 128 and by_file.digest == by_flags.digest
