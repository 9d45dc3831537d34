"""One test per rule of docs/FORMAT.md that an independent reader found unstated: the spec states it, the reader
checks it, and here is the exact answer."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore import format as fmt
from logitstore.quantize import decode_fixed, encode_fixed

from forge import header, pristine, recommit, refusal, store, write_header  # noqa: F401 (fixtures)
from synthetic import fill



def edited(store: Path, **changes) -> Path:
    h = header(store)
    for key, value in changes.items():
        if value is None:
            h.pop(key)
        else:
            h[key] = value
    write_header(store, h)
    return store


# ---- fingerprint_digest --------------------------------------------------------------------------------------

def test_an_edited_fingerprint_with_the_old_digest_is_refused(store):
    fingerprint = dict(header(store)["fingerprint"], test="edited")
    edited(store, fingerprint=fingerprint)
    wanted = hashlib.sha256(fmt.canonical_json(fingerprint)).hexdigest()
    old = header(store)["fingerprint_digest"]
    message = (f"{store}: header fingerprint_digest {old[:12]}... is not the SHA-256 of the fingerprint "
               f"({wanted[:12]}...): the fingerprint was edited")
    assert refusal(lambda: logitstore.open(store)) == message
    report = logitstore.verify(store)
    assert report.problems == [message]


def test_a_fingerprint_digest_in_capitals_is_refused(store):
    edited(store, fingerprint_digest=header(store)["fingerprint_digest"].upper())
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: header fingerprint_digest must be a SHA-256 in lowercase hex")


def test_an_edited_fingerprint_with_a_recomputed_digest_opens(store):
    fingerprint = dict(header(store)["fingerprint"], test="edited")
    edited(store, fingerprint=fingerprint, fingerprint_digest=logitstore.fingerprint_digest(fingerprint))
    assert logitstore.open(store).fingerprint == fingerprint  # a consistent header; the store digest changed


# ---- header keys and their types ---------------------------------------------------------------------------

def test_an_unknown_header_key_is_refused(store):
    edited(store, comment="hi")
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: unknown header key 'comment' (format version 2 has no such key)")


def test_an_unknown_tokenizer_key_is_refused(store):
    edited(store, tokenizer={"vocab_size": 32000, "chat_template": "x"})
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: header tokenizer has the unknown key 'chat_template' (allowed: bos_token_id, eos_token_id, "
        "pad_token_id, vocab_size)")


@pytest.mark.parametrize("vocab, ok", [(0, False), (1, True), (2**32, True), (2**32 + 1, False), (None, True),
                                       (32000.0, False)])
def test_vocab_size_is_null_or_from_1_to_2_to_the_32(store, vocab, ok):
    edited(store, tokenizer={"vocab_size": vocab})
    if ok:
        assert logitstore.open(store).tokenizer == {"vocab_size": vocab}
    else:
        assert refusal(lambda: logitstore.open(store)) == (
            f"{store}: header tokenizer.vocab_size must be an integer in [1, 4294967296] or null, got {vocab!r}")


@pytest.mark.parametrize("created", ["yesterday", "2026-01-01", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+00:00",
                                     "2026-13-01T00:00:00+00:00", "2026-01-01T00:00:00+01:00", 1700000000])
def test_created_must_be_a_utc_time_to_the_second(store, created):
    edited(store, created=created)
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: header created must be a UTC time as YYYY-MM-DDTHH:MM:SS+00:00, got {created!r}")


def test_created_to_the_second_in_utc_opens(store):
    edited(store, created="2023-11-14T22:13:20+00:00")
    assert logitstore.open(store).header["created"] == "2023-11-14T22:13:20+00:00"


@pytest.mark.parametrize("settings", [[], "fast", 3])
def test_settings_must_be_an_object(store, settings):
    edited(store, settings=settings)
    assert refusal(lambda: logitstore.open(store)) == f"{store}: header settings must be an object"


@pytest.mark.parametrize("entry", [{"id": "x", "line": 0, "reason": "r"}, {"id": 1, "line": 1, "reason": "r"},
                                   {"id": "x", "line": 1}, {"id": "x", "line": 1, "reason": "r", "more": 1}, "x"])
def test_skipped_entries_are_id_line_reason(store, entry):
    edited(store, skipped=[{"id": "ok", "line": 3, "reason": "empty chosen completion"}, entry])
    assert refusal(lambda: logitstore.open(store)).startswith(
        f"{store}: header skipped[1] must be {{id (a string), line (an integer from 1), reason (a string)}}, got ")


def test_token_id_fields_share_one_codec(store):
    fields = header(store)["fields"]
    fields["prompt_ids"] = dict(fields["prompt_ids"], codec="raw")
    edited(store, fields=fields)
    assert refusal(lambda: logitstore.open(store)) == (
        f"{store}: token id fields must share one dtype and one codec")


# ---- plan files when id_bytes = 0 ----------------------------------------------------------------------------

def test_a_store_whose_ids_are_empty_has_no_ids_values_plan_file(tmp_path):
    writer = logitstore.create(tmp_path / "s", [""], fingerprint={"t": 1}, vocab_size=100, max_length=8)
    h = header(tmp_path / "s")
    assert h["id_bytes"] == 0 and sorted(h["plan_files"]) == ["id_index/hash/c/0", "id_index/row/c/0",
                                                              "ids/offsets/c/0/0"]
    assert not (tmp_path / "s" / "ids" / "values" / "c").exists()
    writer.write_shard(0, {"prompt_ids": [np.array([1])], "chosen_ids": [np.array([2])],
                           "rejected_ids": [np.array([3])], "chosen_logps": [-1.0], "rejected_logps": [-2.0],
                           "chosen_tokens": [1], "rejected_tokens": [1]})
    writer.finalize()
    assert logitstore.open(tmp_path / "s").ids == [""] and logitstore.verify(tmp_path / "s").ok
    h["plan_files"]["ids/values/c/0"] = [0, hashlib.sha256(b"").hexdigest()]
    write_header(tmp_path / "s", h)
    assert refusal(lambda: logitstore.open(tmp_path / "s")) == (
        f"{tmp_path / 's'}: header plan_files must name exactly ['ids/offsets/c/0/0', 'id_index/hash/c/0', "
        "'id_index/row/c/0']")


# ---- complete, summary and the commit rows --------------------------------------------------------------------

def test_the_summary_is_what_the_data_and_commit_rows_say(store):
    s = logitstore.open(store)
    summary = s.header["summary"]
    table = s.commit_table()
    files = sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and p != store / "zarr.json")
    assert summary["data_bytes"] == files
    assert summary["clipped_values"] == int(table[:, 1].sum())
    rows = np.arange(len(s))
    assert summary["tokens"] == {f: int(sum(len(v) for v in s.ragged(f, rows))) for f in fmt.TOKEN_FIELDS}
    assert summary["scored_tokens"] == {f: int(s.row_values(rows)[f].sum()) for f in ("chosen_tokens",
                                                                                       "rejected_tokens")}


@pytest.mark.parametrize("key, value, problem", [
    ("clipped_values", 5, "summary.clipped_values is 5, but the commit rows give 0"),
    ("data_bytes", 1, "summary.data_bytes is 1, but the commit rows give {bytes}"),
    ("scored_tokens", {"chosen_tokens": 0, "rejected_tokens": 0},
     'summary.scored_tokens is {{"chosen_tokens":0,"rejected_tokens":0}}, but the stored data give {scored}'),
])
def test_a_summary_that_disagrees_is_a_verify_problem(store, key, value, problem):
    summary = header(store)["summary"]
    truth = dict(summary)
    edited(store, summary=dict(summary, **{key: value}))
    scored = fmt.canonical_json(truth["scored_tokens"]).decode()
    assert logitstore.verify(store).problems == [problem.format(bytes=truth["data_bytes"], scored=scored)]


def test_a_clipped_count_in_a_commit_row_must_match_the_summary(store):
    key = "commits/c/1/0"
    raw = (store / key).read_bytes()
    row = np.frombuffer(raw[:-4], "<u8").copy()
    row[1] = 7
    import google_crc32c

    payload = row.tobytes()
    (store / key).write_bytes(payload + google_crc32c.value(payload).to_bytes(4, "little"))
    assert logitstore.verify(store).problems == ["summary.clipped_values is 0, but the commit rows give 7"]


@pytest.mark.parametrize("summary", [None, {}, {"tokens": {}, "scored_tokens": {}, "clipped_values": 0,
                                                "data_bytes": 0}])
def test_complete_needs_a_well_formed_summary(store, summary):
    edited(store, summary=summary)
    message = refusal(lambda: logitstore.open(store))
    if summary is None:
        assert message == f"{store}: header complete and summary come together (finalisation writes both)"
    else:
        assert message.startswith(f"{store}: header summary must be {{tokens: {{prompt_ids, chosen_ids, "
                                  "rejected_ids}, scored_tokens: {chosen_tokens, rejected_tokens}, clipped_values, "
                                  "data_bytes} with counts from 0, got ")


def test_complete_with_an_uncommitted_shard_is_incomplete_and_damaged(store):
    (store / "commits" / "c" / "1" / "0").unlink()
    s = logitstore.open(store)
    assert s.header["complete"] is True and not s.complete and s.missing_shards == [1]
    assert refusal(lambda: s.get(["ex-17"])) == "rows requested from shards that are not written yet: 1"
    assert logitstore.verify(store).problems == [
        "damaged: the header says complete but 1 of 3 shards not written (first: 1)"]


def test_a_commit_row_starting_with_neither_0_nor_1_is_an_error(store):
    import google_crc32c

    key = "commits/c/2/0"
    row = np.frombuffer((store / key).read_bytes()[:-4], "<u8").copy()
    row[0] = 2
    payload = row.tobytes()
    (store / key).write_bytes(payload + google_crc32c.value(payload).to_bytes(4, "little"))
    message = (f"{store}: commit record of shard 2 starts with 2, neither 1 (committed) nor an all-zero row (not "
               "committed)")
    assert refusal(lambda: logitstore.open(store).get(["ex-33"])) == message
    assert logitstore.verify(store).problems == [message]


def test_an_all_zero_commit_row_is_not_committed(store):
    import google_crc32c

    key = "commits/c/2/0"
    payload = bytes(len((store / key).read_bytes()) - 4)
    (store / key).write_bytes(payload + google_crc32c.value(payload).to_bytes(4, "little"))
    assert logitstore.open(store).missing_shards == [2]


# ---- values ------------------------------------------------------------------------------------------------------

def test_float16_per_token_values_decode_to_float32_exactly(tmp_path):
    fill(tmp_path / "s", n=20, logp_codec="float16")
    s = logitstore.open(tmp_path / "s")
    decoded = s.ragged("chosen_token_logps", [3])[0]
    stored = s.ragged("chosen_token_logps", [3], decode=False)[0]
    assert decoded.dtype == np.float32 and stored.dtype == np.float16
    assert np.array_equal(decoded, stored.astype(np.float32))


def test_positive_values_are_clamped_to_0_when_encoded(tmp_path):
    codes, clipped = encode_fixed(np.array([0.25, -1.0, 1e-7]), np.array([3]), -2.0**-10)
    assert clipped == 0 and codes.tolist() == [0, 1024, 0]
    assert decode_fixed(codes, -2.0**-10).tolist() == [0.0, -1.0, 0.0]


def _frame_without_size(frame: bytes) -> bytes:
    """The same zstd frame with its header rewritten to declare no content size (a window descriptor instead)."""
    magic, fhd = struct.unpack_from("<IB", frame, 0)
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    assert single and dict_flag == 0
    size_bytes = (1, 2, 4, 8)[fcs_flag]
    blocks = frame[5 + size_bytes:]
    new_fhd = fhd & 0b00000100  # keep the checksum flag; no content size, not single segment
    return struct.pack("<IBB", magic, new_fhd, 0x08) + blocks  # window 2 KiB >= the 64-byte content


def test_a_zstd_chunk_without_a_declared_size_is_refused(store):
    key = "rejected_tokens/c/0"
    (store / key).write_bytes(_frame_without_size((store / key).read_bytes()))
    recommit(store, key)
    assert refusal(lambda: logitstore.open(store).get(["ex-1"])) == (
        f"{store}: {key}: zstd chunk declares no decoded size (the format requires it: 64 bytes)")


def test_an_all_zero_inner_chunk_may_be_written_or_left_out(store):
    import google_crc32c
    import numcodecs

    key = "chosen_ids/values/c/2"  # shard 2 holds 8 rows: the tail of its value range is left out
    h = header(store)
    n_inner = h["shard_capacity"] // h["inner_chunk"]
    raw = (store / key).read_bytes()
    index = np.frombuffer(raw[-(16 * n_inner + 4):-4], "<u8").reshape(n_inner, 2).copy()
    missing = np.flatnonzero(index[:, 0] == 2**64 - 1)
    assert missing.size  # zarr-python and logitstore leave all-zero chunks out
    before = logitstore.open(store)
    rows = list(range(32, 40))
    values, digest = before.ragged("chosen_ids", rows), before.digest
    data = raw[:-(16 * n_inner + 4)]
    zeros = numcodecs.Zstd(level=3).encode(np.zeros(h["inner_chunk"], "<u2").tobytes())
    index[missing[0]] = [len(data), len(zeros)]
    payload = index.astype("<u8").tobytes()
    (store / key).write_bytes(data + zeros + payload + google_crc32c.value(payload).to_bytes(4, "little"))
    recommit(store, key)
    h = header(store)
    h["summary"]["data_bytes"] += len(zeros)  # as a writer writing the chunk would have counted it
    write_header(store, h)
    after = logitstore.open(store)
    assert all(np.array_equal(a, b) for a, b in zip(after.ragged("chosen_ids", rows), values))
    assert logitstore.verify(store).ok and after.digest != digest


def test_source_date_epoch_must_be_whole_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert refusal(lambda: fill(tmp_path / "s", n=4)) == (
        "SOURCE_DATE_EPOCH must be whole seconds since 1970-01-01 UTC (an integer from 0), got 'yesterday'")
    assert not (tmp_path / "s").exists()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    fill(tmp_path / "s", n=4)
    assert header(tmp_path / "s")["created"] == "2023-11-14T22:13:20+00:00"


def _z(n: int) -> int:
    """docs/FORMAT.md, "Reader limits": zstd's compress bound plus a frame header."""
    return n + n // 256 + ((131072 - n) // 2048 if n < 131072 else 0) + 64


@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_the_largest_file_a_record_may_give_follows_the_documented_formula(tmp_path, codec):
    fill(tmp_path / "s", n=20, token_codec=codec)  # per-token values: fixed point (blosc)
    s = logitstore.open(tmp_path / "s")
    h = s.header
    r, inner, n_inner = h["rows_per_shard"], h["inner_chunk"], h["shard_capacity"] // h["inner_chunk"]
    b_ids = inner * 2  # uint16 token ids (vocabulary 32000)
    b_ids = {"zstd": _z(b_ids), "raw": b_ids}[codec]
    assert s._file_limit("chosen_logps") == _z(4 * r)
    assert s._file_limit("chosen_ids/offsets") == s._file_limit("content_key") == _z(16 * r)
    assert s._file_limit("chosen_ids/values") == n_inner * (b_ids + 16) + 4
    assert s._file_limit("chosen_token_logps/values") == n_inner * (inner * 2 + 16 + 16) + 4
