"""The TRL route past one process: StoreDPOTrainer under `accelerate launch` (examples/), on CPU with gloo. Every
rank's batches carry the store's values for its own examples, and the losses equal one process's.

accelerate 1.15 turns FSDP on only for GPU-like devices (AcceleratorState leaves MULTI_CPU as it is), so on a CPU
the launch is data parallel (examples/accelerate_cpu.yaml); the FSDP and ZeRO-3 configurations need GPUs. The
ranks are forked from an interpreter that imported the libraries once (tests/ranks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import logitstore

from cli_process import run_cli
from ports import free_port
from ranks import accelerate_launch
from sample_data import implicit_rows, write_jsonl

pytestmark = pytest.mark.slow  # accelerate launch of two processes: run with --full
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

DRIVER = """import json, os, sys
sys.path.insert(0, {examples!r})
from trl_store_dpo import make_trainer

model, store, data, out, batch, record = sys.argv[1:7]
trainer = make_trainer(model, store, data, out, steps=3, batch_size=int(batch))
seen = []
compute_loss = trainer.compute_loss


def recording(model, inputs, *args, **kwargs):  # the reference values each rank's batch carries
    seen.append([[c, r] for c, r in zip(inputs["ref_chosen_logps"].tolist(), inputs["ref_rejected_logps"].tolist())])
    return compute_loss(model, inputs, *args, **kwargs)


trainer.compute_loss = recording
trainer.train()
rank = trainer.accelerator.process_index
json.dump({{"engine": str(trainer.accelerator.distributed_type), "wrapped": type(trainer.model_wrapped).__name__,
           "batches": seen, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}},
          open(f"{{record}}-{{rank}}.json", "w"))
"""


@pytest.fixture(scope="module")
def trl_store(mistral_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl-dist")
    data = write_jsonl(folder / "d.jsonl", [dict(r, id=f"pair-{i}") for i, r in enumerate(implicit_rows(16))])
    done = run_cli("build", "--model", str(mistral_model), "--data", str(data), "--out", str(folder / "s"),
                   "--max-length", "64", "--quiet", env=ENV)
    assert done.returncode == 0, done.stderr
    return folder


def test_store_trainer_under_accelerate_launch_equals_one_process(mistral_model, trl_store, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(examples=str(EXAMPLES)))
    common = [str(mistral_model), str(trl_store / "s"), str(trl_store / "d.jsonl")]
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
    assert [(r["engine"], r["wrapped"]) for r in ranks] == [("DistributedType.MULTI_CPU", "DistributedDataParallel")] * 2

    store = logitstore.open(trl_store / "s")
    values = store.get([f"pair-{i}" for i in range(16)])
    stored = {(round(float(c), 4), round(float(r), 4)) for c, r in zip(values["chosen_logps"],
                                                                        values["rejected_logps"])}
    assert len(stored) == 16  # each example's pair of values is its own

    def rows(batch):
        return sorted((round(c, 4), round(r, 4)) for c, r in batch)

    assert len(alone["batches"]) == 3 and all(len(b) == 4 for b in alone["batches"])
    for step in range(3):
        mine, theirs = rows(ranks[0]["batches"][step]), rows(ranks[1]["batches"][step])
        assert len(mine) == len(theirs) == 2
        assert set(mine) <= stored and set(theirs) <= stored  # the store's values ...
        assert not set(mine) & set(theirs)  # ... for each rank's own examples: its half of the global batch
        assert sorted(mine + theirs) == rows(alone["batches"][step])
    assert len(alone["losses"]) == 3
    for a, b in zip(alone["losses"], ranks[0]["losses"]):
        assert a == pytest.approx(b, abs=1e-4)
