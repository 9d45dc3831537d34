"""benchmarks/distill_memory.py in its --smoke mode (a small model, 2 steps), so the script behind docs/teacher.md's
memory figures cannot rot: the trainer's slices and whole logits both run, and whole logits hold more (every
objective's training is tested in tests/test_distill_train.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_distill_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_memory.py"), "--smoke", "--work",
                           str(tmp_path), "--json", str(out), "--objective", "distill", "--objective",
                           "distill, whole logits"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = {r["objective"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(results) == ["distill", "distill, whole logits"]
    assert all(r["peak_rss_bytes"] > 100e6 and r["tracked_peak_bytes"] > 0 for r in results.values())
    assert results["distill, whole logits"]["tracked_peak_bytes"] > results["distill"]["tracked_peak_bytes"]
