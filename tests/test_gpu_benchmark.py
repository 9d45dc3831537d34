"""benchmarks/gpu.py in its --smoke mode: every stage of the GPU benchmark (model from Mistral-7B's config shrunk,
reference pass in both precisions, logitstore train and TRL DPOTrainer + peft in 4-bit) runs on CPU, so the script
that produces the GPU figures cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_smoke(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--work", str(tmp_path),
                           "--json", str(results)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads(results.read_text())
    assert r["smoke"] is True and r["device"] == "cpu"
    for stage in ("make_model", "reference_bf16", "reference_4bit", "train_logitstore", "train_trl"):
        assert "error" not in r[stage], (stage, r[stage])
    assert r["make_model"]["parameters"] == 4_170_048  # Mistral-7B's config with 2 layers of width 64
    for ref in (r["reference_bf16"], r["reference_4bit"]):
        assert ref["pairs"] == 8 and ref["positions"] == 2 * 8 * 128  # every sequence reaches the 128-token limit
        assert ref["sharing_max_abs_delta"] < 1e-3  # float32 on CPU: both scoring paths agree
    # Both trainers start where policy == reference.
    assert abs(r["train_logitstore"]["loss_first"] - math.log(2)) < 1e-5
    assert abs(r["train_trl"]["loss_first"] - math.log(2)) < 1e-5
    assert r["train_logitstore"]["steps"] == r["train_trl"]["steps"] == 3


def test_gpu_report_refuses_a_smoke_run(tmp_path):
    results = tmp_path / "smoke.json"
    results.write_text(json.dumps({"smoke": True}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--render", str(results),
                           "--doc", str(tmp_path / "doc.md")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "benchmarks/gpu.py: a --smoke run is not a measurement; render a GPU run"
    assert not (tmp_path / "doc.md").exists()


def test_gpu_report_section_is_replaced_in_place(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\nbefore\n")
    gpu.write_section(doc, f"{gpu.BEGIN}\nfirst\n{gpu.END}\n", gpu.BEGIN, gpu.END)
    gpu.write_section(doc, f"{gpu.BEGIN}\nsecond\n{gpu.END}\n", gpu.BEGIN, gpu.END)
    assert doc.read_text() == f"# Benchmarks\n\nbefore\n\n{gpu.BEGIN}\nsecond\n{gpu.END}\n"


@pytest.mark.slow
def test_max_length_sweep_smoke(tmp_path):
    """The 12 GiB length sweep's stages on a tiny model on CPU (no cap there): both trainers at both lengths."""
    results = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--max-length-sweep", "--smoke",
                           "--work", str(tmp_path), "--json", str(results)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sw = json.loads(results.read_text())["sweep"]
    assert sw["lengths"] == [64, 128] and sw["cap_gib"] is None
    for trainer in ("logitstore", "trl"):
        for length in ("64", "128"):
            run = sw[trainer][length]
            assert run["fits"] is True and run["steps"] == 2, (trainer, length, run)
            assert abs(run["loss_first"] - math.log(2)) < 1e-5
    assert sw["longest_logitstore"] == sw["longest_trl"] == 128


def test_sweep_report_names_the_longest_length_that_fits():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fit = {"fits": True, "peak_allocated_gib": 7.5}
    oom = {"fits": False, "error": "out of memory at step 1: peak memory 11.90 GiB"}
    results = {"device": "NVIDIA H200", "sweep": {"cap_gib": 12, "lengths": [1024, 2048, 3072], "batch_size": 2,
                                                  "steps": 2, "logitstore": {"1024": fit, "2048": fit, "3072": oom},
                                                  "trl": {"1024": fit, "2048": oom},
                                                  "longest_logitstore": 2048, "longest_trl": 1024}}
    text = gpu.render_sweep(results)
    assert "| 2,048 | 7.50 | out of memory |" in text and "| 3,072 | out of memory | not run |" in text
    assert "Longest that fits: logitstore 2048, TRL 1024 (2.0x)." in text


def test_snapshot_breakdown_replays_the_trace_to_its_peak():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memprofile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    head = [{"filename": "/x/dpo/model/head.py", "line": 1, "name": "head_logps"}]
    layer = [{"filename": "/x/transformers/models/mistral/modeling_mistral.py", "line": 1, "name": "forward"}]
    grad = [{"filename": "/x/torch/autograd/__init__.py", "line": 1, "name": "backward"}]
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": layer},
             {"action": "alloc", "addr": 2, "size": 50, "frames": head},
             {"action": "free_completed", "addr": 2, "size": 50, "frames": head},
             {"action": "alloc", "addr": 3, "size": 70, "frames": grad},  # the peak: 100 + 70
             {"action": "free_completed", "addr": 3, "size": 70, "frames": grad},
             {"action": "free_completed", "addr": 1, "size": 100, "frames": layer}]
    snapshot = {"device_traces": [trace],
                "segments": [{"blocks": [{"size": 400, "state": "active_allocated"}, {"size": 9, "state": "inactive"}]}]}
    out = memprofile.snapshot_breakdown(snapshot)
    assert out == {"tracked_peak_bytes": 170, "before_recording_bytes": 400,
                   "pieces": {"activations saved for backward": 100, "backward: gradients in flight": 70}}
