"""Stores on object storage: a real S3 API (moto's server on 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitstore

from cli_process import run_cli
from sample_data import implicit_rows, write_jsonl

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SCRIPT = Path(sys.executable).parent / "logitstore"
pytestmark = pytest.mark.slow  # an S3 server, CLI builds and a kill -9: run with --full


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "LOGITSTORE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("pairs")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env, "TQDM_DISABLE": "1"})


def test_build_resume_open_verify_and_train_on_s3(s3, mistral_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(40))
    url = "s3://pairs/run1.lstore"
    args = ["build", "--model", str(mistral_model), "--data", str(data), "--max-length", "64", "--rows-per-shard",
            "4", "--batch-size", "2", "--quiet"]
    killed = run(*args, "--out", url, env={**s3, "LOGITSTORE_FAULT": "before-commit:2"})
    assert killed.returncode == -signal.SIGKILL  # died at the named point: shard 2 uploaded, not committed
    partial = logitstore.open(url)
    assert partial.committed.tolist() == [True, True] + [False] * 8
    resumed = run_cli(*args, "--out", url, env=s3)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout

    local = run_cli(*args, "--out", str(tmp_path / "local"), env=s3)
    assert local.returncode == 0, local.stderr
    remote, here = logitstore.open(url), logitstore.open(tmp_path / "local")
    assert remote.complete and remote.ids == here.ids
    for key in ("chosen_logps", "rejected_logps", "chosen_tokens"):
        assert np.array_equal(remote.get(remote.ids)[key], here.get(here.ids)[key])
    rows = np.arange(len(here))
    for a, b in zip(remote.ragged("chosen_ids", rows), here.ragged("chosen_ids", rows)):
        assert np.array_equal(a, b)

    verified = run_cli("verify", url, env=s3)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("sound"), verified.stdout + verified.stderr
    trained = run_cli("train", "--model", str(mistral_model), "--store", url, "--out", str(tmp_path / "run"),
                      "--max-steps", "2", "--batch-size", "4", "--quiet", env=s3)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


def test_a_damaged_remote_file_is_refused_by_the_cache(s3, mistral_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(8))
    url = "s3://pairs/run2.lstore"
    assert run_cli("build", "--model", str(mistral_model), "--data", str(data), "--out", url, "--max-length", "64",
                   "--quiet", env=s3).returncode == 0
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    key = "pairs/run2.lstore/chosen_ids/values/c/0"
    blob = bytearray(fs.cat_file(key))
    blob[3] ^= 0x40
    fs.pipe_file(key, bytes(blob))
    store = logitstore.open(url)
    with pytest.raises(logitstore.FormatError, match=r"^s3://pairs/run2.lstore: damaged file chosen_ids/values/c/0 "
                                                     r"\(its SHA-256 differs from the commit record\): shard 0, 8 "):
        store.ragged("chosen_ids", [0])
    assert run_cli("verify", url, env=s3).returncode == 1
