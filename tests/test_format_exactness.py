"""The rules docs/FORMAT.md states so that a store's bytes have one reading: each test forges exactly one kind of
damage a lax reader would pass over (records recomputed, as a hostile author would) and pins the one line the
reader refuses it with."""

from __future__ import annotations

import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from numcodecs import Zstd

import logitstore
from logitstore import format as fmt
from logitstore import topk_codec as C
from logitstore.errors import FormatError

from forge import header, pristine, recommit, refusal, store, write_header  # noqa: F401 (fixtures)

EMPTY_FRAME = Zstd(level=3).encode(b"")
SKIPPABLE_FRAME = struct.pack("<II", 0x184D2A50, 4) + b"junk"


# ---- zstd chunks are exactly one frame -----------------------------------------------------------------------

@pytest.mark.parametrize("tail, size", [(EMPTY_FRAME, len(EMPTY_FRAME)), (SKIPPABLE_FRAME, 12)])
def test_bytes_after_a_chunks_zstd_frame_are_refused(store, tail, size):
    key = "chosen_logps/c/1"
    (store / key).write_bytes((store / key).read_bytes() + tail)  # zstd itself decodes both and ignores them
    recommit(store, key)
    assert refusal(lambda: logitstore.open(store).get(["ex-20"])) == (
        f"{store}: {key}: zstd chunk has {size} bytes after its frame (a chunk is exactly one frame)")


@pytest.mark.parametrize("tail", [EMPTY_FRAME, SKIPPABLE_FRAME])
def test_bytes_after_a_streams_zstd_frame_are_refused(tail):
    blob = C._pack(np.array([0, 0], np.uint64)) + tail  # m = 0, no prior: the order 0 .. V-1
    with pytest.raises(FormatError, match=rf"^teacher context: {len(tail)} bytes after the zstd frame \(a stream is "
                                          r"exactly one frame\)$"):
        C.decode_order(blob, 10)


def test_a_frame_cut_inside_its_blocks_is_refused_as_truncated():
    blob = C._pack(np.arange(300, dtype=np.uint64))
    with pytest.raises(FormatError, match="^teacher context: truncated zstd frame$"):
        C.decode_order(blob[:-6], 1000)


# ---- varints have one spelling -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"\x80\x00", b"\x85\x80\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff\x00"])
def test_an_overlong_varint_is_refused(raw):
    with pytest.raises(FormatError, match=r"^x: a value is not in its shortest form \(an overlong varint\)$"):
        C.varint_decode(raw, 1, "x")


def test_shortest_varints_decode_including_the_largest():
    raw = b"\x00\x7f\x80\x01" + b"\xff" * 8 + b"\x7f"
    assert C.varint_decode(raw, 4, "x").tolist() == [0, 127, 128, 2 ** 63 - 1]


def test_an_overlong_varint_in_a_top_k_stream_is_refused():
    context = C.vocab_order(np.array([0]), 10)
    record = logitstore.teacher.TopK(np.array([[3]], np.int32), np.array([[-1.0]], np.float32),
                                     np.array([-0.5], np.float32))
    streams = dict(C.encode_top_k(record, context, "sqrt").streams)
    streams["ids"] = C._zstd(b"\x83\x00")  # rank 3 spelled in two bytes
    with pytest.raises(FormatError, match=r"^top-k ids: a value is not in its shortest form \(an overlong varint\)$"):
        C.decode_top_k(streams, 1, 1, context, "sqrt")


# ---- Blosc buffers are the ones the metadata names -----------------------------------------------------------

def _rewrite_inner_chunk(store: Path, key: str, edit) -> None:
    """Apply `edit` to the first stored inner chunk of a values file, rebuild the shard index, recommit."""
    h = header(store)
    n_inner = h["shard_capacity"] // h["inner_chunk"]
    data = (store / key).read_bytes()
    index = np.frombuffer(data[-(16 * n_inner + 4):-4], "<u8").reshape(n_inner, 2).copy()
    chunks = [None if off == 2 ** 64 - 1 else data[off:off + size] for off, size in index.tolist()]
    first = next(j for j, c in enumerate(chunks) if c is not None)
    chunks[first] = edit(chunks[first])
    body, at = b"", 0
    for j, chunk in enumerate(chunks):
        if chunk is not None:
            index[j] = [at, len(chunk)]
            body += chunk
            at += len(chunk)
    raw_index = index.astype("<u8").tobytes()
    (store / key).write_bytes(body + raw_index + google_crc32c.value(raw_index).to_bytes(4, "little"))
    recommit(store, key)


