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
    gpu.write_section(doc, f"{gpu.BEGIN}\nfirst\n{gpu.END}\n")
    gpu.write_section(doc, f"{gpu.BEGIN}\nsecond\n{gpu.END}\n")
    assert doc.read_text() == f"# Benchmarks\n\nbefore\n\n{gpu.BEGIN}\nsecond\n{gpu.END}\n"
