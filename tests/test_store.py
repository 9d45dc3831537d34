"""The core store: round trips, plain-zarr readability, crash safety, concurrency, damage detection."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitstore
from logitstore import format as fmt
from logitstore.shards import decode_chunk
from logitstore.storage import check_key

from forge import recommit
from synthetic import fill, plan, shard_rows

HERE = Path(__file__).parent


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_of_arbitrary_ragged_data(tmp_path_factory, data):
    n = data.draw(st.integers(1, 40), label="examples")
    ids = data.draw(st.lists(st.text(min_size=1, max_size=12), min_size=n, max_size=n, unique=True), label="ids")
    rows_per_shard = data.draw(st.integers(1, 12), label="rows_per_shard")
    max_length = data.draw(st.integers(1, 40), label="max_length")
    codec = data.draw(st.sampled_from(fmt.LOGP_CODECS), label="codec")
    token_codec = data.draw(st.sampled_from(fmt.TOKEN_CODECS), label="token_codec")
    vocab = data.draw(st.sampled_from([300, 70000]), label="vocab")
    path = tmp_path_factory.mktemp("rt") / "s.lstore"
    writer = logitstore.create(path, ids, fingerprint={"k": 1}, vocab_size=vocab, max_length=max_length,
                               per_token=True, logp_codec=codec, token_codec=token_codec,
                               rows_per_shard=rows_per_shard, inner_chunk=data.draw(st.sampled_from([8, 64])))
    expected = {}
    for shard in range(writer.geometry.num_shards):
        rows = writer.shard_rows(shard)
        content: dict = {f: [] for f in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_token_logps",
                                         "rejected_token_logps")}
        for _ in rows:
            p = data.draw(st.integers(0, max_length))
            content["prompt_ids"].append(np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=p,
                                                                     max_size=p)), dtype=np.int64))
            for side in ("chosen", "rejected"):
                k = data.draw(st.integers(0, max_length))
                content[f"{side}_ids"].append(np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=k,
                                                                          max_size=k)), dtype=np.int64))
                scored = max(k - (p == 0), 0)  # an empty prompt leaves the first token unscored
                content[f"{side}_token_logps"].append(np.array(data.draw(st.lists(
                    st.floats(-30, 0, width=32), min_size=scored, max_size=scored)), dtype=np.float32))
        for side in ("chosen", "rejected"):
            content[f"{side}_logps"] = [v.sum(dtype=np.float64) for v in content[f"{side}_token_logps"]]
            content[f"{side}_tokens"] = [len(v) for v in content[f"{side}_token_logps"]]
        writer.write_shard(shard, content)
        for i, row in enumerate(rows):
            expected[row] = {f: v[i] for f, v in content.items()}
    writer.finalize()
    store = logitstore.open(path)
    assert store.complete and store.ids == ids
    assert np.array_equal(store.rows(ids), np.arange(n))
    got = store.get(ids)
    tol = {"raw": 0, "float32": 0, "float16": 0.02, "fixed": 2.0**-7}[codec]
    for row in range(n):
        exp = expected[row]
        for f in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert np.array_equal(store.ragged(f, [row])[0], exp[f])
        for side in ("chosen", "rejected"):
            assert got[f"{side}_logps"][row] == np.float32(exp[f"{side}_logps"])
            assert got[f"{side}_tokens"][row] == exp[f"{side}_tokens"]
            values = store.ragged(f"{side}_token_logps", [row])[0]
            assert values.dtype == np.float32 and values.shape == exp[f"{side}_token_logps"].shape
            assert np.all(np.abs(values - exp[f"{side}_token_logps"]) <= tol + 1e-6)
            if codec == "fixed":  # error feedback: the sum error is at most half a step at any length
                assert abs(values.sum(dtype=np.float64) - exp[f"{side}_logps"]) <= 2.0**-8 + 1e-4
    assert logitstore.verify(path).ok


def test_a_twenty_line_reader_with_plain_zarr_agrees(tmp_path):
    """docs/FORMAT.md is enough to read a store with zarr + numpy alone."""
    import zarr

    path = tmp_path / "s.lstore"
    fill(path, n=40, logp_codec="float16")
    # ---- the reference reader: zarr + numpy only ----
    g = zarr.open_group(str(path), mode="r")
    header = g.attrs["logitstore"]
    assert header["format_version"] == 2 and header["complete"]
    ids_values, ids_offsets = g["ids/values"][:], g["ids/offsets"][:]
    ids = [ids_values[a:b].tobytes().decode() for a, b in ids_offsets]
    chosen_logps, rejected_logps = g["chosen_logps"][:], g["rejected_logps"][:]

    def ragged(field, row):
        start, stop = g[f"{field}/offsets"][row]
        return g[f"{field}/values"][start:stop]

    plain = {ids[i]: (chosen_logps[i], rejected_logps[i], ragged("chosen_ids", i), ragged("chosen_token_logps", i))
             for i in range(len(ids))}
    # ---- end of the reference reader ----
    ends = ids_offsets[:, 1]  # FORMAT.md "ID checks": the IDs lie back to back, from 0 to id_bytes
    assert ids_offsets[0, 0] == 0 and (ids_offsets[1:, 0] == ends[:-1]).all() and ends[-1] == header["id_bytes"]
    store = logitstore.open(path)
    assert list(plain) == store.ids
    got = store.get(store.ids)
    for i, key in enumerate(store.ids):
        c, r, chosen_ids, per_token = plain[key]
        assert c == got["chosen_logps"][i] and r == got["rejected_logps"][i]
        assert np.array_equal(chosen_ids, store.ragged("chosen_ids", [i])[0])
        assert np.array_equal(per_token.astype(np.float32), store.ragged("chosen_token_logps", [i])[0])


def test_unknown_ids_raise_a_key_error_naming_them(tmp_path):
    fill(tmp_path / "s", n=20)
    store = logitstore.open(tmp_path / "s")
    with pytest.raises(KeyError) as info:
        store.get(["ex-1", "nope", "ex-99"])
    assert str(info.value) == "2 unknown example IDs: 'nope', 'ex-99'"
    assert isinstance(info.value, logitstore.UnknownIdError)


def test_get_returns_values_in_the_order_asked(tmp_path):
    writer = fill(tmp_path / "s", n=30)
    store = logitstore.open(tmp_path / "s")
    expected = shard_rows(writer, 1)["chosen_logps"][3]  # row 19
    got = store.get(["ex-19", "ex-0"])
    assert got["chosen_logps"].dtype == np.float32
    assert got["chosen_logps"][0] == np.float32(expected) and list(got["row"]) == [19, 0]


def test_a_different_fingerprint_is_refused(tmp_path):
    fill(tmp_path / "s", n=20)
    with pytest.raises(logitstore.FingerprintMismatchError) as info:
        logitstore.create(tmp_path / "s", [f"ex-{i}" for i in range(20)], fingerprint={"test": "other"},
                          vocab_size=32000, max_length=64, rows_per_shard=16)
    assert str(info.value).startswith(f"{tmp_path / 's'} was built for a different test (store fingerprint ")


def test_a_path_holding_other_files_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(logitstore.LogitstoreError, match="exists and is not a logitstore store"):
        plan(tmp_path / "s")
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_an_incomplete_store_reports_what_is_missing(tmp_path):
    fill(tmp_path / "s", n=100, shards=[0, 2])
    store = logitstore.open(tmp_path / "s")
    assert not store.complete
    assert store.missing_shards == [1, 3, 4, 5, 6]
    assert store.get(["ex-0"])["chosen_tokens"][0] > 0
    with pytest.raises(logitstore.IncompleteStoreError, match="not written yet: 1"):
        store.get(["ex-20"])
    report = logitstore.verify(tmp_path / "s")
    assert report.problems == ["incomplete: 5 of 7 shards not written (first: 1)"]


def _run_writer(path: Path, *shards: int, pause: float = 0.02, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", PYTHONPATH=str(HERE), WRITER_PAUSE=str(pause))
    if fault is not None:
        env["LOGITSTORE_FAULT"] = fault
    return subprocess.Popen([sys.executable, str(HERE / "synthetic.py"), str(path), *map(str, shards)], env=env)


def _planned(path: Path) -> bool:
    return (path / "zarr.json").is_file() and b'"logitstore"' in (path / "zarr.json").read_bytes()


# Each crash point with the state it must leave (synthetic stores: 7 shards, fields written in header order).
CRASH_STATES = {
    "before-header": lambda p: not _planned(p) and (p / "id_index" / "row" / "c" / "0").is_file(),
    "after-header": lambda p: _planned(p) and not logitstore.open(p).committed.any(),
    "after-commit:1": lambda p: logitstore.open(p).committed.tolist() == [True, True] + [False] * 5,
    "mid-shard:3": lambda p: (logitstore.open(p).committed.tolist() == [True] * 3 + [False] * 4
                              and (p / "prompt_ids" / "values" / "c" / "3").is_file()
                              and not (p / "rejected_token_logps" / "values" / "c" / "3").exists()),
    "before-commit:3": lambda p: (logitstore.open(p).committed.tolist() == [True] * 3 + [False] * 4
                                  and (p / "rejected_token_logps" / "values" / "c" / "3").is_file()),
    "before-finalize": lambda p: (logitstore.open(p).committed.all() and not logitstore.open(p).complete),
}


@pytest.mark.parametrize("point", list(CRASH_STATES))
def test_sigkill_mid_write_then_resume_is_bit_identical(tmp_path, monkeypatch, point):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    fill(tmp_path / "reference")
    proc = _run_writer(tmp_path / "killed", pause=0.0, fault=point)
    assert proc.wait(timeout=120) == -signal.SIGKILL  # it died at the named point, not of anything else
    assert CRASH_STATES[point](tmp_path / "killed")
    if _planned(tmp_path / "killed"):
        opened = logitstore.open(tmp_path / "killed")
        assert not opened.complete
        for shard in np.flatnonzero(opened.committed):  # whatever is committed is already final
            key = fmt.chunk_key("chosen_ids/values", int(shard))
            assert (tmp_path / "killed" / key).read_bytes() == (tmp_path / "reference" / key).read_bytes()
    fill(tmp_path / "killed")  # the same fill again resumes
    assert tree_digest(tmp_path / "killed") == tree_digest(tmp_path / "reference")


def test_two_processes_filling_disjoint_shards_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    fill(tmp_path / "reference")
    writer = plan(tmp_path / "shared")  # holds the lock; the two processes join its run, as ranks do
    procs = [_run_writer(tmp_path / "shared", *range(r, 7, 2)) for r in (0, 1)]
    assert [p.wait() for p in procs] == [0, 0]
    assert writer.missing_shards == []
    writer.finalize()
    assert tree_digest(tmp_path / "shared") == tree_digest(tmp_path / "reference")


@pytest.mark.parametrize("target", ["chosen_ids/values/c/2", "rejected_logps/c/2", "chosen_token_logps/offsets/c/2/0"])
def test_a_flipped_byte_is_detected_and_the_examples_named(tmp_path, target):
    fill(tmp_path / "s", n=40)
    path = tmp_path / "s" / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = logitstore.verify(tmp_path / "s")
    assert not report.ok
    assert report.problems[0] == f"damaged file {target}: shard 2, 8 examples (ex-32, ex-33, ex-34 and 5 more)"
    assert report.damaged_examples == [f"ex-{i}" for i in range(32, 40)]


def test_a_damaged_id_file_is_detected(tmp_path):
    fill(tmp_path / "s", n=20)
    path = tmp_path / "s" / "ids/values/c/0"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert logitstore.verify(tmp_path / "s").problems == ["damaged file ids/values/c/0 (example IDs / ID index)"]


def test_a_compressed_chunk_declaring_another_size_is_refused_before_decoding():
    import numcodecs

    frame = numcodecs.Zstd().encode(np.zeros(10_000, dtype=np.uint8))
    with pytest.raises(logitstore.FormatError, match="zstd chunk declares 10000 bytes, expected 512"):
        decode_chunk("zstd", memoryview(frame), np.dtype("uint16"), 512)
    blosc = numcodecs.Blosc(cname="zstd").encode(np.zeros(10_000, dtype=np.uint8))
    with pytest.raises(logitstore.FormatError, match="blosc chunk declares 10000 bytes"):
        decode_chunk("float16", memoryview(blosc), np.dtype("float16"), 512)


def test_a_shard_index_pointing_outside_its_file_is_refused(tmp_path):
    fill(tmp_path / "s", n=20, token_codec="raw")
    path = tmp_path / "s" / "prompt_ids/values/c/0"
    data = bytearray(path.read_bytes())
    n_inner = logitstore.open(tmp_path / "s").geometry.shard_capacity // 256
    index_start = len(data) - (16 * n_inner + 4)
    data[index_start:index_start + 8] = (10**9).to_bytes(8, "little")
    import google_crc32c

    data[-4:] = google_crc32c.value(bytes(data[index_start:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    recommit(tmp_path / "s", "prompt_ids/values/c/0")  # as a hostile author would
    with pytest.raises(logitstore.FormatError, match="shard index points outside the file"):
        logitstore.open(tmp_path / "s").ragged("prompt_ids", [0])


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a//b", ""])
def test_keys_cannot_leave_the_store(key):
    with pytest.raises(logitstore.FormatError):
        check_key(key)


def test_an_unknown_format_version_is_refused(tmp_path):
    import json

    fill(tmp_path / "s", n=10)
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["logitstore"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(logitstore.FormatError, match=r"has format version 99; this logitstore reads versions 2 \(pairs\), 3 \(unpaired\) and 4 \(completion\)"):
        logitstore.open(tmp_path / "s")


def test_a_store_pickles_as_its_path(tmp_path):
    import pickle

    fill(tmp_path / "s", n=10)
    store = logitstore.open(tmp_path / "s")
    store.ragged("chosen_ids", [0])  # open a memory map
    blob = pickle.dumps(store)
    assert len(blob) < 500
    assert pickle.loads(blob).get(["ex-3"])["chosen_tokens"][0] == store.get(["ex-3"])["chosen_tokens"][0]


def test_importing_logitstore_does_not_import_torch():
    code = "import sys, logitstore; logitstore.open; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-200, 0, width=32), min_size=1, max_size=400),
       st.sampled_from([-(2.0**-6), -(2.0**-8), -(2.0**-10)]))
def test_fixed_point_prefix_sums_stay_within_half_a_step(values, scale):
    from logitstore.quantize import decode_fixed, encode_fixed

    x = np.maximum(np.array(values, dtype=np.float64), 65000 * scale)  # inside the coded range
    codes, clipped = encode_fixed(x, np.array([x.size]), scale)
    assert clipped == 0
    decoded = decode_fixed(codes, scale).astype(np.float64)
    assert np.max(np.abs(np.cumsum(decoded) - np.cumsum(x))) <= abs(scale) / 2 + 1e-6 * x.size
    assert np.max(np.abs(decoded - x)) <= abs(scale) + 1e-6


def test_fixed_point_clips_explicitly_and_counts(tmp_path):
    from logitstore.quantize import encode_fixed

    codes, clipped = encode_fixed(np.array([-1.0, -500.0, -2.0]), np.array([3]), -(2.0**-8))
    assert clipped == 1 and codes.max() <= 65535


def test_a_torn_commit_record_counts_as_not_committed(tmp_path):
    fill(tmp_path / "s", n=40)
    record = tmp_path / "s" / "commits" / "c" / "1" / "0"
    record.write_bytes(record.read_bytes()[:-3])
    store = logitstore.open(tmp_path / "s")
    assert store.missing_shards == [1] and not store.complete
    fill(tmp_path / "s", n=40)  # resuming rewrites just that shard
    assert logitstore.open(tmp_path / "s").missing_shards == []
