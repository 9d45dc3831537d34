"""examples/trl_store_distill.py as users run it: as a script, and under `accelerate launch` on CPU (DDP with gloo,
examples/accelerate_cpu.yaml; its ranks forked from an interpreter that imported the libraries once:
tests/ranks.py). Every rank's batches carry the store's records for its own examples, and the losses
equal one process's: the divergence and NLL are divided by the scored tokens of both ranks, as TRL does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_process import run_cli
from ports import free_port
from ranks import accelerate_launch
from sample_data import HUMAN_TURNS, write_jsonl

pytestmark = pytest.mark.slow  # builds, training and accelerate launch in subprocesses: run with --full
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "trl_store_distill.py"
ENV = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
N = 16

DRIVER = """import json, sys
import numpy as np
sys.path.insert(0, {examples!r})
from trl_store_distill import make_trainer

model, store, data, out, batch, record = sys.argv[1:7]
trainer = make_trainer(model, store, data, out, steps=3, batch_size=int(batch), beta=0.5, nll_weight=0.1)
seen = []
compute_loss = trainer.compute_loss
records = trainer.logitstore


def recording(model, inputs, *args, **kwargs):  # each rank's rows, and whether its records are the store's
    rows = inputs["rows"].tolist()
    stored = records.top_k("completion", rows)
    own = all(np.array_equal(inputs["teacher_logps"][i, :len(x)].cpu().numpy(), x)
              for i, x in enumerate(stored["logps"]))
    seen.append({{"rows": rows, "own_records": own}})
    return compute_loss(model, inputs, *args, **kwargs)


trainer.compute_loss = recording
trainer.train()
rank = trainer.accelerator.process_index
history = [h for h in trainer.state.log_history if "loss" in h]
json.dump({{"engine": str(trainer.accelerator.distributed_type), "wrapped": type(trainer.model_wrapped).__name__,
           "batches": seen, "losses": [h["loss"] for h in history], "distill": [h["distill/loss"] for h in history],
           "nll": [h["nll"] for h in history]}}, open(f"{{record}}-{{rank}}.json", "w"))
"""


@pytest.fixture(scope="module")
def distill_store(tmp_path_factory):
    """A completion store of top-8 records from a tiny teacher, and a student with its tokenizer."""
    from logitstore.dpo.demo import make_tiny_model

    folder = tmp_path_factory.mktemp("trl-distill-dist")
    teacher, student = make_tiny_model(folder / "teacher", seed=1), make_tiny_model(folder / "student", seed=0)
    data = write_jsonl(folder / "d.jsonl", [
        {"id": f"ex-{i}", "prompt": f"Human: {HUMAN_TURNS[i % len(HUMAN_TURNS)][0]} ({i})\n\nAssistant:",
         "completion": " " + HUMAN_TURNS[i % len(HUMAN_TURNS)][1 + i % 2]} for i in range(N)])
    done = run_cli("build", "--model", str(teacher), "--data", str(data), "--out", str(folder / "s"), "--max-length",
                   "128", "--top-k", "8", "--quiet", env=ENV)
    assert done.returncode == 0, done.stderr
    return student, folder / "s", data


def test_example_under_accelerate_launch_equals_one_process(distill_store, tmp_path):
    student, store, data = distill_store
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(examples=str(EXAMPLES)))
    common = [str(student), str(store), str(data)]
    env = {**os.environ, **ENV}
    one = subprocess.run([sys.executable, str(driver), *common, str(tmp_path / "one"), "4", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(accelerate_launch(str(EXAMPLES / "accelerate_cpu.yaml"), free_port(), str(driver), *common,
                                           str(tmp_path / "two"), "2", str(tmp_path / "two")),
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    alone = json.loads((tmp_path / "one-0.json").read_text())
    ranks = [json.loads((tmp_path / f"two-{r}.json").read_text()) for r in (0, 1)]
    assert alone["engine"] == "DistributedType.NO"
    assert [(r["engine"], r["wrapped"]) for r in ranks] == [
        ("DistributedType.MULTI_CPU", "DistributedDataParallel")] * 2

    assert len(alone["batches"]) == 3 and all(len(b["rows"]) == 4 for b in alone["batches"])
    for step in range(3):
        mine, theirs = ranks[0]["batches"][step], ranks[1]["batches"][step]
        assert len(mine["rows"]) == len(theirs["rows"]) == 2
        assert not set(mine["rows"]) & set(theirs["rows"])  # each rank its own half of the global batch ...
        assert sorted(mine["rows"] + theirs["rows"]) == sorted(alone["batches"][step]["rows"])
        assert mine["own_records"] and theirs["own_records"]  # ... with those examples' records from the store
    worst = 0.0
    for key in ("losses", "distill", "nll"):
        assert len(alone[key]) == 3
        for a, b, c in zip(alone[key], ranks[0][key], ranks[1][key]):
            assert b == c  # every rank logs the global value
            worst = max(worst, abs(a - b))
    print(f"largest difference between one process and two ranks over 3 steps: {worst:.2e}")
    assert worst < 1e-5
    assert alone["losses"][0] == pytest.approx(alone["distill"][0] + 0.1 * alone["nll"][0], abs=1e-5)


def test_example_runs_as_a_script_and_refuses_in_one_line(distill_store, tmp_path):
    student, store, data = distill_store
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(student), "--store", str(store), "--data",
                           str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--beta", "0"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "elsewhere", "prompt": "Hi", "completion": " there"}])
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(student), "--store", str(store), "--data",
                           str(other), "--out", str(tmp_path / "r2")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [(
        f"Error: {store}: 1 unknown example ID: 'elsewhere'; the dataset's 'id' column (without one, the hash of "
        "each prompt and completion) must name the store's examples")]
