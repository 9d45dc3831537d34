"""Scale-out on existing engines: torchrun (gloo, 2 CPU processes) for build and training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import logitstore

from sample_data import implicit_rows, write_jsonl

SCRIPT = Path(sys.executable).parent / "logitstore"
pytestmark = pytest.mark.slow  # torchrun builds and training: run with --full
ENV = {"SOURCE_DATE_EPOCH": "1700000000", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "--no-python", str(SCRIPT), *args]


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("scale") / "d.jsonl", implicit_rows(40))


def build_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["build", "--model", str(model), "--data", str(data), "--out", str(out), "--max-length", "64",
            "--rows-per-shard", "4", "--batch-size", "4", "--quiet"]


def test_two_rank_build_equals_one_process_and_resumes(mistral_model, data, tmp_path):
    env = {**os.environ, **ENV}
    one = subprocess.run([str(SCRIPT), *build_args(mistral_model, data, tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun(*build_args(mistral_model, data, tmp_path / "two"), port=29511), env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    # Each shard is batched the same way whichever rank writes it, so the stores are byte-identical.
    assert digest(tmp_path / "two") == digest(tmp_path / "one")

    # The rank that owns shard 2 (shards go to ranks by the model work in them) dies right after committing it;
    # torchrun then stops the other rank wherever it is.
    cut = subprocess.run(torchrun(*build_args(mistral_model, data, tmp_path / "cut"), port=29512),
                         env={**env, "LOGITSTORE_FAULT": "after-commit:2"}, capture_output=True, text=True,
                         timeout=600)
    assert cut.returncode != 0 and "Signal 9 (SIGKILL)" in cut.stderr, cut.stderr[-2000:]
    committed = logitstore.open(tmp_path / "cut").committed
    assert committed[2] and not committed.all()
    again = subprocess.run(torchrun(*build_args(mistral_model, data, tmp_path / "cut"), port=29513), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert digest(tmp_path / "cut") == digest(tmp_path / "one")


def test_two_rank_training_equals_one_process_with_the_same_global_batch(mistral_model, data, tmp_path):
    env = {**os.environ, **ENV}
    assert subprocess.run([str(SCRIPT), *build_args(mistral_model, data, tmp_path / "s")], env=env,
                          capture_output=True, timeout=600).returncode == 0
    common = ["train", "--model", str(mistral_model), "--store", str(tmp_path / "s"), "--max-steps", "4",
              "--batch-size", "4", "--lr", "1e-2", "--lora-dropout", "0", "--log-every", "1", "--quiet"]
    one = subprocess.run([str(SCRIPT), *common, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun(*common, "--out", str(tmp_path / "two"), port=29514), env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], abs=1e-5)
    assert a[-1]["loss"] < a[0]["loss"]
