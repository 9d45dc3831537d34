"""The content key array from a hostile or damaged store: pinned metadata, committed and checksummed per shard,
decoded into the size the header implies, and checked against the stored token ids by `verify` and by every copy.

Same setting as tests/test_hostile.py: each case runs in this process and asserts the exact refusal.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import logitstore
from logitstore.derive import merge, subset

from forge import header, pristine, recommit, refusal, store, write_header  # noqa: F401 (fixtures)

KEY = "content_key/c/1/0"
SHARD_1 = "shard 1, 16 examples (ex-16, ex-17, ex-18 and 13 more)"



def _zstd(array: np.ndarray) -> bytes:
    import numcodecs

    return numcodecs.Zstd(level=3).encode(np.ascontiguousarray(array))


# ---- metadata --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, difference", [
    (lambda m: m.update(data_type="uint16"), "data_type is 'uint16', expected 'uint8'"),
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[16, 8]),
     "chunk_grid.configuration.chunk_shape.1 is 8, expected 16"),
    (lambda m: m.update(shape=[40, 32]), "shape.1 is 32, expected 16"),
    (lambda m: m["codecs"].append({"name": "numcodecs.pickle"}), "codecs has 3 entries, expected 2"),
    (lambda m: m.update(fill_value=7), "fill_value is 7, expected 0"),
])
def test_content_key_metadata_must_be_exactly_what_the_header_implies(store, edit, difference):
    meta_path = store / "content_key" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    expected = f"{store}: content_key/zarr.json differs from the metadata the header implies ({difference})"
    assert refusal(lambda: logitstore.open(store)) == expected
    assert logitstore.verify(store).problems == [expected]


def test_content_key_metadata_is_required(store):
    (store / "content_key" / "zarr.json").unlink()
    assert refusal(lambda: logitstore.open(store)) == f"{store}: content_key/zarr.json is missing"


# ---- header entries --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda h: h["fields"].pop("content_key"),
     'header field content_key must be {"dtype":"uint8","kind":"row","width":16}, got None'),
    (lambda h: h["fields"]["content_key"].update(width=32),
     'header field content_key must be {"dtype":"uint8","kind":"row","width":16}, got '
     '{"dtype":"uint8","kind":"row","width"...'),
    (lambda h: h.pop("content_key"), "header lacks the required key content_key"),
    (lambda h: h["content_key"].update(version=2),
     "header content_key.version 2 is not one this logitstore computes (1)"),
    (lambda h: h["content_key"].update(scoring=[1]), "header content_key.scoring must be an object, got [1]"),
    (lambda h: h["content_key"].update(scoring={"x": "y" * 5000}),
     "header content_key.scoring is above the limit of 4096 bytes"),
    (lambda h: h.pop("provenance"), "header lacks the required key provenance"),
    (lambda h: h["provenance"].update(computed=39),
     "header provenance reused and computed must be counts that add up to num_examples (40), got [0,39]"),
    (lambda h: h["provenance"].update(computed=-1, reused=41),
     "header provenance reused and computed must be counts that add up to num_examples (40), got [41,-1]"),
    (lambda h: h["provenance"].update(sources=[{}] * 1025),
     "header provenance.sources must be a list of at most 1024 stores"),
    (lambda h: h["provenance"].update(sources=[{"path": "x" * 5000, "fingerprint_digest": "0" * 64,
                                                "digest": "0" * 64, "reused": 0}]),
     "header provenance.sources[0] must be {path (at most 4096 characters), fingerprint_digest, digest (SHA-256 "
     "in hex), reused (a count)}, got {\"digest\":\"00000000000000000000000000..."),
    (lambda h: h["provenance"].update(sources=[{"path": "a", "fingerprint_digest": "0" * 64,
                                                "digest": "Z" * 64, "reused": 0}]),
     "header provenance.sources[0] must be {path (at most 4096 characters), fingerprint_digest, digest (SHA-256 "
     "in hex), reused (a count)}, got {\"digest\":\"ZZZZZZZZZZZZZZZZZZZZZZZZZZ..."),
    (lambda h: h["provenance"].update(sources=[{"path": "a", "fingerprint_digest": "0" * 64, "digest": "0" * 64,
                                                "reused": 5}]),
     "header provenance: the sources' reused counts add up to 5, not to reused (0)"),
])
def test_content_key_and_provenance_header_entries_are_checked(store, edit, message):
    h = header(store)
    edit(h)
    write_header(store, h)
    assert refusal(lambda: logitstore.open(store)) == f"{store}: {message}"


# ---- damaged and forged files ----------------------------------------------------------------------------------

def test_a_flipped_bit_in_content_keys_is_an_error_on_every_path_that_reads_them(store, tmp_path):
    data = bytearray((store / KEY).read_bytes())
    data[len(data) // 2] ^= 0x01
    (store / KEY).write_bytes(bytes(data))
    expected = f"{store}: damaged file {KEY} (its SHA-256 differs from the commit record): {SHARD_1}"
    s = logitstore.open(store)
    assert refusal(lambda: s.content_keys([17])) == expected
    assert s.content_keys([3]).shape == (1, 16)  # other shards read on
    assert refusal(lambda: merge([store], tmp_path / "m")) == expected
    assert logitstore.verify(store).problems == [f"damaged file {KEY}: {SHARD_1}"]


def test_a_missing_content_key_file_of_a_committed_shard_is_an_error_not_zeros(store):
    (store / KEY).unlink()
    assert refusal(lambda: logitstore.open(store).content_keys([17])) == (
        f"{store}: missing file {KEY} of committed shard 1, 16 examples (ex-16, ex-17, ex-18 and 13 more)")


def test_content_keys_are_committed_and_enter_the_digest(store):
    digest = logitstore.open(store).digest
    rows = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    (store / KEY).write_bytes(_zstd(rows))
    recommit(store, KEY)  # a forger recomputes the size, SHA-256 and commit crc32c
    forged = logitstore.open(store)
    assert forged.digest != digest
    assert refusal(lambda: logitstore.open(store, digest=digest)) == (
        f"{store} has digest {forged.digest}, not the expected {digest}")


def test_forged_content_key_bytes_cannot_exceed_the_decoded_size(store):
    (store / KEY).write_bytes(_zstd(np.zeros((16, 32), dtype=np.uint8)))
    recommit(store, KEY)
    assert refusal(lambda: logitstore.open(store).content_keys([17])) == (
        f"{store}: {KEY}: zstd chunk declares 512 bytes, expected 256")


def test_a_recorded_content_key_size_beyond_any_chunk_is_refused_before_reading(store):
    (store / KEY).write_bytes(b"\0" * 100_000)
    recommit(store, KEY)
    message = refusal(lambda: logitstore.open(store).content_keys([17]))
    assert message.startswith(f"{store}: the commit record of shard 1 gives {KEY} 100000 bytes, more than a file "
                              "of its kind can have (")


def test_forged_content_keys_are_found_by_verify_and_refused_by_every_copy(store, tmp_path):
    """Well-formed keys that are not the hash of their row's ids: a reuse would lend values to another pair."""
    keys = logitstore.open(store).content_keys(range(16, 32))
    (store / KEY).write_bytes(_zstd(keys[::-1]))  # rows 16..31 get each other's keys
    recommit(store, KEY)
    assert logitstore.verify(store).problems == [
        "content_key disagrees with the stored token ids for 16 examples (first: ex-16)"]
    expected = (f"{store}: the content key of ex-16 disagrees with its token ids (1 of 16 rows read); run "
                "logitstore verify on it")
    assert refusal(lambda: subset(store, tmp_path / "sub", exclude=["ex-0"])) == expected
    assert not (tmp_path / "sub" / "zarr.json").exists() or not logitstore.open(tmp_path / "sub").complete


