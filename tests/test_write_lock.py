"""One writer per store: the write lock on local folders (docs/FORMAT.md, "Write lock")."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import logitstore
from logitstore.errors import StoreLockedError
from logitstore.storage import location
from logitstore import write_lock
from logitstore.write_lock import LOCK_KEY, parse_record

from forge import refusal
from synthetic import fill, plan, shard_rows

HERE = Path(__file__).parent
HOST = socket.gethostname()
SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"

# Waits until every process of the race is ready (imports done), then runs the CLI: both commands start within
# milliseconds of each other.
RACER = """
import os, sys, time
from pathlib import Path
barrier, me, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
from logitstore.cli.main import main
(barrier / me).touch()
while len(list(barrier.iterdir())) < count:
    time.sleep(0.001)
main(sys.argv[4:])
"""

HOLDER = """
import sys, time
from pathlib import Path
from logitstore.storage import location
lock = location(sys.argv[1]).acquire_write_lock()
Path(sys.argv[2]).touch()
time.sleep(600)
"""


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def refused(url: str, pid: int) -> str:
    return (rf"Error: {re.escape(url)} is being written by another writer \(process {pid} on host "
            rf"{re.escape(HOST)}, since {SINCE}\); wait for it to finish \(or stop it\) and run this command again, "
            r"or write to another path")


def hold_lock(path: Path, tmp_path: Path) -> subprocess.Popen:
    """Another process that takes the store's write lock and keeps it (as a writer in the middle of its run)."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_two_writers_racing_into_one_store_one_wins_the_other_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    fill(tmp_path / "source", n=120, rows_per_shard=8)
    lists = {}
    for name, parity in (("even", 0), ("odd", 1)):
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("".join(f"ex-{i}\n" for i in range(parity, 120, 2)))
    out, barrier = tmp_path / "out", tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, TQDM_DISABLE="1")
    racers = {name: subprocess.Popen([sys.executable, "-c", RACER, str(barrier), name, "2", "subset",
                                      str(tmp_path / "source"), "--out", str(out), "--ids", str(ids),
                                      "--rows-per-shard", "2"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for name, ids in lists.items()}
    results = {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read(), p.pid) for name, p in racers.items()}
    winners = [name for name, r in results.items() if r[0] == 0]
    assert len(winners) == 1, results
    winner, loser = winners[0], next(name for name in results if name not in winners)
    code, stdout, stderr, _ = results[loser]
    assert code == 1 and stdout == ""
    assert re.fullmatch(refused(str(out), results[winner][3]) + "\n", stderr), stderr
    # The store is the winner's alone: the same bytes as the winner's subset written with no one else about.
    alone = tmp_path / "alone"
    logitstore.subset(tmp_path / "source", alone, ids=lists[winner].read_text().split(), rows_per_shard=2)
    theirs = {k.replace(str(alone), str(out)): v for k, v in tree_digest(alone).items()}
    assert tree_digest(out) == theirs and logitstore.verify(out).ok
    assert not (out / LOCK_KEY).exists()  # the winner let go


def test_a_second_writer_is_refused_naming_the_holder_and_writes_nothing(tmp_path):
    holder = hold_lock(tmp_path / "s", tmp_path)
    try:
        before = tree_digest(tmp_path / "s")
        message = refusal(lambda: fill(tmp_path / "s", n=40))
        assert re.fullmatch(refused(str(tmp_path / "s"), holder.pid)[len("Error: "):], message), message
        assert tree_digest(tmp_path / "s") == before  # the lock file only: nothing planned, nothing removed
        record = parse_record((tmp_path / "s" / LOCK_KEY).read_bytes())
        assert (record.pid, record.host) == (holder.pid, HOST)
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_of_the_holder_leaves_no_stale_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    env = dict(os.environ, PYTHONPATH=str(HERE), LOGITSTORE_FAULT="after-commit:2", WRITER_PAUSE="0")
    killed = subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(tmp_path / "s")], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert parse_record((tmp_path / "s" / LOCK_KEY).read_bytes()).pid is not None  # its record is left behind
    writer = fill(tmp_path / "s")  # the kernel let go when the process died: the next writer resumes at once
    assert writer.complete and logitstore.verify(tmp_path / "s").ok
    assert not (tmp_path / "s" / LOCK_KEY).exists()


