"""Stores from anywhere: what a hostile or damaged store can try, and the exact refusal each attempt meets.

Every case runs in this process (no subprocess per case); only the memory-bomb cases run in a forked child under an
address-space limit. A case that could hang (FIFOs) runs under an alarm.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import format as fmt

from forge import header, pristine, recommit, refusal, store, write_header  # noqa: F401 (fixtures)

SECRET = b"SECRET-OUTSIDE-THE-STORE\n" * 4



@pytest.fixture
def outside(tmp_path) -> Path:
    path = tmp_path / "outside.txt"
    path.write_bytes(SECRET)
    return path


@contextlib.contextmanager
def alarm(seconds: int):
    def fail(*_):
        raise TimeoutError("the reader blocked")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- code execution --------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _v2_pickle_array(folder: Path, marker: Path) -> None:
    """A Zarr v2 array whose only chunk is a pickle that creates `marker` when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "<f4", "compressor": {"id": "pickle"},
        "fill_value": None, "filters": None, "order": "C"}))
    (folder / "0").write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture
def unsafe_pickle(monkeypatch):
    """numcodecs' own guard against pickle decoding turned off, as on versions without it."""
    import numcodecs.pickles

    monkeypatch.setattr(numcodecs.pickles, "ALLOW_UNSAFE_PICKLE_DECODE", True, raising=False)


def test_the_payload_runs_when_the_codec_it_names_decodes_it(tmp_path, unsafe_pickle):
    """The control: with the guard off, the codec the metadata names runs the payload, so the refusals that follow
    are what keeps it from running."""
    import numcodecs

    marker = tmp_path / "ran"
    _v2_pickle_array(tmp_path / "a", marker)
    codec = numcodecs.get_codec(json.loads((tmp_path / "a" / ".zarray").read_text())["compressor"])
    codec.decode((tmp_path / "a" / "0").read_bytes())
    assert marker.exists()


def test_v2_metadata_with_a_pickle_codec_is_refused_and_never_runs(store, tmp_path, unsafe_pickle):
    marker = tmp_path / "ran"
    _v2_pickle_array(store / "chosen_logps", marker)
    expected = f"{store}: refusing Zarr v2 metadata chosen_logps/.zarray in a Zarr v3 store"
    assert refusal(lambda: logitstore.open(store)) == expected
    assert logitstore.verify(store).problems == [expected]
    assert not marker.exists()


def test_consolidated_metadata_in_the_root_is_refused_and_never_runs(store, tmp_path, unsafe_pickle):
    marker = tmp_path / "ran"
    _v2_pickle_array(tmp_path / "payload", marker)
    root = json.loads((store / "zarr.json").read_text())
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {
        "chosen_logps": json.loads((tmp_path / "payload" / ".zarray").read_text())}}
    (store / "zarr.json").write_text(json.dumps(root))
    expected = (f"{store}/zarr.json holds more than the header (consolidated metadata or other keys: "
                "consolidated_metadata)")
    assert refusal(lambda: logitstore.open(store)) == expected
    assert not marker.exists()


def test_a_pickle_codec_in_v3_metadata_is_refused(store):
    meta_path = store / "chosen_logps" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].append({"name": "numcodecs.pickle"})
    meta_path.write_text(json.dumps(meta))
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: chosen_logps/zarr.json differs from the metadata the header implies "
        "(codecs has 3 entries, expected 2)")


# ---- metadata edits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, difference", [
    (lambda m: m.update(data_type="int32"), "data_type is 'int32', expected 'float32'"),
    (lambda m: m["codecs"][0]["configuration"].update(endian="big"),
     "codecs.0.configuration.endian is 'big', expected 'little'"),
    (lambda m: m.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}),
     "chunk_key_encoding.configuration.separator is '.', expected '/'"),
    (lambda m: m["codecs"].insert(1, {"name": "transpose", "configuration": {"order": [0]}}),
     "codecs has 3 entries, expected 2"),
    (lambda m: m["codecs"].__setitem__(1, {"name": "gzip", "configuration": {"level": 3, "checksum": False}}),
     "codecs.1.name is 'gzip', expected 'zstd'"),
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[1]),
     "chunk_grid.configuration.chunk_shape.0 is 1, expected 16"),
    (lambda m: m.update(fill_value=0.0), "fill_value is 0.0, expected 'NaN'"),
    (lambda m: m.update(dimension_names=["x"]), "unexpected dimension_names"),
])
def test_array_metadata_must_be_exactly_what_the_header_implies(store, edit, difference):
    meta_path = store / "chosen_logps" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    expected = f"{store}: chosen_logps/zarr.json differs from the metadata the header implies ({difference})"
    assert refusal(lambda: logitstore.open(store)) == expected
    assert logitstore.verify(store).problems == [expected]


