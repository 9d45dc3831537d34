"""A full disk or a folder that cannot be written, during build, subset and merge: one line naming the path and
saying that the same command resumes, exit 1; run again, the command resumes and the store is what it would have
been."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import zarr.storage._local as zarr_local

import logitstore
from logitstore import durable, write_lock
from logitstore.cli.main import main

from sample_data import implicit_rows, write_jsonl
from synthetic import fill

RESUME = "run the same command again: it resumes where it stopped, keeping every committed shard"


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    out = capsys.readouterr()
    return code, out.out, out.err


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def fail_writes_of(monkeypatch, chunk: str, error: OSError) -> None:
    """zarr's file writes fail for chunk files named `chunk` (e.g. "c/1": shard 1 of the per-row arrays), as a full
    disk fails them: the file is opened, the write raises."""
    real = zarr_local._put

    def put(path, value, exclusive=False):
        if str(path).endswith("/" + chunk):
            raise error
        return real(path, value, exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)


@pytest.fixture
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("derive") / "source"
    fill(path, n=40, rows_per_shard=8)
    return path


def test_a_full_disk_during_a_build_names_the_store_and_the_rerun_resumes(byte_model, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(12))
    args = ["build", "--model", str(byte_model), "--data", str(data), "--max-length", "256", "--rows-per-shard", "4",
            "--quiet"]
    assert run_main(capsys, *args, "--out", str(tmp_path / "reference"))[0] == 0
    with monkeypatch.context() as patch:
        fail_writes_of(patch, "c/1", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        code, out, err = run_main(capsys, *args, "--out", str(tmp_path / "s"))
    assert (code, err) == (1, f"Error: no space left on the device writing {tmp_path / 's'} (shard 1); free some "
                              f"space and {RESUME}\n")
    assert "Store digest" not in out
    assert logitstore.open(tmp_path / "s").committed.tolist() == [True, False, False]
    code, out, err = run_main(capsys, *args, "--out", str(tmp_path / "s"))
    assert code == 0 and "Resuming" in out, err
    assert tree_digest(tmp_path / "s") == tree_digest(tmp_path / "reference")


def test_a_full_disk_while_planning_and_while_finalising(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    real_open = open

    class Full:  # a file whose first write finds the disk full (what write_durably's temporary file meets)
        def __init__(self, *args):
            self.file = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    args = ["subset", str(source), "--out", str(out), "--ids", str(write_ids(tmp_path, 0, 20))]
    with monkeypatch.context() as patch:
        patch.setattr(durable, "open", Full, raising=False)
        code, _, err = run_main(capsys, *args)
    assert (code, err) == (1, f"Error: no space left on the device writing {out}; free some space and {RESUME}\n")
    assert not [p for p in out.rglob("*.partial")]  # nothing half-written left behind

    real_write_durably = durable.write_durably

    def full_at_the_header(path, data):
        if Path(path).name == "zarr.json" and Path(path).parent == out and b'"complete":true' in bytes(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".0123456789abcdef0123456789abcdef"
                                                                              ".partial")
        return real_write_durably(path, data)

    with monkeypatch.context() as patch:
        patch.setattr("logitstore.storage.write_durably", full_at_the_header)
        code, _, err = run_main(capsys, *args)
    assert (code, err) == (1, f"Error: no space left on the device writing {out / 'zarr.json'}; free some space and "
                              f"{RESUME}\n")
    assert logitstore.open(out).committed.all() and not logitstore.open(out).complete
    code, stdout, err = run_main(capsys, *args)
    assert code == 0 and stdout.startswith(f"Wrote {out}: 20 pairs"), err
    assert logitstore.verify(out).ok


def write_ids(folder: Path, start: int, stop: int) -> Path:
    path = folder / f"ids-{start}-{stop}.txt"
    path.write_text("".join(f"ex-{i}\n" for i in range(start, stop)))
    return path


def test_no_permission_to_write_names_the_file(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "merged"
    args = ["merge", str(source), str(source), "--out", str(out), "--rows-per-shard", "8"]
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out / "chosen_ids/values/c/2"))
    with monkeypatch.context() as patch:
        fail_writes_of(patch, "chosen_ids/values/c/2", denied)
        code, _, err = run_main(capsys, *args)
    assert (code, err) == (1, f"Error: no permission to write {out / 'chosen_ids/values/c/2'}; make it writable (or "
                              f"write to another path) and {RESUME}\n")

    def no_lock_file(folder, url, *, create):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), write_lock.LOCK_KEY)

    with monkeypatch.context() as patch:  # a folder the user cannot write: the lock file is the first write
        patch.setattr(write_lock, "_open_lock_file", no_lock_file)
        code, _, err = run_main(capsys, *args)
    assert (code, err) == (1, f"Error: no permission to write {out / 'write.lock'}; make it writable (or write to "
                              f"another path) and {RESUME}\n")
    code, stdout, err = run_main(capsys, *args)
    assert code == 0 and "40 duplicates kept once" in stdout, err
    assert logitstore.verify(out).ok


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders; the patched refusals above stand in for it")
def test_a_read_only_folder(source, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = run_main(capsys, "subset", str(source), "--out", str(parent / "out"), "--ids",
                                str(write_ids(tmp_path, 0, 8)))
    finally:
        parent.chmod(0o755)
    assert (code, err) == (1, f"Error: no permission to write {parent / 'out'}; make it writable (or write to "
                              f"another path) and {RESUME}\n")


def test_a_complete_store_in_a_folder_that_cannot_be_written_needs_no_lock(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["subset", str(source), "--out", str(out), "--ids", str(write_ids(tmp_path, 0, 8))]
    assert run_main(capsys, *args)[0] == 0

    def read_only(folder, url, *, create):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), write_lock.LOCK_KEY)

    monkeypatch.setattr(write_lock, "_open_lock_file", read_only)
    code, stdout, err = run_main(capsys, *args)
    assert (code, stdout, err) == (0, f"{out} is already complete (8 pairs); nothing to do.\n", "")
    other = tmp_path / "other"
    code, _, err = run_main(capsys, "subset", str(source), "--out", str(other), "--ids", str(write_ids(tmp_path, 0, 9)))
    assert (code, err) == (1, f"Error: cannot write {other / 'write.lock'}: the file system is read-only; make it "
                              f"writable (or write to another path) and {RESUME}\n")


def test_an_output_path_that_is_a_file_is_refused_before_anything_is_written(source, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, _, err = run_main(capsys, "subset", str(source), "--out", str(out), "--ids", str(write_ids(tmp_path, 0, 8)))
    assert (code, err) == (1, f"Error: {out} exists and is not a folder; choose an empty or new path\n")
    assert out.read_text() == "mine"


def test_any_other_write_error_names_the_path_and_its_reason(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fail_writes_of(monkeypatch, "commits/c/0/0", OSError(errno.EIO, os.strerror(errno.EIO)))
    code, _, err = run_main(capsys, "subset", str(source), "--out", str(out), "--ids", str(write_ids(tmp_path, 0, 8)))
    assert (code, err) == (1, f"Error: cannot write {out} (shard 0): Input/output error; fix that and {RESUME}\n")
    assert not logitstore.open(out).committed.any()