def test_the_lock_is_held_until_finalize_or_close(tmp_path):
    writer = plan(tmp_path / "s", n=40)
    assert refusal(lambda: plan(tmp_path / "s", n=40)).startswith(f"{tmp_path / 's'} is being written by another "
                                                                   f"writer (process {os.getpid()} on host ")
    writer.close()
    with plan(tmp_path / "s", n=40) as again:  # resumes once the first writer let go
        assert again.missing_shards == [0, 1, 2]
        with pytest.raises(StoreLockedError):
            plan(tmp_path / "s", n=40)
    assert refusal(lambda: again.write_shard(0, {})) == (
        f"this writer of {tmp_path / 's'} is closed (finalised, or closed, so it holds no lock): open a new one with "
        "logitstore.create")
    done = fill(tmp_path / "s", n=40)
    assert done.digest == logitstore.open(tmp_path / "s").digest  # the digest of what it finalised
    assert fill(tmp_path / "s", n=40).complete  # finalize let go


def test_attached_writers_join_the_holders_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    writer = plan(tmp_path / "s", n=40)
    env = dict(os.environ, PYTHONPATH=str(HERE), WRITER_PAUSE="0")
    joined = subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(tmp_path / "s"), "0", "2"], env=env)
    assert joined.returncode == 0  # not refused: it takes no lock
    assert writer.missing_shards == [1]
    with pytest.raises(logitstore.LogitstoreError, match="known only to the writer that finalised it"):
        logitstore.StoreWriter.attach(tmp_path / "s").digest  # noqa: B018
    writer.write_shard(1, shard_rows(writer, 1))
    writer.finalize()
    assert writer.digest == logitstore.open(tmp_path / "s").digest


