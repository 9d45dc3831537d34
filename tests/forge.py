"""What a hostile store's author can do: change a file and recompute every record that covers it, so that only the
reader's own checks (limits, pinned metadata, decoded sizes, a pinned digest) stand in the way."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

import logitstore
from logitstore import format as fmt

from synthetic import fill


def header(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["logitstore"]


def write_header(store: Path, value: dict) -> None:
    (store / "zarr.json").write_bytes(fmt.canonical_json(fmt.root_metadata(value)))


def recommit(store: Path, key: str) -> None:
    """Rewrite the record of `key` (a shard file or an ID file) to match the file as it is now."""
    data = (store / key).read_bytes() if (store / key).is_file() else None
    h = header(store)
    if key in h["plan_files"]:
        h["plan_files"][key] = [len(data), hashlib.sha256(data).hexdigest()]
        write_header(store, h)
        return
    array, shard = key.split("/c/")[0], int(key.split("/c/")[1].split("/")[0])
    column = h["shard_files"].index(array)
    record = store / "commits" / "c" / str(shard) / "0"
    row = np.frombuffer(record.read_bytes()[:-4], dtype="<u8").copy()
    start = 2 + fmt.COMMIT_FILE_WORDS * column
    row[start:start + fmt.COMMIT_FILE_WORDS] = fmt.commit_entry(data)
    payload = row.astype("<u8").tobytes()
    record.write_bytes(payload + google_crc32c.value(payload).to_bytes(4, "little"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A well-formed store: 40 rows in 3 shards of 16, per-token fixed point, zstd token ids."""
    path = tmp_path_factory.mktemp("pristine") / "s"
    fill(path, n=40)
    return path


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine store, for one test to damage."""
    path = tmp_path / "s"
    shutil.copytree(pristine, path)
    return path


def refusal(call) -> str:
    """The message of the LogitstoreError `call` raises (any other exception fails the test)."""
    with pytest.raises(logitstore.LogitstoreError) as info:
        call()
    return str(info.value)
