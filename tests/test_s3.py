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


# ---- the write lease (docs/FORMAT.md, "Write lock") ----------------------------------------------------------------

def _plan(url: str, n: int = 40):
    from synthetic import plan

    return plan(url, n=n)


def _lease(url: str) -> dict:
    import json

    import s3fs

    return json.loads(s3fs.S3FileSystem(use_listings_cache=False).cat_file(url[len("s3://"):] + "/write.lock"))


def test_a_second_writer_on_s3_is_refused_until_the_lease_is_released(s3):
    import re
    import socket

    from forge import refusal
    from synthetic import fill

    url = "s3://pairs/lease1.lstore"
    writer = _plan(url)
    lease = _lease(url)
    assert (lease["pid"], lease["host"]) == (os.getpid(), socket.gethostname())
    message = refusal(lambda: _plan(url))
    assert re.fullmatch(rf"{url} is being written by another writer \(process {os.getpid()} on host "
                        rf"{re.escape(socket.gethostname())}, since {lease['since']}\); if that process is gone, its "
                        rf"lease ends at {lease['expires']}, or delete {url}/write.lock once you are sure no writer "
                        r"runs; wait for it to finish \(or stop it\) and run this command again, or write to another "
                        r"path", message), message
    writer.close()  # deletes the lease (only if it is still the one it wrote)
    import s3fs

    assert not s3fs.S3FileSystem(use_listings_cache=False).exists(url[len("s3://"):] + "/write.lock")
    done = fill(url, n=40)
    assert done.complete and done.digest == logitstore.open(url).digest


def test_an_expired_lease_or_one_of_a_gone_process_is_taken_over(s3):
    import json

    import s3fs

    from synthetic import fill

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    expired = {"pid": 12345, "host": "elsewhere", "since": "2020-01-01T00:00:00Z", "expires": "2020-01-01T00:02:00Z",
               "token": "0" * 32}
    fs.pipe_file("pairs/lease2.lstore/write.lock", json.dumps(expired).encode())
    assert logitstore.storage.location("s3://pairs/lease2.lstore").write_lock_holder() is None
    assert fill("s3://pairs/lease2.lstore", n=40).complete
    # a lease that has not expired, of a process of this machine that no longer runs (killed, as in the build test)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from logitstore.write_lock import _process_identity

    mine = _process_identity(os.getpid())
    boot_ns = mine.rsplit(":", 2)[0]
    live = {"pid": int(gone.stdout), "host": "here", "since": "2020-01-01T00:00:00Z",
            "expires": "2999-01-01T00:00:00Z", "process": f"{boot_ns}:{int(gone.stdout)}:1", "token": "1" * 32}
    fs.pipe_file("pairs/lease3.lstore/write.lock", json.dumps(live).encode())
    assert fill("s3://pairs/lease3.lstore", n=40).complete
    # the same lease naming a process of another machine is respected until it expires
    other = dict(live, process=f"another-boot:1:{int(gone.stdout)}:1")
    fs.pipe_file("pairs/lease4.lstore/write.lock", json.dumps(other).encode())
    with pytest.raises(logitstore.LogitstoreError, match="lease ends at 2999-01-01T00:00:00Z"):
        fill("s3://pairs/lease4.lstore", n=40)


def test_the_lease_is_renewed_and_a_writer_that_lost_it_commits_nothing(s3, monkeypatch):
    import json
    import time

    import s3fs

    from logitstore import write_lock
    from synthetic import shard_rows

    monkeypatch.setattr(write_lock, "RENEW_SECONDS", 0.2)
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    url = "s3://pairs/lease5.lstore"
    writer = _plan(url)
    first = _lease(url)["expires"]
    deadline = time.monotonic() + 30
    while _lease(url)["expires"] == first:  # renewed within a second or so (expiry to the second)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    writer.write_shard(0, shard_rows(writer, 0))
    # another writer takes the lease over (as after an expiry): the renewal's If-Match fails, the writer stops
    fs.pipe_file(url[len("s3://"):] + "/write.lock", json.dumps({"pid": 1, "host": "other", "token": "2" * 32,
                                                                 "expires": "2999-01-01T00:00:00Z"}).encode())
    deadline = time.monotonic() + 30
    while writer._write_lock._lost is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(logitstore.LogitstoreError, match=rf"^{url}: this writer lost the store's write lock "
                                                         r"\(another writer took over its lease after it expired\)"):
        writer.write_shard(1, shard_rows(writer, 1))
    assert logitstore.open(url).committed.tolist() == [True, False, False]
    writer.close()
    assert _lease(url)["host"] == "other"  # a lost lease is not deleted


def test_open_on_s3_while_a_build_plans_says_a_build_is_writing_it(s3):
    from logitstore.storage import location

    url = "s3://pairs/lease6.lstore"
    lease = location(url).acquire_write_lock()
    try:
        with pytest.raises(logitstore.LogitstoreError, match=rf"^{url} is being written by a build \(process "
                                                             rf"{os.getpid()} on host .*\) that has not finished "
                                                             "planning it"):
            logitstore.open(url)
    finally:
        lease.release()
    with pytest.raises(logitstore.StoreNotFoundError):
        logitstore.open(url)
