"""docs/FORMAT.md is enough to write a store and to compute its digest: both done here with numpy, zarr, hashlib
and json only (no logitstore code), then checked against logitstore."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


SCORING = {"scorer": "from the document", "caf\u00e9": 1}


def content_key_from_the_document(prompt, chosen, rejected, scoring) -> np.ndarray:
    """docs/FORMAT.md, "Content key", step by step."""
    settings = canonical(scoring)
    h = hashlib.blake2b(digest_size=16)
    h.update(b"logitstore content key v1\n")
    h.update(len(settings).to_bytes(8, "little") + settings)
    for ids in (prompt, chosen, rejected):
        h.update(len(ids).to_bytes(8, "little") + np.asarray(ids).astype("<u4").tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def write_from_the_document(path: Path, ids: list[str], rows: dict, rps: int = 4, max_length: int = 16,
                            inner: int = 8) -> None:
    """A store of token ids only (zstd), written by following docs/FORMAT.md."""
    import google_crc32c
    import zarr
    from zarr.codecs import ZstdCodec

    n = len(ids)
    shards = -(-n // rps)
    cap = -(-(rps * max_length) // inner) * inner
    encoded = [i.encode() for i in ids]
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    zstd = [ZstdCodec(level=3, checksum=False)]
    lengths = np.array([len(b) for b in encoded])
    ends = np.cumsum(lengths)
    hashes = np.array([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") for b in encoded],
                      dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    plan = {"ids/values": np.frombuffer(b"".join(encoded), np.uint8), "ids/offsets": np.stack([ends - lengths, ends], 1),
            "id_index/hash": hashes[order], "id_index/row": order.astype(np.int64)}
    for name, value in plan.items():
        root.create_array(name, shape=value.shape, chunks=value.shape, dtype=value.dtype, compressors=None,
                          fill_value=0)[...] = value
    fills = {"chosen_logps": ("float32", np.nan), "rejected_logps": ("float32", np.nan),
             "chosen_tokens": ("int32", -1), "rejected_tokens": ("int32", -1)}
    for name, (dtype, fill) in fills.items():
        root.create_array(name, shape=(n,), chunks=(rps,), dtype=dtype, compressors=zstd,
                          fill_value=fill)[:] = rows[name]
    fields = ("prompt_ids", "chosen_ids", "rejected_ids")
    keys = root.create_array("content_key", shape=(n, 16), chunks=(rps, 16), dtype="uint8", compressors=zstd,
                             fill_value=0)
    keys[:] = np.stack([content_key_from_the_document(*(rows[f][i] for f in fields), SCORING) for i in range(n)])
    shard_files = list(fills) + ["content_key"] + [f"{f}/{part}" for f in fields for part in ("offsets", "values")]
    for f in fields:
        offsets = root.create_array(f"{f}/offsets", shape=(n, 2), chunks=(rps, 2), dtype="int64", compressors=zstd,
                                    fill_value=0)
        values = root.create_array(f"{f}/values", shape=(shards * cap,), chunks=(inner,), shards=(cap,),
                                   dtype="uint16", compressors=zstd, fill_value=0)
        for k in range(shards):
            seqs = rows[f][k * rps:(k + 1) * rps]
            flat = np.concatenate(seqs)
            ends = k * cap + np.cumsum([len(s) for s in seqs])
            offsets[k * rps:k * rps + len(seqs)] = np.stack([ends - [len(s) for s in seqs], ends], 1)
            buffer = np.zeros(cap, np.uint16)
            buffer[:flat.size] = flat
            values[k * cap:(k + 1) * cap] = buffer
    width = 2 + 5 * len(shard_files)
    commits = root.create_array("commits", shape=(shards, width), chunks=(1, width), dtype="uint64",
                                serializer="auto", compressors=None, filters=None, fill_value=0)
    for k in range(shards):
        record = [1, 0]
        for array in shard_files:
            two_dimensional = array.endswith("/offsets") or array == "content_key"
            key = path / (f"{array}/c/{k}/0" if two_dimensional else f"{array}/c/{k}")
            if key.exists():
                data = key.read_bytes()
                record += [len(data), *np.frombuffer(hashlib.sha256(data).digest(), "<u8").tolist()]
            else:
                record += [0] * 5
        payload = np.array(record, dtype="<u8").tobytes()
        (path / "commits" / "c" / str(k)).mkdir(parents=True, exist_ok=True)
        (path / "commits" / "c" / str(k) / "0").write_bytes(payload + google_crc32c.value(payload).to_bytes(4, "little"))
    meta = json.loads((path / "commits" / "zarr.json").read_text())
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    (path / "commits" / "zarr.json").write_text(json.dumps(meta))
    plan_keys = {"ids/values": "ids/values/c/0", "ids/offsets": "ids/offsets/c/0/0",
                 "id_index/hash": "id_index/hash/c/0", "id_index/row": "id_index/row/c/0"}
    fingerprint = {"made": "from the document"}
    header = {
        "format_version": 2, "num_examples": n, "rows_per_shard": rps, "num_shards": shards, "max_length": max_length,
        "shard_capacity": cap, "inner_chunk": inner, "id_bytes": int(lengths.sum()),
        "fields": {**{name: {"kind": "row", "dtype": dtype} for name, (dtype, _) in fills.items()},
                   "content_key": {"kind": "row", "dtype": "uint8", "width": 16},
                   **{f: {"kind": "ragged", "dtype": "uint16", "codec": "zstd"} for f in fields}},
        "content_key": {"version": 1, "scoring": SCORING},
        "provenance": {"sources": [], "reused": 0, "computed": n},
        "shard_files": shard_files, "fingerprint": fingerprint,
        "fingerprint_digest": hashlib.sha256(canonical(fingerprint)).hexdigest(),
        "tokenizer": {"vocab_size": 1000, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None},
        "settings": {}, "created": "2026-01-01T00:00:00+00:00", "skipped": [],
        "plan_files": {key: [(path / key).stat().st_size, hashlib.sha256((path / key).read_bytes()).hexdigest()]
                       for key in plan_keys.values()},
        "complete": True,
        "summary": {  # token totals, clipped fixed-point values (none here), bytes of every file but the root's
            "tokens": {f: int(sum(len(s) for s in rows[f])) for f in fields},
            "scored_tokens": {f"{side}_tokens": int(np.sum(rows[f"{side}_tokens"])) for side in ("chosen", "rejected")},
            "clipped_values": 0,
            "data_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p != path / "zarr.json"),
        },
    }
    (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                "attributes": {"logitstore": header}}, indent=2))


def digest_from_the_document(path: Path) -> str:
    """docs/FORMAT.md, "Store digest", step by step."""
    header = json.loads((path / "zarr.json").read_text())["attributes"]["logitstore"]
    h = hashlib.sha256(b"logitstore digest 2\n")
    for doc in sorted((p.relative_to(path).as_posix() for p in path.rglob("zarr.json")), key=str.encode):
        raw = (path / doc).read_bytes()
        h.update(doc.encode() + b"\n" + len(raw).to_bytes(8, "little") + raw)
    h.update(b"commits\n")
    width = 2 + 5 * len(header["shard_files"])
    for k in range(header["num_shards"]):
        record = path / "commits" / "c" / str(k) / "0"
        h.update(record.read_bytes()[:8 * width] if record.exists() else bytes(8 * width))
    return h.hexdigest()


def test_a_store_written_from_the_document_is_read_and_verified(tmp_path):
    import logitstore

    rng = np.random.default_rng(0)
    ids = [f"doc-{i}" for i in range(10)] + ["\u00e9t\u00e9"]
    n = len(ids)
    rows = {"prompt_ids": [rng.integers(2, 1000, rng.integers(1, 6)) for _ in range(n)],
            "chosen_ids": [rng.integers(2, 1000, rng.integers(1, 6)) for _ in range(n)],
            "rejected_ids": [rng.integers(2, 1000, rng.integers(1, 6)) for _ in range(n)]}
    for side in ("chosen", "rejected"):
        rows[f"{side}_tokens"] = np.array([len(c) for c in rows[f"{side}_ids"]], dtype=np.int32)
        rows[f"{side}_logps"] = (-rng.random(n) * rows[f"{side}_tokens"]).astype(np.float32)
    write_from_the_document(tmp_path / "s", ids, rows)
    store = logitstore.open(tmp_path / "s")
    report = logitstore.verify(tmp_path / "s")
    assert report.ok, report.problems
    assert store.ids == ids and store.complete
    got = store.get(ids[::-1])
    assert np.array_equal(got["chosen_logps"], rows["chosen_logps"][::-1])
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for row in range(n):
            assert np.array_equal(store.ragged(field, [row])[0], rows[field][row])
    assert store.digest == digest_from_the_document(tmp_path / "s") == report.digest
    assert store.scoring == SCORING and store.provenance == {"sources": [], "reused": 0, "computed": n}
    assert np.array_equal(store.content_keys([3, 0]), logitstore.content_keys(
        *([rows[f][r] for r in (3, 0)] for f in ("prompt_ids", "chosen_ids", "rejected_ids")), SCORING))


def test_the_digest_of_a_logitstore_store_follows_the_document(tmp_path):
    import logitstore

    from synthetic import fill

    fill(tmp_path / "s", n=40, shards=[0, 2], finalize=False)  # a shard not committed: zeros in the table
    assert logitstore.open(tmp_path / "s").digest == digest_from_the_document(tmp_path / "s")
