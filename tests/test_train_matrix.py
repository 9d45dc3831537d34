"""Every store kind trains every loss family it supports through `logitstore train` as a user runs it (the plot on,
its default): each run exits 0, ends with its one-line summary, and writes metrics.jsonl with the kind's metrics and
metrics.png with the kind's panels."""

from __future__ import annotations

import json
import math
import re
import struct

import pytest

from cli_process import run_cli

EVERY_RUN = {"epoch", "grad_norm", "learning_rate", "loader_seconds", "loss", "peak_memory_gib", "peak_memory_kind",
             "step", "step_seconds", "tokens_per_second"}
PAIRS = {"logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/margins",
         "rewards/rejected"}
UNPAIRED = {"kl", "logps", "rewards/chosen", "rewards/rejected"}

# store, --loss, the metrics the run logs besides EVERY_RUN, the plot's panels
MATRIX = [
    ("pairs-top-k", "sigmoid", PAIRS, 3),
    ("pairs-top-k", "sigmoid,distill", PAIRS | {"distill/loss"}, 3),
    ("pairs-top-k", "tdpo2", PAIRS | {"tdpo/seq_kl_chosen", "tdpo/seq_kl_rejected"}, 3),
    ("unpaired", "kto", UNPAIRED, 3),
    ("unpaired", "bco", UNPAIRED | {"delta"}, 3),
    ("completion-top-k", "distill", {"distill/loss", "logps"}, 2),
    ("completion-sampled", "distill", {"distill/loss", "logps"}, 2),
]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("store,loss,metrics,panels", MATRIX, ids=[f"{s}-{x}" for s, x, _, _ in MATRIX])
def test_every_kind_trains_each_loss_it_supports(kind_stores, byte_model, tmp_path, store, loss, metrics, panels):
    run = tmp_path / "run"
    done = run_cli("train", "--model", str(byte_model), "--store", str(kind_stores[store]), "--out", str(run),
                   "--loss", loss, "--max-steps", "2", "--batch-size", "4", "--log-every", "1")
    assert done.returncode == 0, done.stderr
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    for row in history:
        assert set(row) == EVERY_RUN | metrics
        assert all(math.isfinite(v) for k, v in row.items() if k != "peak_memory_kind")
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"Trained 2 steps; last logged loss {history[-1]['loss']:.4f}\. Peak memory \d+\.\d\d GiB \(CPU, peak "
        rf"RSS\)\. Adapter in {re.escape(str(run / 'adapter'))}, metrics in "
        rf"{re.escape(str(run / 'metrics.jsonl'))} \(plot: {re.escape(str(run / 'metrics.png'))}\)\.", summary), summary
    # One panel per curve the kind has, 13/3 inches wide each at 110 dpi (dpo/training/plot.py).
    assert png_size(run / "metrics.png") == (int(13 * panels / 3 * 110), 396)
