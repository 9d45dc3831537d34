"""Random and sequential 32-example batches by example ID: token ids (prompt, chosen, rejected) and per-token
log-probs (chosen, rejected), against the memmap ceiling, zarr-python's own path and a pickle per batch."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import logitstore

from corpus import Corpus, write_store

BATCH = 32
FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_token_logps", "rejected_token_logps")


def corpus_field(corpus: Corpus, field: str) -> list[np.ndarray]:
    return {"prompt_ids": corpus.prompt, "chosen_ids": corpus.chosen, "rejected_ids": corpus.rejected,
            "chosen_token_logps": corpus.chosen_logps, "rejected_token_logps": corpus.rejected_logps}[field]


class MemmapCeiling:
    """The same bytes as flat .npy files read through np.memmap: what no store can beat."""

    def __init__(self, corpus: Corpus, folder: Path):
        self.row = {key: i for i, key in enumerate(corpus.ids)}
        self.values, self.offsets = {}, {}
        for field in FIELDS:
            seqs = corpus_field(corpus, field)
            flat = np.concatenate(seqs)
            np.save(folder / f"{field}.npy", flat)
            self.values[field] = np.load(folder / f"{field}.npy", mmap_mode="r")
            ends = np.cumsum([len(s) for s in seqs])
            self.offsets[field] = np.stack([ends - [len(s) for s in seqs], ends], 1)

    def read(self, ids):
        rows = [self.row[k] for k in ids]
        return {f: [self.values[f][a:b] for a, b in self.offsets[f][rows]] for f in FIELDS}


class ZarrPython:
    """zarr-python's own read path over the same store: one orthogonal-index read per field per batch."""

    def __init__(self, path: Path):
        import zarr

        self.group = zarr.open_group(str(path), mode="r")
        self.store = logitstore.open(path)
        self.offsets = {f: self.store.offsets(f) for f in FIELDS}

    def read(self, ids):
        rows = self.store.rows(ids)
        out = {}
        for f in FIELDS:
            spans = self.offsets[f][rows]
            index = np.concatenate([np.arange(a, b) for a, b in spans])
            array = self.group[f"{f}/values"]
            values = array.oindex[index]
            if "scale" in array.attrs:  # fixed point: plain integers with their scale in the attributes
                values = values.astype(np.float32) * np.float32(array.attrs["scale"])
            out[f] = np.split(values, np.cumsum(spans[:, 1] - spans[:, 0])[:-1])
        return out


class PicklePerBatch:
    """What users write today: one pickle file per fixed batch, as the data loader produced it."""

    def __init__(self, corpus: Corpus, folder: Path):
        self.where = {}
        for b, start in enumerate(range(0, len(corpus), BATCH)):
            rows = range(start, min(start + BATCH, len(corpus)))
            batch = {f: [corpus_field(corpus, f)[i] for i in rows] for f in FIELDS}
            batch["ids"] = [corpus.ids[i] for i in rows]
            with open(folder / f"batch_{b}.pkl", "wb") as fh:
                pickle.dump(batch, fh)
            for j, i in enumerate(rows):
                self.where[corpus.ids[i]] = (folder / f"batch_{b}.pkl", j)

    def read(self, ids):
        cache, out = {}, {f: [] for f in FIELDS}
        for key in ids:
            path, j = self.where[key]
            if path not in cache:
                with open(path, "rb") as fh:
                    cache[path] = pickle.load(fh)  # noqa: S301 - the baseline being measured
            for f in FIELDS:
                out[f].append(cache[path][f][j])
        return out


class Logitstore:
    def __init__(self, path: Path, cache_bytes: int = 256 << 20):
        self.store = logitstore.open(path, cache_bytes=cache_bytes)

    def read(self, ids):
        rows = self.store.rows(ids)
        return {f: self.store.ragged(f, rows) for f in FIELDS}