def test_nan_constants_in_metadata_are_not_json(store):
    text = (store / "zarr.json").read_text().replace('"fingerprint":{', '"fingerprint":{"x":NaN,', 1)
    (store / "zarr.json").write_text(text)
    assert refusal(lambda: logitstore.open(store)) == f"{store}/zarr.json is not valid JSON (NaN is not JSON)"


@pytest.mark.parametrize("key, value, message", [
    ("inner_chunk", 2**30, "header inner_chunk must be an integer in [1, 4194304], got 1073741824"),
    ("max_length", 2**26, "header max_length must be an integer in [1, 1048576], got 67108864"),
    ("num_examples", 2.5, "header num_examples must be an integer in [1, 2147483648], got 2.5"),
    ("rows_per_shard", True, "header rows_per_shard must be an integer in [1, 1048576], got True"),
    ("num_shards", 4, "header num_shards 4 differs from num_examples / rows_per_shard (3)"),
    ("shard_capacity", 2048, "header shard_capacity 2048 differs from rows_per_shard * max_length rounded up to "
                             "whole inner chunks (1024)"),
    ("fields", {"chosen_logps": {"kind": "row", "dtype": "int32"}},
     "header field chosen_logps must be {\"dtype\":\"float32\",\"kind\":\"row\"}, got "
     "{\"dtype\":\"int32\",\"kind\":\"row\"}"),
    ("tokenizer", {"pad_token_id": -1}, "header tokenizer.pad_token_id must be a token id or null, got -1"),
])
def test_header_values_outside_the_reader_limits_are_refused(store, key, value, message):
    h = header(store)
    if key == "fields":
        h["fields"].update(value)
    else:
        h[key] = value
    write_header(store, h)
    assert refusal(lambda: logitstore.open(store)) == f"{store}: {message}"


@pytest.mark.parametrize("scale", [float("inf"), 0.5, -0.0, -2.0])
def test_a_fixed_point_scale_must_be_finite_negative_and_sane(store, scale):
    text = (store / "zarr.json").read_text()
    h = header(store)
    old = json.dumps(h["fields"]["chosen_token_logps"]["scale"])
    new = "1e999" if scale == float("inf") else json.dumps(scale)
    (store / "zarr.json").write_text(text.replace(f'"scale":{old}', f'"scale":{new}'))
    shown = "inf" if scale == float("inf") else repr(scale)
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: header field chosen_token_logps: fixed-point scale must be a finite float in "
        f"[-1.0, -5.960464477539063e-08], got {shown}")


def test_mutated_headers_only_ever_raise_logitstore_errors(store):
    """Whatever a header holds, the reader answers with a LogitstoreError, never a built-in exception."""
    rng = np.random.default_rng(0)
    original = header(store)
    values = [None, -1, 0, 2**63, 1.5, "x", [], {}, True, {"kind": "ragged"}, [1, "a"], "\u202e\x1b[2J"]
    for _ in range(200):
        h = json.loads(json.dumps(original))
        target = h
        path = [k for k in h]
        key = path[rng.integers(len(path))]
        if isinstance(h[key], dict) and h[key] and rng.random() < 0.6:
            target = h[key]
            key = list(target)[rng.integers(len(target))]
        target[key] = values[rng.integers(len(values))]
        write_header(store, h)
        try:
            s = logitstore.open(store)
            s.get(["ex-1"])
            s.ragged("chosen_ids", [17])
        except logitstore.LogitstoreError:
            pass


# ---- links, FIFOs and devices ----------------------------------------------------------------------------------

def test_a_link_to_a_file_outside_is_never_followed(store, outside):
    target = store / "ids" / "values" / "c" / "0"
    target.unlink()
    target.symlink_to(outside)
    s = logitstore.open(store)
    expected = f"{store}: refusing ids/values/c/0: a symbolic link or not a regular file inside the store"
    assert refusal(lambda: s.get(["ex-1"])) == expected
    report = logitstore.verify(store)
    assert report.problems == ["symbolic link in the store: ids/values/c/0",
                               "damaged file ids/values/c/0 (example IDs / ID index)"]
    assert "SECRET" not in json.dumps(report.as_dict())


def test_a_link_to_a_folder_outside_is_never_followed(store, tmp_path):
    shutil.copytree(store / "chosen_ids", tmp_path / "elsewhere")
    shutil.rmtree(store / "chosen_ids")
    (store / "chosen_ids").symlink_to(tmp_path / "elsewhere")
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: refusing chosen_ids/zarr.json: a symbolic link or not a regular file inside the store")