def _set_byte(at: int, value: int):
    return lambda chunk: chunk[:at] + bytes([value]) + chunk[at + 1:]


@pytest.mark.parametrize("at, value, message", [
    (2, 0x31, "blosc chunk flags 0x31 name another compressor or shuffle than the metadata's zstd with byte "
              "shuffle (expected 0x91, 0x93, 0x81 or 0x83)"),  # lz4 where the metadata says zstd
    (2, 0x95, "blosc chunk flags 0x95 name another compressor or shuffle than the metadata's zstd with byte "
              "shuffle (expected 0x91, 0x93, 0x81 or 0x83)"),  # bit shuffle as well
    (2, 0x90, "blosc chunk flags 0x90 name another compressor or shuffle than the metadata's zstd with byte "
              "shuffle (expected 0x91, 0x93, 0x81 or 0x83)"),  # no shuffle
    (3, 4, "blosc chunk of type size 4, expected 2"),
    (0, 3, "blosc chunk of format version 3.1, expected 2.1 (c-blosc1 with zstd)"),
])
def test_a_blosc_buffer_that_disagrees_with_the_metadata_is_refused(store, at, value, message):
    key = "chosen_token_logps/values/c/0"
    _rewrite_inner_chunk(store, key, _set_byte(at, value))
    assert refusal(lambda: logitstore.open(store).ragged("chosen_token_logps", [0])) == (
        f"{store}: {key}: {message}")


def test_every_blosc_buffer_the_writer_writes_has_flags_0x91_or_0x93(pristine):
    """What the rule above admits covers what c-blosc1 writes (0x02: stored uncompressed, 0x10: blocks not split)."""
    h = header(pristine)
    n_inner = h["shard_capacity"] // h["inner_chunk"]
    flags = set()
    for field in ("chosen_token_logps", "rejected_token_logps"):
        for path in (pristine / field / "values" / "c").iterdir():
            data = path.read_bytes()
            index = np.frombuffer(data[-(16 * n_inner + 4):-4], "<u8").reshape(n_inner, 2)
            flags |= {data[off + 2] for off, _ in index.tolist() if off != 2 ** 64 - 1}
    assert flags and flags <= {0x91, 0x93}


# ---- the header's required keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(logitstore.header.REQUIRED_KEYS - {"format_version"}))
def test_a_header_without_a_required_key_is_refused_naming_it(store, key):
    h = header(store)
    h.pop(key)
    write_header(store, h)
    assert refusal(lambda: logitstore.open(store)) == f"{store}: header lacks the required key {key}"


def test_a_header_without_format_version_is_refused(store):
    h = header(store)
    h.pop("format_version")
    write_header(store, h)
    assert refusal(lambda: logitstore.open(store)).startswith(f"{store} has ")


# ---- ids/offsets ---------------------------------------------------------------------------------------------

def _forge_id_offsets(store: Path, edit) -> None:
    key = "ids/offsets/c/0/0"
    offsets = np.frombuffer((store / key).read_bytes(), "<i8").reshape(-1, 2).copy()
    edit(offsets)
    (store / key).write_bytes(offsets.astype("<i8").tobytes())
    recommit(store, key)


def test_id_offsets_that_skip_bytes_are_refused(store):
    def skip(o):  # row 5's ID starts a byte late: a byte of ids/values belongs to no ID
        o[5, 0] += 1
    _forge_id_offsets(store, skip)
    assert refusal(lambda: logitstore.open(store).ids) == (
        f"{store}: ID offsets: row 5's ID does not start where the previous one ends (the IDs lie back to back in "
        "row order)")


def test_id_offsets_that_share_bytes_are_refused(store):
    def share(o):  # rows 3 and 4 name the same bytes: two rows with one ID
        o[4] = o[3]
    _forge_id_offsets(store, share)
    assert refusal(lambda: logitstore.open(store).ids) == (
        f"{store}: ID offsets: row 4's ID does not start where the previous one ends (the IDs lie back to back in "
        "row order)")


