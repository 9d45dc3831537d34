"""Durable commits (docs/FORMAT.md, "Durability"): what a commit row or header names is on disk before it is
written, and the row or header counts only once it is on disk itself. Checked by the order of fsync and rename
calls, not by timing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import logitstore
from logitstore import durable
from logitstore import format as fmt

from synthetic import plan, shard_rows


@pytest.fixture
def events(monkeypatch):
    """Every fsync (of which file or folder) and rename (to which name) this process makes, in order."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        log.append(("rename", os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def relative(log, root: Path) -> list[tuple[str, str]]:
    out = []
    for op, path in log:
        rel = os.path.relpath(path, root)
        out.append((op, "." if rel == "." else rel.replace(os.sep, "/")))
    return out


def first(log, event) -> int:
    return log.index(event)


def last(log, event) -> int:
    return len(log) - 1 - log[::-1].index(event)


def test_a_shard_is_on_disk_before_its_commit_row_and_the_row_before_it_counts(tmp_path, events):
    writer = plan(tmp_path / "s", n=40)
    events.clear()
    writer.write_shard(1, shard_rows(writer, 1))
    log = relative(events, tmp_path / "s")
    files = [fmt.chunk_key(a, 1) for a in writer.header["shard_files"]]
    commit = "commits/c/1/0"
    written = first(log, ("rename", commit))
    for key in files:
        if not (tmp_path / "s" / key).exists():
            continue  # all fill values: zarr writes no file
        synced = first(log, ("fsync", key))
        folder = first(log, ("fsync", key.rsplit("/", 1)[0]))
        assert first(log, ("rename", key)) < synced < folder < written, key
    # the row: renamed into place, then the file, then its folders: commits/c/1 is new, and commits/c with it (the
    # first commit row); commits was made when the store was planned, so the store folder is unchanged
    chain = [("fsync", commit), ("fsync", "commits/c/1"), ("fsync", "commits/c"), ("fsync", "commits")]
    positions = [last(log, e) for e in chain]
    assert written < positions[0] and positions == sorted(positions) and positions[-1] == len(log) - 1
    assert ("fsync", ".") not in log
    events.clear()
    writer.write_shard(2, shard_rows(writer, 2))
    log = relative(events, tmp_path / "s")
    assert log[-3:] == [("fsync", "commits/c/2/0"), ("fsync", "commits/c/2"), ("fsync", "commits/c")]
    assert ("fsync", "commits") not in log  # known to hold commits/c already: one device flush fewer per shard
    assert logitstore.open(tmp_path / "s").committed.tolist() == [False, True, True]


def test_planning_and_finalising_write_the_header_last_and_durably(tmp_path, events):
    writer = plan(tmp_path / "s", n=40)
    log = relative(events, tmp_path / "s")
    header = last(log, ("rename", "zarr.json"))  # the first is the plain group zarr writes while it plans
    # every metadata document and plan file: renamed into place, then its bytes and its folder, all before the
    # header that makes them a planned store
    for key in [*fmt.metadata_documents(writer.header), *writer.header["plan_files"]]:
        folder = key.rsplit("/", 1)[0]
        assert first(log, ("rename", key)) < first(log, ("fsync", key)) < first(log, ("fsync", folder)) < header, key
    assert log[header - 1][0] == "fsync" and log[header - 1][1].startswith("zarr.json.")  # its own bytes
    assert log[header + 1] == ("fsync", ".")  # then its name
    assert ("fsync", "..") in log[:header]  # the new store folder's own name, before the header
    for shard in writer.missing_shards:
        writer.write_shard(shard, shard_rows(writer, shard))
    events.clear()
    writer.finalize()
    log = relative(events, tmp_path / "s")
    final = first(log, ("rename", "zarr.json"))
    assert log[final - 1][0] == "fsync" and log[final - 1][1].startswith("zarr.json.")
    assert log[final + 1] == ("fsync", ".")


def test_write_durably_leaves_the_old_bytes_or_the_new_and_syncs_in_order(tmp_path, events, monkeypatch):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    durable.write_durably(target, b"new")
    log = relative(events, tmp_path)
    assert [op for op, _ in log] == ["fsync", "rename", "fsync"]
    assert log[0][1].startswith("weights.bin.") and log[0][1].endswith(".partial")
    assert log[1:] == [("rename", "weights.bin"), ("fsync", ".")]
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]

    real_open = open

    class Full:
        def __init__(self, *args):
            self.file = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:1])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "open", Full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        durable.write_durably(target, b"newer")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_fsync_of_a_folder_a_file_system_cannot_sync_is_skipped(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    durable.fsync_dir(tmp_path)  # EINVAL: the file system has nothing more to give
    with pytest.raises(OSError):
        durable.fsync_file(__file__)  # a file's fsync failing is an error
