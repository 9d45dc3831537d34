"""benchmarks/memory.py in its --smoke mode (a tiny model, 2 steps): the CPU training-memory comparison with TRL and
the breakdown of a step's peak run end to end, so the script behind docs/benchmarks.md's figures cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{args[0]}.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), *args, "--smoke", "--work",
                           str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path):
    compare = run(tmp_path, "compare")
    for trainer in ("logitstore", "trl"):
        r = compare[trainer]
        assert r["steps"] == 2 and abs(r["loss_first"] - math.log(2)) < 1e-5 and r["peak_rss_bytes"] > 100e6
    breakdown = run(tmp_path, "breakdown")
    ours, trl = breakdown["logitstore"], breakdown["trl"]
    # The same model and adapter on both sides, counted from the tensors.
    assert ours["held"]["weights"] == trl["held"]["weights"] > 0
    assert ours["held"]["adapter weights"] == trl["held"]["adapter weights"] > 0
    assert sum(ours["pieces"].values()) == ours["tracked_peak_bytes"] > 0
    assert ours["pieces"]["activations saved for backward"] > 0 and ours["pieces"]["logits / log-softmax"] > 0
    # Rendering refuses smoke figures: they are not the benchmark's setting.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "render", str(tmp_path / "compare.json"),
                           str(tmp_path / "breakdown.json"), "--doc", str(tmp_path / "doc.md")], capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stderr.strip() == (
        "benchmarks/memory.py: these results are not from the benchmark's setting (--smoke?)")


def test_memory_section_renders_before_and_after():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    setting = json.loads(json.dumps(memory.SETTING))

    def compare(ours_rss: float, trl_rss: float) -> dict:
        return {"setting": setting, "logitstore": {"peak_rss_bytes": ours_rss, "step_seconds": 2.0, "loss_first": 0.5},
                "trl": {"peak_rss_bytes": trl_rss, "step_seconds": 4.0, "loss_first": 0.5}}

    def breakdown(logits: int) -> dict:
        side = {"tracked_peak_bytes": 3_000_000_000 + logits,
                "pieces": {"activations saved for backward": 3_000_000_000, "logits / log-softmax": logits},
                "held": {"weights": 300_000_000, "adapter weights": 4_000_000}}
        return {"setting": setting, "logitstore": side, "trl": side}

    text = memory.render(compare(6e9, 8e9), breakdown(100_000_000), compare(8e9, 8e9), breakdown(1_300_000_000))
    assert "| logitstore train, before | 8.00 GB | 1.00x | 2.0 s | 0.50x | 0.500000 |" in text
    assert "| logitstore train, after | 6.00 GB | 0.75x | 2.0 s | 0.50x | 0.500000 |" in text
    assert "| logits / log-softmax | 1.300 GB | 0.100 GB | 0.100 GB |" in text
    assert "| **tensors at the peak** | **4.60 GB** | **3.40 GB** | **3.40 GB** |" in text
    assert "| interpreter, libraries, allocator slack | 3.40 GB | 2.60 GB | 4.60 GB |" in text


@pytest.mark.slow
def test_long_table_smoke_with_a_training_option(tmp_path):
    """`long` (issue 26's setting: gradient checkpointing on both sides, TRL with precompute_ref_log_probs) passes a
    training option through to logitstore's run and keeps the step-0 loss at ln 2."""
    table = run(tmp_path, "long", "--train-option", "split_sequences=true", "--train-option", "mlp_chunk=16")
    assert table["setting"]["gradient_checkpointing"] and table["setting"]["precompute_ref"]
    assert table["setting"]["train_options"] == {"split_sequences": True, "mlp_chunk": 16}
    (row,) = table["rows"]
    for trainer in ("logitstore", "trl"):
        assert abs(row[trainer]["loss_first"] - math.log(2)) < 1e-5 and row[trainer]["peak_rss_bytes"] > 100e6


def test_long_section_renders_each_option_set():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def table(options: dict, ours: float) -> dict:
        setting = {**{k: v for k, v in memory.LONG.items() if k != "max_length"}, "train_options": options}
        row = {"setting": {**setting, "max_length": 2048}, "rss_ratio": ours / 8 * 2**30 / 2**30,
               "logitstore": {"peak_rss_bytes": ours * 2**30, "step_seconds": 30.0},
               "trl": {"peak_rss_bytes": 8 * 2**30, "step_seconds": 40.0}}
        return {"setting": setting, "rows": [row]}

    text = memory.render_long([table({}, 4.0), table({"split_sequences": True, "mlp_chunk": 256}, 2.4)])
    assert "| default | 2,048 | 4.00 | 8.00 | 0.50x | 30.0 s | 40.0 s |" in text
    assert "| --split-sequences --mlp-chunk 256 | 2,048 | 2.40 | 8.00 | 0.30x | 30.0 s | 40.0 s |" in text