@pytest.fixture(scope="module")
def readers(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("read")
    (folder / "pickles").mkdir()
    raw = write_store(corpus, folder / "raw.lstore", token_codec="raw", logp_codec="raw")
    packed = write_store(corpus, folder / "packed.lstore")  # defaults: zstd token ids, fixed-point values
    return {
        "memmap ceiling": MemmapCeiling(corpus, folder),
        "logitstore raw": Logitstore(raw),
        "zarr-python raw": ZarrPython(raw),
        "logitstore compressed": Logitstore(packed),
        "logitstore compressed, no chunk cache": Logitstore(packed, cache_bytes=0),
        "zarr-python compressed": ZarrPython(packed),
        "pickle per batch": PicklePerBatch(corpus, folder / "pickles"),
    }


def batches(corpus: Corpus, order: str, count: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    if order == "random":
        return [[corpus.ids[i] for i in rng.choice(len(corpus), BATCH, replace=False)] for _ in range(count)]
    starts = [(i * BATCH) % (len(corpus) - BATCH) for i in range(count)]
    return [corpus.ids[s:s + BATCH] for s in starts]


@pytest.mark.parametrize("order", ["random", "sequential"])
@pytest.mark.parametrize("reader", ["memmap ceiling", "logitstore raw", "zarr-python raw", "logitstore compressed",
                                    "logitstore compressed, no chunk cache", "zarr-python compressed",
                                    "pickle per batch"])
def test_read_batches(benchmark, readers, corpus, quick, reader, order):
    impl = readers[reader]
    work = batches(corpus, order, 4 if quick else (8 if reader.startswith("zarr") else 64))
    expected = readers["memmap ceiling"].read(work[0])
    got = impl.read(work[0])
    for f in FIELDS:  # every reader returns the same values (fixed point within its step)
        for a, b in zip(got[f], expected[f]):
            assert np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=2.0**-7 + 1e-6)

    def run():
        for ids in work:
            impl.read(ids)

    benchmark.extra_info.update(examples=len(work) * BATCH, group="read", order=order)
    benchmark.pedantic(run, rounds=1 if quick else 5, warmup_rounds=1)


@pytest.mark.parametrize("preset", ["raw", "float32", "float16", "fixed"])
def test_bytes_per_token(benchmark, corpus, tmp_path, preset):
    """Disk size of each per-token preset (token ids zstd), and of its per-token values alone."""
    path = write_store(corpus, tmp_path / "s", logp_codec=preset)
    store = logitstore.open(path)
    total = store.location.total_bytes()
    values = sum(p.stat().st_size for f in ("chosen_token_logps", "rejected_token_logps")
                 for p in (path / f).rglob("*") if p.is_file())
    ids = sum(p.stat().st_size for f in ("prompt_ids", "chosen_ids", "rejected_ids")
              for p in (path / f).rglob("*") if p.is_file())
    sums = store.get(store.ids)
    decoded = store.ragged("chosen_token_logps", np.arange(len(store)))
    error = max(abs(float(v.sum(dtype=np.float64)) - float(s)) for v, s in zip(decoded, sums["chosen_logps"]))
    benchmark.extra_info.update(group="size", preset=preset, store_bytes=total,
                                bytes_per_pair=total / len(corpus),
                                per_token_value_bytes=values / corpus.scored_tokens(),
                                token_id_bytes=ids / corpus.tokens(), max_sum_error=error)
    benchmark.pedantic(lambda: None, rounds=1)
    if preset == "fixed":  # the documented bound, whatever the data: half a quantization step per sum
        assert error <= 2.0**-8 + 1e-4


def test_write_throughput(benchmark, corpus, tmp_path, quick):
    counter = iter(range(10**6))

    def write():
        write_store(corpus, tmp_path / f"w{next(counter)}.lstore")

    benchmark.extra_info.update(group="write", examples=len(corpus), tokens=corpus.tokens())
    benchmark.pedantic(write, rounds=1 if quick else 3)


def drop_page_cache(folder: Path) -> bool:
    """Ask the kernel to forget the cached pages of every file under `folder` (False where it cannot)."""
    import os

    if not hasattr(os, "posix_fadvise"):
        return False
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


@pytest.mark.parametrize("reader", ["memmap ceiling", "logitstore raw", "logitstore compressed"])
def test_read_cold_page_cache(benchmark, corpus, tmp_path, quick, reader):
    """Random batches right after the files were dropped from the page cache (posix_fadvise DONTNEED)."""
    import gc

    if reader == "memmap ceiling":
        folder = tmp_path / "flat"
        folder.mkdir()
        ceiling = MemmapCeiling(corpus, folder)
        ceiling.values = {}  # keep no map open across rounds

        def fresh():
            impl = MemmapCeiling.__new__(MemmapCeiling)
            impl.row, impl.offsets = ceiling.row, ceiling.offsets
            impl.values = {f: np.load(folder / f"{f}.npy", mmap_mode="r") for f in FIELDS}
            return impl
    else:
        kw = {"token_codec": "raw", "logp_codec": "raw"} if reader == "logitstore raw" else {}
        folder = write_store(corpus, tmp_path / "s.lstore", **kw)

        def fresh():
            return Logitstore(folder)

    work = batches(corpus, "random", 4 if quick else 32)
    state = {}

    def setup():
        state.clear()
        gc.collect()
        dropped = drop_page_cache(folder)
        state["impl"] = fresh()
        benchmark.extra_info["page_cache_dropped"] = dropped

    def run():
        for ids in work:
            state["impl"].read(ids)

    benchmark.extra_info.update(examples=len(work) * BATCH, group="read-cold")
    benchmark.pedantic(run, setup=setup, rounds=1 if quick else 5)


@pytest.mark.parametrize("batch", [1, 8, 32, 128])
@pytest.mark.parametrize("reader", ["memmap ceiling", "logitstore raw", "logitstore compressed"])
def test_read_batch_size(benchmark, readers, corpus, quick, reader, batch):
    impl = readers[reader]
    rng = np.random.default_rng(1)
    count = max(1, (64 if quick else 4096) // batch)
    work = [[corpus.ids[i] for i in rng.choice(len(corpus), min(batch, len(corpus)), replace=False)]
            for _ in range(count)]

    def run():
        for ids in work:
            impl.read(ids)

    benchmark.extra_info.update(examples=sum(map(len, work)), group="read-batch", batch=batch)
    benchmark.pedantic(run, rounds=1 if quick else 3, warmup_rounds=1)


@pytest.mark.parametrize("inner_chunk", [2048, 8192, 32768])
def test_inner_chunk_size(benchmark, corpus, tmp_path, quick, inner_chunk):
    """The layout choice: bigger inner chunks compress better but cost more to decode on a cache miss."""
    import logitstore as ls

    writer = ls.create(tmp_path / "s", corpus.ids, fingerprint={"benchmark": "chunks"}, vocab_size=32000,
                       max_length=1024, rows_per_shard=256, per_token=True, inner_chunk=inner_chunk)
    for shard in writer.missing_shards:
        writer.write_shard(shard, corpus.shard(writer.shard_rows(shard)))
    writer.finalize()
    values = sum(p.stat().st_size for f in ("chosen_token_logps", "rejected_token_logps")
                 for p in (tmp_path / "s" / f).rglob("*") if p.is_file())
    ids = sum(p.stat().st_size for f in ("prompt_ids", "chosen_ids", "rejected_ids")
              for p in (tmp_path / "s" / f).rglob("*") if p.is_file())
    impl = Logitstore(tmp_path / "s", cache_bytes=0)
    work = batches(corpus, "random", 2 if quick else 16)

    def run():
        for batch_ids in work:
            impl.read(batch_ids)

    benchmark.extra_info.update(group="chunks", inner_chunk=inner_chunk, examples=len(work) * BATCH,
                                per_token_value_bytes=values / corpus.scored_tokens(), token_id_bytes=ids / corpus.tokens())
    benchmark.pedantic(run, rounds=1 if quick else 3)
