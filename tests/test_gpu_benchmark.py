"""benchmarks/gpu.py in its --smoke mode: every stage of the GPU benchmark (model from Mistral-7B's config shrunk,
reference pass in both precisions, logitstore train and TRL DPOTrainer + peft in 4-bit, the length sweep's binary
search) runs on CPU, so the script that produces the GPU figures cannot rot between GPU runs; a tiny --budget
shows it stopping cleanly at its time budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gpu_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu


def _run_gpu(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args], capture_output=True,
                          text=True, timeout=timeout)


def _ours_options() -> list[str]:
    """The memory options the script gives ours on CPU: those this CLI's `logitstore train --help` lists, less the
    GPU's own."""
    gpu = _gpu_module()
    return gpu.usable_options(gpu.OURS_MEMORY_OPTIONS, gpu.train_help(), cuda=False)["used"]


@pytest.mark.slow
def test_gpu_benchmark_all_smoke(tmp_path):
    """--all --smoke: every stage of every phase, on a tiny model on CPU, one JSON and its table under --out."""
    out = tmp_path / "out"
    done = _run_gpu("--all", "--smoke", "--work", str(tmp_path / "work"), "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads((out / "gpu-all-cpu-smoke.json").read_text())
    assert r["mode"] == "all" and r["smoke"] is True and r["device"] == "cpu" and r["finished"] is True
    assert r["budget_stop"] is False
    for stage in ("make_model", "store_seed", "reference_bf16", "reference_4bit", "train_logitstore", "train_trl",
                  "train_trl_frugal"):
        assert r[stage]["status"] == "ok" and "error" not in r[stage], (stage, r[stage])
    assert r["make_model"]["parameters"] == 4_170_048  # Mistral-7B's config with 2 layers of width 64
    for ref in (r["reference_bf16"], r["reference_4bit"]):
        assert ref["pairs"] == 8 and ref["positions"] == 2 * 8 * 128  # every sequence reaches the 128-token limit
        assert ref["sharing_max_abs_delta"] < 1e-3  # float32 on CPU: both scoring paths agree
    # Every trainer starts where policy == reference.
    for stage in ("train_logitstore", "train_trl", "train_trl_frugal"):
        assert abs(r[stage]["loss_first"] - math.log(2)) < 1e-5, stage
        assert r[stage]["steps"] == 3
    assert r["train_trl"]["trl_options"] == {"gradient_checkpointing": True, "precompute_ref_log_probs": False,
                                             "activation_offloading": False}
    assert r["train_trl_frugal"]["trl_options"] == {  # TRL's offloading needs an accelerator: off on CPU
        "gradient_checkpointing": True, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 2,
        "activation_offloading": False}
    used = _ours_options()
    assert r["ours_options"]["wanted"] == ["--split-sequences", "--mlp-chunk", "2048", "--offload-activations"]
    assert r["ours_options"]["used"] == used and "--offload-activations" not in used
    if used:
        memory = r["train_logitstore_memory"]
        assert memory["status"] == "ok" and memory["options"] == used
        assert abs(memory["loss_first"] - math.log(2)) < 1e-5
    else:
        assert r["train_logitstore_memory"] == {"status": "skipped: no memory option in this CLI"}
    sw = r["sweep"]
    assert sw["cap_gib"] is None and sw["batch_size"] == 1 and sw["steps"] == 2
    assert sw["logitstore"]["options"] == used
    for side in ("logitstore", "trl"):
        s = sw[side]
        assert s["candidates"] == [64] and s["order"] == [64] and s["complete"] is True
        assert s["longest_fits"] == 64 and s["bound"] == "top of range" and s["shortest_fails"] is None
        for run in s["probes"].values():
            assert run["status"] == "ok" and run["steps"] == 2 and abs(run["loss_first"] - math.log(2)) < 1e-5
    assert r["targets"]["sweep"]["ratio"] == 1.0 and len(r["targets"]["seed"]) == 2 * (1 + bool(used))
    table = (out / "gpu-all-cpu-smoke.md").read_text()
    assert table.startswith("<!-- gpu:begin -->") and "<!-- gpu-sweep:begin -->" in table
    assert "| TRL DPOTrainer + peft, most frugal |" in table and "| 64 | fits: " in table


@pytest.mark.parametrize("mode", ["all", pytest.param("seed", marks=pytest.mark.slow),
                                  pytest.param("sweep", marks=pytest.mark.slow)])
def test_gpu_benchmark_stops_at_its_budget(tmp_path, mode):
    """A budget spent before the model is made: every stage is recorded as skipped, the JSON and its table are
    whole, and a budget stop is not a failure. The default mode runs the same phases less the sweep."""
    out = tmp_path / "out"
    flags = {"all": ["--all"], "seed": [], "sweep": ["--max-length-sweep"]}[mode]
    done = _run_gpu(*flags, "--smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--budget", "1",
                    timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads((out / f"gpu-{mode}-cpu-smoke.json").read_text())
    assert r["mode"] == mode and ("sweep" in r) == (mode != "seed")
    assert r["budget_stop"] is True and r["finished"] is True and r["env"]["status"] == "ok"
    seed_stages = ("store_seed", "train_logitstore", "train_trl", "train_trl_frugal", "reference_4bit",
                   "reference_bf16")
    assert r["make_model"]["status"] == "skipped: budget"
    if mode == "sweep":  # --max-length-sweep: nothing of the other phases
        assert not set(seed_stages) & set(r)
    for stage in seed_stages if mode != "sweep" else ():
        assert r[stage]["status"] == "skipped: budget", (stage, r[stage])
    for side in ("logitstore", "trl") if mode != "seed" else ():
        assert r["sweep"][side]["candidates"] == [64]
        assert r["sweep"][side]["stopped"] == "skipped: budget at 64"
        assert r["sweep"][side]["longest_fits"] is None and r["sweep"][side]["complete"] is False
    table = (out / f"gpu-{mode}-cpu-smoke.md").read_text()
    if mode == "sweep":
        assert table.startswith("<!-- gpu-sweep:begin -->") and "skipped: budget" in table
    else:
        assert "| TRL DPOTrainer + peft, default (reference = adapter off) | skipped: budget |" in table
    assert not list(out.glob("*.tmp"))


def test_a_stage_past_the_budget_is_stopped():
    """The child is killed at its timeout (its whole session) and recorded as stopped, not failed."""
    gpu = _gpu_module()
    r = gpu.run_stage("sleep", {"seconds": 600}, timeout=2)
    assert r["status"] == "stopped: budget" and r["wall_seconds"] < 120


def test_binary_search_finds_the_longest_that_fits():
    gpu = _gpu_module()
    candidates = list(range(2048, 32768 + 1, 2048))
    for limit in (0, 2048, 10_000, 16384, 30_000, 32768):
        search, tried = gpu.bisect(candidates), []
        try:
            length = next(search)
            while True:
                tried.append(length)
                length = search.send(length <= limit)
        except StopIteration:
            pass
        fits = [n for n in tried if n <= limit]
        assert max(fits, default=0) == max((n for n in candidates if n <= limit), default=0), limit
        assert tried[0] == 16384 and len(tried) <= 5


def test_memory_options_are_those_the_cli_lists():
    gpu = _gpu_module()
    help_text = "  --split-sequences  Each sequence on its own.\n  --mlp-chunk N  ...\n  --offload-activations\n"
    options = ["--split-sequences", "--mlp-chunk", "2048", "--offload-activations"]
    assert gpu.usable_options(options, help_text, cuda=True)["used"] == options
    assert gpu.usable_options(options, help_text, cuda=False) == {
        "wanted": options, "used": ["--split-sequences", "--mlp-chunk", "2048"], "not_in_cli": [],
        "left_out_without_gpu": ["--offload-activations"]}
    assert gpu.usable_options(options, "  --mlp-chunks N\n  --split-sequences-x\n", cuda=True) == {
        "wanted": options, "used": [], "not_in_cli": ["--split-sequences", "--mlp-chunk", "--offload-activations"],
        "left_out_without_gpu": []}


def test_gpu_report_refuses_a_smoke_run(tmp_path):
    results = tmp_path / "smoke.json"
    results.write_text(json.dumps({"smoke": True}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--render", str(results),
                           "--doc", str(tmp_path / "doc.md")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "benchmarks/gpu.py: a --smoke run is not a measurement; render a GPU run"
    assert not (tmp_path / "doc.md").exists()


def test_gpu_report_section_is_replaced_in_place(tmp_path):
    gpu = _gpu_module()
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\nbefore\n")
    gpu.write_section(doc, f"{gpu.BEGIN}\nfirst\n{gpu.END}\n", gpu.BEGIN, gpu.END)
    gpu.write_section(doc, f"{gpu.BEGIN}\nsecond\n{gpu.END}\n", gpu.BEGIN, gpu.END)
    assert doc.read_text() == f"# Benchmarks\n\nbefore\n\n{gpu.BEGIN}\nsecond\n{gpu.END}\n"


def test_sweep_report_names_the_longest_length_that_fits():
    gpu = _gpu_module()
    fit = {"fits": True, "status": "ok", "peak_allocated_gib": 7.5, "step_seconds": 1.25}
    oom = {"fits": False, "status": "out of memory", "error": "out of memory at step 1: peak memory 11.90 GiB"}
    ours = {"candidates": [4096, 8192, 12288, 16384], "options": ["--split-sequences"],
            "probes": {"8192": fit, "12288": fit, "16384": oom}, "longest_fits": 12288, "shortest_fails": 16384,
            "bound": None, "complete": True}
    trl = {"candidates": [1024, 2048, 3072, 4096], "trl_options": {"activation_offloading": True},
           "probes": {"2048": fit, "3072": oom}, "longest_fits": 2048, "shortest_fails": 3072, "bound": None,
           "complete": False, "stopped": "skipped: budget at 1024"}
    results = {"device": "NVIDIA H100 80GB HBM3", "sweep": {"cap_gib": 12, "batch_size": 1, "steps": 2,
                                                           "logitstore": ours, "trl": trl}}
    text = gpu.render_sweep(results)
    assert "| 2,048 | not probed | fits: 7.50 GiB, 1.25 s/step |" in text
    assert "| 16,384 | out of memory | not probed |" in text
    assert ("Longest that fits: logitstore 12,288 (16,384 did not fit); TRL 2,048 (3,072 did not fit); search "
            "stopped: skipped: budget at 1024.") in text
    assert "Ratio 6.0x (target >= 4x: met); logitstore's longest against 16,384: not met." in text
    t = gpu.targets(results)["sweep"]
    assert (t["ratio"], t["ratio_met"], t["length_met"]) == (6.0, True, False)


def test_seed_targets_are_ours_over_trl():
    gpu = _gpu_module()
    run = {"status": "ok", "step_seconds": 0.5, "peak_allocated_gib": 5.0}
    results = {"train_logitstore": run, "train_trl": {**run, "step_seconds": 1.0, "peak_allocated_gib": 6.25},
               "train_trl_frugal": {"status": "out of memory", "fits": False},
               "train_logitstore_memory": {"status": "skipped: budget"}}
    assert gpu.targets(results)["seed"] == [{
        "ours": "logitstore train", "trl": "TRL default", "peak_ratio": 0.8, "peak_target": 0.85, "peak_met": True,
        "step_ratio": 0.5, "step_target": 0.78, "step_met": True}]


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