def test_a_link_to_dev_zero_is_never_read(store):
    target = store / "chosen_logps" / "c" / "1"
    target.unlink()
    target.symlink_to("/dev/zero")
    s = logitstore.open(store)
    with alarm(10):
        assert refusal(lambda: s.get(["ex-20"])) == (
            f"{store}: refusing chosen_logps/c/1: a symbolic link or not a regular file inside the store")


def test_a_linked_root_document_is_refused(store, tmp_path):
    shutil.copy(store / "zarr.json", tmp_path / "root.json")
    (store / "zarr.json").unlink()
    (store / "zarr.json").symlink_to(tmp_path / "root.json")
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: refusing zarr.json: a symbolic link or not a regular file inside the store")


@pytest.mark.parametrize("key", ["zarr.json", "chosen_logps/c/0", "chosen_ids/values/c/2", "commits/c/1/0",
                                 "id_index/hash/c/0"])
def test_a_fifo_never_blocks(store, key):
    (store / key).unlink()
    os.mkfifo(store / key)
    expected = (f"{store}: refusing {key}: not a regular file (a FIFO, device or folder inside the store)")
    with alarm(10):
        s = None
        try:
            s = logitstore.open(store)
        except logitstore.LogitstoreError as exc:
            assert str(exc) == expected
        if s is not None:
            assert refusal(lambda: (s.get(["ex-0", "ex-17", "ex-39"]), s.ragged("chosen_ids", [39]))) == expected
        problems = logitstore.verify(store).problems
    assert any(f"not a regular file" in p for p in problems)