def test_open_while_a_build_plans_says_a_build_is_writing_it(tmp_path, capsys):
    from logitstore.cli.main import main

    holder = hold_lock(tmp_path / "s", tmp_path)
    try:
        with pytest.raises(StoreLockedError) as info:
            logitstore.open(tmp_path / "s")
        pattern = (rf"{re.escape(str(tmp_path / 's'))} is being written by a build \(process {holder.pid} on host "
                   rf"{re.escape(HOST)}, since {SINCE}\) that has not finished planning it; open it again in a "
                   r"moment, or once the build is done")
        assert re.fullmatch(pattern, str(info.value))
        del info
        with pytest.raises(SystemExit) as exit_info:
            main(["info", str(tmp_path / "s")])
        assert exit_info.value.code == 1
        assert re.fullmatch("Error: " + pattern + "\n", capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    # Nobody holds it now: what is there is what the reader says it is (no store yet).
    assert refusal(lambda: logitstore.open(tmp_path / "s")) == f"no logitstore store at {tmp_path / 's'}"


def test_readers_never_take_or_wait_for_the_lock(tmp_path):
    fill(tmp_path / "s", n=40)
    holder = hold_lock(tmp_path / "s", tmp_path)
    try:
        start = time.monotonic()
        store = logitstore.open(tmp_path / "s")
        assert store.complete and len(store.get(["ex-1", "ex-39"])["row"]) == 2
        assert logitstore.verify(tmp_path / "s").ok  # a held lock file is not a problem
        assert time.monotonic() - start < 30
        assert location(tmp_path / "s").write_lock_holder().pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert location(tmp_path / "s").write_lock_holder() is None  # the kernel's word, not the file's


# ---- a lock file from elsewhere ----------------------------------------------------------------------------------

def test_a_lock_file_that_is_a_link_is_never_followed(tmp_path):
    fill(tmp_path / "s", n=40)
    target = tmp_path / "outside"
    target.write_text("not the store's")
    (tmp_path / "s" / LOCK_KEY).symlink_to(target)
    assert refusal(lambda: fill(tmp_path / "s", n=40)) == (
        f"{tmp_path / 's'}: refusing {LOCK_KEY}: a symbolic link or not a regular file inside the store")
    assert target.read_text() == "not the store's"
    assert location(tmp_path / "s").write_lock_holder() is None
    assert logitstore.open(tmp_path / "s").complete
    assert logitstore.verify(tmp_path / "s").problems == [f"symbolic link in the store: {LOCK_KEY}"]


def test_a_lock_file_that_is_a_fifo_is_never_waited_on(tmp_path):
    fill(tmp_path / "s", n=40)
    os.mkfifo(tmp_path / "s" / LOCK_KEY)
    assert refusal(lambda: fill(tmp_path / "s", n=40)) == (
        f"{tmp_path / 's'}: refusing {LOCK_KEY}: a symbolic link or not a regular file inside the store")
    assert location(tmp_path / "s").write_lock_holder() is None
    assert logitstore.verify(tmp_path / "s").problems == [f"not a regular file: {LOCK_KEY}"]


def test_a_forged_lock_record_is_shown_never_believed(tmp_path):
    writer = plan(tmp_path / "s", n=40)
    writer.close()
    forged = b'{"pid": 1, "host": "\\u001b[31mevil", "since": "2020-01-01T00:00:00Z"}' + b" " * 100_000
    (tmp_path / "s" / LOCK_KEY).write_bytes(forged)  # a store copied from elsewhere, mid-build
    assert location(tmp_path / "s").write_lock_holder() is None  # no process holds it
    assert fill(tmp_path / "s", n=40).complete  # the record names nobody: the writer takes the lock
    holder = parse_record(forged[:4096])
    assert holder.describe() == r"process 1 on host \x1b[31mevil, since 2020-01-01T00:00:00Z"
    assert parse_record(b"\xff not json").describe() == "a writer that has not recorded itself yet"
    assert parse_record(b'{"pid": -5, "host": 7, "since": "yesterday"}').describe() == (
        "a writer that has not recorded itself yet")


# ---- fsspec backends other than S3 (docs/FORMAT.md, "Write lock": the lease) ------------------------------------

def test_a_lease_on_a_backend_with_conditional_create(tmp_path):
    import fsspec

    url = f"memory://lock-{time.monotonic_ns()}/s"
    writer = plan(url, n=40)
    message = refusal(lambda: plan(url, n=40))
    assert re.fullmatch(rf"{re.escape(url)} is being written by another writer \(process {os.getpid()} on host "
                        rf"{re.escape(HOST)}, since {SINCE}\); if that process is gone, its lease ends at {SINCE}, or "
                        rf"delete {re.escape(url)}/write.lock once you are sure no writer runs; wait for it to finish "
                        r"\(or stop it\) and run this command again, or write to another path", message), message
    writer.close()
    assert not fsspec.filesystem("memory").exists(url[len("memory://"):] + "/write.lock")
    assert fill(url, n=40).complete


def test_a_lease_on_a_backend_without_conditional_writes_is_read_back(tmp_path, monkeypatch):
    import fsspec

    memory = type(fsspec.filesystem("memory"))
    real = memory.pipe_file

    def unconditional(self, path, value, mode="overwrite", **kw):
        if mode != "overwrite":
            raise NotImplementedError("no conditional writes here")
        return real(self, path, value, **kw)

    monkeypatch.setattr(memory, "pipe_file", unconditional)
    monkeypatch.setattr(write_lock, "SETTLE_SECONDS", 0.05)
    url = f"memory://lock-{time.monotonic_ns()}/s"
    writer = plan(url, n=40)
    with pytest.raises(StoreLockedError):
        plan(url, n=40)
    writer.close()
    assert fill(url, n=40).complete