def test_a_subset_of_a_sound_store_is_accepted_and_its_digest_verifies(store, tmp_path):
    result = subset(store, tmp_path / "sub", exclude=["ex-3"])
    out = logitstore.open(tmp_path / "sub")
    report = logitstore.verify(tmp_path / "sub", digest=out.digest)
    assert report.ok, report.problems
    assert result.examples == 39 and out.provenance["sources"][0]["digest"] == logitstore.open(store).digest
    src = logitstore.open(store)
    assert np.array_equal(out.content_keys(), src.content_keys(src.rows([i for i in src.ids if i != "ex-3"])))


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of the CLI's entry point, run in this process."""
    from logitstore.cli.main import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.strip()


def test_subset_and_merge_refuse_a_source_other_than_the_pinned_one(store, tmp_path, capsys):
    digest = logitstore.open(store).digest
    (tmp_path / "ids.txt").write_text("ex-1\nex-2\n")
    args = ["subset", str(store), "--out", str(tmp_path / "a"), "--ids", str(tmp_path / "ids.txt")]
    assert _cli(capsys, *args, "--expect-digest", "0" * 64) == (
        1, f"Error: {store} has digest {digest}, not the expected {'0' * 64}")
    assert _cli(capsys, *args, "--expect-digest", digest) == (0, "")
    merged = ["merge", str(store), str(tmp_path / "a"), "--out", str(tmp_path / "m")]
    code, err = _cli(capsys, *merged, "--expect-digest", digest)
    assert (code, err.splitlines()[-1]) == (2, "Error: give one --expect-digest per store (2), in order, or none")
    code, err = _cli(capsys, *merged, "--expect-digest", digest, "--expect-digest", digest)
    assert code == 1 and err.startswith(f"Error: {tmp_path / 'a'} has digest ")
    digest_a = logitstore.open(tmp_path / "a").digest
    assert _cli(capsys, *merged, "--expect-digest", digest, "--expect-digest", digest_a) == (0, "")
    assert logitstore.verify(tmp_path / "m", digest=logitstore.open(tmp_path / "m").digest).ok
