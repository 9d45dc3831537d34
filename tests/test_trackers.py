"""`logitstore train --report-to`: TRL's metric names, what each tracker holds (read back with its own reader), the
rank that reports, and the lines a user meets when a tracker is unknown or its library missing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logitstore.dpo.training.trackers import (TrackerError, TrackerStartError, open_trackers, parse_report_to,
                                              tracker_names, trl_names)

from cli_process import run_cli
from sample_data import implicit_rows, write_jsonl
from test_cli_edges import run_main

DPO_RECORD = {"step": 10, "epoch": 0, "logps/chosen": -40.5, "logps/rejected": -42.25, "loss": 0.69,
              "rewards/accuracies": 0.5, "rewards/chosen": 0.01, "rewards/margins": 0.02, "rewards/rejected": -0.01,
              "learning_rate": 5e-5, "grad_norm": 1.5, "tokens_per_second": 100.0, "step_seconds": 0.5,
              "loader_seconds": 0.01, "peak_memory_gib": 0.5, "peak_memory_kind": "CPU, peak RSS",
              "eval/loss": 0.7, "eval/rewards_chosen": 0.03, "eval/rewards_accuracies": 0.75,
              "eval/logps_chosen": -41.0}


def test_trl_names_are_trls_and_trackers_see_them_as_transformers_callbacks_send_them():
    assert trl_names(DPO_RECORD) == {
        "epoch": 0.0, "logps/chosen": -40.5, "logps/rejected": -42.25, "loss": 0.69, "rewards/accuracies": 0.5,
        "rewards/chosen": 0.01, "rewards/margins": 0.02, "rewards/rejected": -0.01, "learning_rate": 5e-5,
        "grad_norm": 1.5, "tokens_per_second": 100.0, "step_seconds": 0.5, "loader_seconds": 0.01,
        "peak_memory_gib": 0.5, "eval_loss": 0.7, "eval_rewards/chosen": 0.03, "eval_rewards/accuracies": 0.75,
        "eval_logps/chosen": -41.0}
    assert sorted(tracker_names(DPO_RECORD)) == [
        "eval/logps/chosen", "eval/loss", "eval/rewards/accuracies", "eval/rewards/chosen", "train/epoch",
        "train/grad_norm", "train/learning_rate", "train/loader_seconds", "train/logps/chosen",
        "train/logps/rejected", "train/loss", "train/peak_memory_gib", "train/rewards/accuracies",
        "train/rewards/chosen", "train/rewards/margins", "train/rewards/rejected", "train/step_seconds",
        "train/tokens_per_second"]
    # KTO's and distill's own metrics: an evaluation name whose training metric has a `/` gets it back
    kto = {"step": 1, "loss": 0.5, "kl": 0.1, "delta": 0.2, "eval/kl": 0.3, "eval/distill_loss": 0.4,
           "distill/loss": 0.6}
    assert trl_names(kto) == {"loss": 0.5, "kl": 0.1, "delta": 0.2, "eval_kl": 0.3, "eval_distill/loss": 0.4,
                              "distill/loss": 0.6}


@pytest.mark.parametrize("given,names", [
    ((), ()), (("none",), ()), (("none", "none"), ()), (("wandb,tensorboard",), ("tensorboard", "wandb")),
    (("trackio", "tensorboard"), ("tensorboard", "trackio")), (("wandb", "wandb"), ("wandb",))])
def test_report_to_takes_repeats_and_commas(given, names):
    assert parse_report_to(given) == names


def test_an_unknown_tracker_is_a_usage_error_listing_the_choices(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--model", "m", "--store", "s", "--out", str(tmp_path / "r"),
                            "--report-to", "tensorbord")
    assert code == 2
    assert err.splitlines()[-1] == ("Error: Invalid value for '--report-to': unknown tracker 'tensorbord'; choose "
                                    "from tensorboard, trackio, wandb or none")
    with pytest.raises(TrackerError, match="^none reports to no tracker and cannot be combined with wandb$"):
        parse_report_to(["none,wandb"])


@pytest.mark.parametrize("tracker", ["tensorboard", "trackio", "wandb"])
def test_a_missing_tracker_library_names_its_extra_before_anything_loads(tracker, capsys, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    code, out, err = run_main(capsys, "train", "--model", str(tmp_path / "no-model"), "--store", "s", "--out",
                              str(tmp_path / "r"), "--report-to", tracker)
    assert (code, out) == (1, "")
    assert err == (f"Error: this command needs {tracker}, which this install leaves out: "
                   f"pip install 'logitstore[{tracker}]'\n")
    assert not (tmp_path / "r").exists()


def test_only_the_main_rank_opens_trackers_and_credentials_are_not_sent(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    other = open_trackers(["tensorboard"], tmp_path, {"lr": 0.1}, main=False)
    other.log(DPO_RECORD, 10)
    other.close()
    assert not (tmp_path / "tb").exists()
    trackers = open_trackers(["tensorboard"], tmp_path, {"lr": 0.1, "storage_options": {"secret": "s3cr3t"}})
    trackers.log(DPO_RECORD, 10)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    args = json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0])
    assert args == {"lr": 0.1}
    assert [(e.step, e.value) for e in events.Scalars("eval/rewards/chosen")] == [(10, np.float32(0.03))]


def test_a_tracker_that_cannot_start_is_one_line_saying_what_to_do(capsys, tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no account
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    with pytest.raises(TrackerStartError) as caught:
        open_trackers(["tensorboard", "wandb"], tmp_path / "run", {"lr": 0.1})
    assert str(caught.value) == (
        "--report-to wandb could not start a run: No API key configured. Use `wandb login` to log in. "
        "(WANDB_MODE=offline keeps the run in RUN/wandb with no account; `wandb sync` uploads it later)")


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _trackio_logs(trackio_dir: Path, run: str) -> list[dict]:
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            f"print(json.dumps(SQLiteStorage.get_logs('logitstore', {run!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wandb_history(run_dir: Path) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    done = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir / "wandb" / "latest-run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


@pytest.mark.slow  # a training run in a subprocess with three trackers
def test_each_tracker_holds_every_logged_step_of_metrics_jsonl(byte_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [sys.executable, "-m", "logitstore.cli.main"]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    env.pop("WANDB_PROJECT", None)
    for name, rows in (("train", implicit_rows(16)), ("eval", implicit_rows(4))):  # the stores: in this process
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        built = run_cli("build", "--model", str(byte_model), "--data", str(data), "--out",
                        str(tmp_path / f"{name}.lstore"), "--max-length", "256", "--quiet")
        assert built.returncode == 0, built.stderr
    run = tmp_path / "run"
    done = subprocess.run([*common, "train", "--model", str(byte_model), "--store", str(tmp_path / "train.lstore"),
                           "--eval-store", str(tmp_path / "eval.lstore"), "--out", str(run), "--max-steps", "5",
                           "--batch-size", "2", "--log-every", "2", "--eval-every", "2",
                           "--report-to", "tensorboard,trackio", "--report-to", "wandb", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("Trained 5 steps;")  # --quiet: the trackers' chatter is off
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    assert "eval/loss" in records[1] and "eval/loss" in records[2] and "eval/loss" not in records[3]
    expected = {r["step"]: tracker_names(r) for r in records}
    assert expected[2]["eval/rewards/accuracies"] == records[1]["eval/rewards_accuracies"]

    [logdir] = (run / "runs").iterdir()
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    board: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            board.setdefault(event.step, {})[tag] = event.value
    assert sorted(board) == sorted(expected)
    for step, values in expected.items():  # event files hold float32
        assert sorted(board[step]) == sorted(values)
        assert all(_same(board[step][k], float(np.float32(v))) for k, v in values.items()), step

    logs = {entry["step"]: entry for entry in _trackio_logs(tmp_path / "trackio", "run")}
    assert sorted(logs) == sorted(expected)
    for step, values in expected.items():
        assert logs[step]["train/global_step"] == step
        assert all(_same(logs[step][k], v) for k, v in values.items()), step

    history = {item["train/global_step"]: item for item in _wandb_history(run)}
    assert sorted(history) == sorted(expected)
    for step, values in expected.items():
        assert history[step]["_step"] == step
        assert all(_same(history[step][k], v) for k, v in values.items()), step