def test_id_offsets_that_stop_short_of_id_bytes_are_refused(store):
    def short(o):
        o[-1, 1] -= 1
    _forge_id_offsets(store, short)
    total = header(store)["id_bytes"]
    assert refusal(lambda: logitstore.open(store).ids) == (
        f"{store}: ID offsets end at byte {total - 1}, but id_bytes is {total}")


def _forge_ids(store: Path, ids: list[str]) -> None:
    """Rewrite the ID files for `ids` (offsets back to back, the index sorted), every record recomputed."""
    encoded = [i.encode() for i in ids]
    ends = np.cumsum([len(b) for b in encoded])
    offsets = np.stack([ends - [len(b) for b in encoded], ends], 1).astype("<i8")
    hashes = fmt.id_hashes(ids)
    order = np.argsort(hashes, kind="stable")
    files = {"ids/values/c/0": b"".join(encoded), "ids/offsets/c/0/0": offsets.tobytes(),
             "id_index/hash/c/0": hashes[order].astype("<u8").tobytes(),
             "id_index/row/c/0": order.astype("<i8").tobytes()}
    h = header(store)
    h["id_bytes"] = int(ends[-1])
    write_header(store, h)
    (store / "ids" / "values" / "zarr.json").write_bytes(
        fmt.canonical_json(fmt.metadata_documents(h)["ids/values/zarr.json"]))
    for key, data in files.items():
        (store / key).write_bytes(data)
        recommit(store, key)


def test_a_repeated_id_is_a_verify_problem(store):
    ids = [f"ex-{i}" for i in range(40)]
    ids[7] = "ex-3"
    _forge_ids(store, ids)
    assert logitstore.verify(store).problems == ["rows 3 and 7 have the same ID 'ex-3'"]


def test_an_id_index_that_does_not_follow_from_the_ids_is_a_verify_problem(store):
    rows = np.frombuffer((store / "id_index/row/c/0").read_bytes(), "<i8").copy()
    rows[[0, 1]] = rows[[1, 0]]  # still a sorted hash column, still in range: lookups only fail
    (store / "id_index/row/c/0").write_bytes(rows.astype("<i8").tobytes())
    recommit(store, "id_index/row/c/0")
    assert logitstore.verify(store).problems == ["id_index/row is not the stable argsort of the IDs' hashes"]


def test_an_id_hash_that_is_not_the_ids_is_a_verify_problem(store):
    hashes = np.frombuffer((store / "id_index/hash/c/0").read_bytes(), "<u8").copy()
    hashes[0] = 0  # still ascending
    (store / "id_index/hash/c/0").write_bytes(hashes.astype("<u8").tobytes())
    recommit(store, "id_index/hash/c/0")
    assert logitstore.verify(store).problems == ["id_index/hash is not the IDs' hashes in ascending order"]


# ---- fixed point: code 65535 is a value ----------------------------------------------------------------------

def test_fixed_point_code_65535_is_a_value_not_a_marker(tmp_path):
    """A store may hold code 65535 (another writer's, or codes copied from one): it decodes as 65535 * scale, it
    is not the fill value or a missing-value marker, and verify sums it like any other."""
    from synthetic import plan, shard_rows

    writer = plan(tmp_path / "s", n=16, logp_codec="fixed")
    data = shard_rows(writer, 0)
    scale = np.float32(fmt.DEFAULT_FIXED_SCALE)
    data["chosen_ids"][0] = np.array([5, 6], np.int64)
    data["chosen_token_logps"][0] = np.array([65535, 1], np.uint16)  # codes pass through the writer unchanged
    data["chosen_tokens"][0] = 2
    data["chosen_logps"][0] = float(np.float32(65535) * scale + scale)
    writer.write_shard(0, data)
    writer.finalize()
    store = logitstore.open(tmp_path / "s")
    assert store.ragged("chosen_token_logps", [0])[0].tolist() == [np.float32(65535) * scale, scale]
    assert logitstore.verify(tmp_path / "s").ok