def test_a_device_node_is_never_read(store):
    key = "rejected_logps/c/0"
    (store / key).unlink()
    try:
        os.mknod(store / key, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    except (PermissionError, OSError):
        pytest.skip("this machine cannot create device nodes")
    s = logitstore.open(store)
    with alarm(10):
        assert refusal(lambda: s.get(["ex-3"])) == (
            f"{store}: refusing {key}: not a regular file (a FIFO, device or folder inside the store)")


# ---- missing and damaged files on every read path --------------------------------------------------------------

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _paths(store: Path):
    """Every way values leave a store: get, ragged, the loader, export."""
    from logitstore.export import joined_records

    def get():
        logitstore.open(store).get([f"ex-{i}" for i in range(40)])

    def ragged():
        s = logitstore.open(store)
        for field in s.fields:
            s.ragged(field, range(40))

    def loader():
        from logitstore.loader import PairDataset

        PairDataset(str(store), fields=("chosen_token_logps",)).__getitems__(list(range(40)))

    def export():
        joined_records(logitstore.open(store), [{"id": f"ex-{i}"} for i in range(40)])

    return {"get": get, "ragged": ragged, "loader": loader, "export": export}


DAMAGE = [
    ("chosen_logps/c/1", ["get", "loader", "export"]),
    ("chosen_ids/values/c/1", ["ragged", "loader"]),
    ("chosen_token_logps/offsets/c/1/0", ["ragged", "loader"]),
]


@pytest.mark.parametrize("key, paths", DAMAGE)
def test_a_flipped_bit_is_an_error_on_every_read_path(store, key, paths):
    _flip(store / key)
    expected = (f"{store}: damaged file {key} (its SHA-256 differs from the commit record): shard 1, "
                "16 examples (ex-16, ex-17, ex-18 and 13 more)")
    for name in paths:
        assert refusal(_paths(store)[name]) == expected, name


@pytest.mark.parametrize("key, paths", DAMAGE)
def test_a_missing_file_of_a_committed_shard_is_an_error_not_zeros(store, key, paths):
    (store / key).unlink()
    expected = (f"{store}: missing file {key} of committed shard 1, 16 examples (ex-16, ex-17, ex-18 and 13 more)")
    for name in paths:
        assert refusal(_paths(store)[name]) == expected, name


def test_a_truncated_file_is_an_error_naming_its_size(store):
    key = "rejected_ids/values/c/2"
    data = (store / key).read_bytes()
    (store / key).write_bytes(data[:-10])
    s = logitstore.open(store)
    assert refusal(lambda: s.ragged("rejected_ids", [33])) == (
        f"{store}: damaged file {key} (it has {len(data) - 10} bytes, its record says {len(data)}): shard 2, "
        "8 examples (ex-32, ex-33, ex-34 and 5 more)")


def test_damaged_id_files_are_an_error(store):
    _flip(store / "id_index" / "hash" / "c" / "0")
    assert refusal(lambda: logitstore.open(store).get(["ex-1"])) == (
        f"{store}: damaged file id_index/hash/c/0 (its SHA-256 differs from the header; example IDs / ID index)")


def test_a_damaged_store_stops_training(store):
    """The loader path that `logitstore train` uses raises on the first batch that touches the damage."""
    from logitstore.loader import make_loader

    _flip(store / "rejected_logps" / "c" / "0")
    loader, _ = make_loader(str(store), 8, shuffle=False)
    with pytest.raises(logitstore.FormatError, match=r"damaged file rejected_logps/c/0 \(its SHA-256"):
        next(iter(loader))


def test_a_change_with_recomputed_records_is_caught_by_a_pinned_digest(store):
    digest = logitstore.open(store).digest
    _flip(store / "chosen_logps" / "c" / "1")
    recommit(store, "chosen_logps/c/1")  # the author recomputes every record: size, SHA-256, commit crc32c
    s = logitstore.open(store)
    assert s.digest != digest
    assert refusal(lambda: logitstore.open(store, digest=digest)) == (
        f"{store} has digest {s.digest}, not the expected {digest}")
    assert logitstore.verify(store, digest=digest).problems == [
        f"{store} has digest {s.digest}, not the expected {digest}"]


def test_a_pinned_store_checks_files_against_the_pinned_records(store):
    digest = logitstore.open(store).digest
    s = logitstore.open(store, digest=digest)
    _flip(store / "chosen_logps" / "c" / "1")
    recommit(store, "chosen_logps/c/1")  # after pinning: the pinned commit table still holds the old SHA-256
    assert refusal(lambda: s.get(["ex-17"])).startswith(f"{store}: damaged file chosen_logps/c/1 (its SHA-256")


def test_damage_with_forged_records_still_cannot_exceed_decoded_sizes(store):
    """An author who rewrites a file and its records still meets the reader's size checks."""
    import numcodecs

    key = "chosen_token_logps/offsets/c/1/0"
    (store / key).write_bytes(numcodecs.Zstd().encode(np.zeros(16 * 16 * 4, dtype=np.uint8)))
    recommit(store, key)
    assert refusal(lambda: logitstore.open(store).ragged("chosen_token_logps", [17])) == (
        f"{store}: {key}: zstd chunk declares 1024 bytes, expected 256")


def test_offsets_pointing_into_another_shard_are_refused(store):
    import numcodecs

    key = "chosen_ids/offsets/c/1/0"
    (store / key).write_bytes(numcodecs.Zstd().encode(np.zeros((16, 2), dtype="<i8")))
    recommit(store, key)
    assert refusal(lambda: logitstore.open(store).ragged("chosen_ids", [17])) == (
        "chosen_ids/offsets: row 16 points outside its shard")


# ---- memory: bombs under an address-space limit ---------------------------------------------------------------

def _in_limited_child(budget: int, call) -> str:
    """Run `call` in a forked child whose address space may grow by at most `budget` bytes; return the message
    of the LogitstoreError it raised, 'MemoryError' or 'no error'."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + budget))
            try:
                call()
                out = "no error"
            except logitstore.LogitstoreError as exc:
                out = str(exc)
            except MemoryError:
                out = "MemoryError"
            except BaseException as exc:  # noqa: BLE001
                out = f"{type(exc).__name__}: {exc}"
            os.write(write, out.encode()[:4000])
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


BUDGET = 256 << 20


def test_a_zstd_bomb_in_a_row_chunk_is_refused_before_it_is_decompressed(store):
    import numcodecs

    key = "chosen_logps/c/1"
    bomb = numcodecs.Zstd(level=19).encode(np.zeros(1 << 30, dtype=np.uint8))  # ~ 35 KB, 1 GiB decoded
    (store / key).write_bytes(bomb)
    recommit(store, key)
    # The commit record now declares a bigger file than a row chunk can be: refused before the file is read.
    out = _in_limited_child(BUDGET, lambda: logitstore.open(store).get(["ex-17"]))
    assert out == (f"{store}: the commit record of shard 1 gives {key} {len(bomb)} bytes, more than a file of its "
                   "kind can have (191)")


def test_a_small_zstd_bomb_declaring_its_size_is_refused(store):
    import numcodecs

    key = "rejected_tokens/c/0"
    bomb = numcodecs.Zstd(level=19).encode(np.zeros(1 << 20, dtype=np.uint8))  # 49 bytes: fits; 1 MiB out
    (store / key).write_bytes(bomb)
    recommit(store, key)
    out = _in_limited_child(BUDGET, lambda: logitstore.open(store).get(["ex-1"]))
    assert out == f"{store}: {key}: zstd chunk declares 1048576 bytes, expected 64"


@pytest.mark.parametrize("key, value, message", [
    ("num_examples", 20_000_000, "header num_shards 3 differs from num_examples / rows_per_shard (1250000)"),
    ("inner_chunk", 2**30, "header inner_chunk must be an integer in [1, 4194304], got 1073741824"),
    ("max_length", 2**26, "header max_length must be an integer in [1, 1048576], got 67108864"),
])
def test_shape_bombs_in_the_header_are_refused_within_the_memory_budget(store, key, value, message):
    h = header(store)
    h[key] = value
    write_header(store, h)
    assert _in_limited_child(BUDGET, lambda: logitstore.open(store).get(["ex-1"])) == f"{store}: {message}"


def test_a_consistent_header_declaring_twenty_million_shards_is_refused(store):
    h = header(store)
    h.update(num_examples=20_000_000, rows_per_shard=1, num_shards=20_000_000, shard_capacity=256, max_length=64)
    write_header(store, h)
    out = _in_limited_child(BUDGET, lambda: logitstore.open(store).get(["ex-1"]))
    assert out == f"{store}: header num_shards must be an integer in [1, 262144], got 20000000"


def test_a_declared_shape_bomb_in_array_metadata_is_refused(store):
    meta_path = store / "commits" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [20_000_000, meta["shape"][1]]
    meta_path.write_text(json.dumps(meta))
    out = _in_limited_child(BUDGET, lambda: logitstore.open(store).committed)
    assert out == (f"{store}: commits/zarr.json differs from the metadata the header implies "
                   "(shape.0 is 20000000, expected 3)")


def test_an_oversized_header_is_refused_before_it_is_parsed(store):
    (store / "zarr.json").write_bytes(b'{"a": "' + b"x" * (9 << 20) + b'"}')
    out = _in_limited_child(BUDGET, lambda: logitstore.open(store))
    assert out == (f"{store}: zarr.json has {(9 << 20) + 9} bytes, more than the 8388608 a file of its kind may "
                   "have")


def test_deeply_nested_json_is_a_format_error(store):
    (store / "zarr.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert refusal(lambda: logitstore.open(store)) == f"{store}/zarr.json is not valid JSON (nested too deeply)"


# ---- what reaches a terminal -----------------------------------------------------------------------------------

def test_escape_sequences_in_ids_never_reach_the_terminal(tmp_path):
    from click.testing import CliRunner

    from logitstore.cli.main import cli

    ids = [f"\x1b[2Jid-{i}\u202e" for i in range(20)]
    writer = logitstore.create(tmp_path / "s", ids, fingerprint={"model": "\x1b]0;title\x07"}, vocab_size=100,
                               max_length=8, rows_per_shard=16, inner_chunk=64)
    from synthetic import shard_rows

    for shard in range(writer.geometry.num_shards):
        rows = shard_rows(writer, shard)
        for f in ("prompt_ids", "chosen_ids", "rejected_ids"):
            rows[f] = [np.minimum(x, 99) for x in rows[f]]
        writer.write_shard(shard, rows)
    writer.finalize()
    _flip(tmp_path / "s" / "chosen_logps" / "c" / "0")
    out = CliRunner().invoke(cli, ["verify", str(tmp_path / "s")]).output
    assert "\x1b" not in out and "\u202e" not in out
    assert "(\\x1b[2Jid-0\\u202e, \\x1b[2Jid-1\\u202e, \\x1b[2Jid-2\\u202e and 13 more)" in out
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "s")]).output
    assert "\x1b" not in info and "\x07" not in info
    assert json.loads(CliRunner().invoke(cli, ["info", str(tmp_path / "s"), "--json"]).output)["fingerprint"] == {
        "model": "\x1b]0;title\x07"}


def test_verify_names_files_the_format_does_not_name(store):
    (store / "chosen_ids" / "values" / "c" / "7").write_bytes(b"x")
    (store / "notes.txt").write_text("mine")
    assert logitstore.verify(store).problems == ["file the format does not name: notes.txt",
                                                 "file the format does not name: chosen_ids/values/c/7"]
    assert logitstore.open(store).get(["ex-1"])["row"][0] == 1  # readers never look at them


def test_reading_and_verifying_never_hand_anything_to_zarr_python(store):
    """The whole read path is the reader's own: zarr is not even imported."""
    import subprocess
    import sys

    code = ("import sys, logitstore; s = logitstore.open(sys.argv[1]); s.get(['ex-1']); "
            "[s.ragged(f, range(40)) for f in s.fields]; assert logitstore.verify(sys.argv[1]).ok; "
            "print(sorted(m for m in ('zarr', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
