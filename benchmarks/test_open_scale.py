"""Opening and first reads against the number of pairs: open time, memory at open, first-epoch against warm random
reads, and what the first-touch checks (SHA-256 of each file on first read) cost.

Synthetic stores of 10k and 100k pairs (per-token values, default codecs, hh-rlhf-like lengths) are written by
the benchmark itself; set LOGITSTORE_BENCH_1M=1 to add 1,000,000 pairs (about 5 minutes to write, 1.3 GB). Each
measurement runs in a fresh process. Under `--benchmark-disable` (the test command) it runs once on 1k and 4k
pairs. `python benchmarks/test_open_scale.py [N ...]` prints the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BATCH = 32
FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_token_logps", "rejected_token_logps")


def write_synthetic(path: Path, n: int, seed: int = 0) -> float:
    """A store of `n` pairs with per-token values; returns the seconds it took to write."""
    import logitstore

    start = time.perf_counter()
    ids = [f"pair-{i:07d}" for i in range(n)]
    writer = logitstore.create(path, ids, fingerprint={"bench": "open-scale", "n": n}, vocab_size=32000,
                               max_length=1024, per_token=True)
    for shard in writer.missing_shards:
        rows = writer.shard_rows(shard)
        rng = np.random.default_rng([seed, shard])
        m = len(rows)
        prompt = rng.integers(8, 160, m)
        chosen, rejected = rng.integers(1, 120, m), rng.integers(1, 120, m)
        data: dict = {"prompt_ids": [rng.integers(0, 32000, k).astype(np.int64) for k in prompt]}
        for side, lengths in (("chosen", chosen), ("rejected", rejected)):
            data[f"{side}_ids"] = [rng.integers(0, 32000, k).astype(np.int64) for k in lengths]
            values = [-rng.gamma(0.6, 6.0, k).astype(np.float32) for k in lengths]
            data[f"{side}_token_logps"] = values
            data[f"{side}_logps"] = np.array([v.sum(dtype=np.float64) for v in values])
            data[f"{side}_tokens"] = lengths
        writer.write_shard(shard, data)
    writer.finalize()
    return time.perf_counter() - start


def _rss(kind: str = "VmRSS") -> int:
    """Resident bytes: VmRSS (all), RssAnon (the process's own memory) or RssFile (mapped file pages, shared with
    other processes through the page cache)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{kind}:"))


def _drop_page_cache(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def probe(path: Path, n: int, epochs: int, cold: bool, limit: int | None) -> dict:
    """Run in a fresh process: open, then `epochs` passes of random 32-pair batches by ID, every field: the first
    over every pair (it touches every shard), later ones over the first `limit` pairs of their order."""
    import hashlib

    if cold:
        _drop_page_cache(path)
    import logitstore  # imported before measuring: the import is not the store's cost

    rss0, anon0 = _rss(), _rss("RssAnon")
    t0 = time.perf_counter()
    store = logitstore.open(path)
    open_s = time.perf_counter() - t0
    out = {"n": n, "open_s": open_s, "rss_open": _rss() - rss0}
    t0 = time.perf_counter()
    store.get(["pair-0000000"])
    out["first_lookup_s"] = time.perf_counter() - t0
    out["rss_first_lookup"] = _rss() - rss0
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(n)[:None if epoch == 0 else limit]
        t0 = time.perf_counter()
        for i in range(0, order.size - BATCH + 1, BATCH):
            ids = [f"pair-{r:07d}" for r in order[i:i + BATCH]]
            rows = store.rows(ids)
            store.row_values(rows)
            for field in FIELDS:
                store.ragged(field, rows)
        rates.append(order.size // BATCH * BATCH / (time.perf_counter() - t0))
    out["epochs"] = rates
    out["rss_end"] = _rss() - rss0
    out["rss_anon_end"] = _rss("RssAnon") - anon0
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    t0 = time.perf_counter()
    total = 0
    for p in files:
        data = p.read_bytes()
        total += len(data)
        hashlib.sha256(data).digest()
    out["hash_all_s"] = time.perf_counter() - t0
    out["bytes"] = total
    return out


def run_probe(path: Path, n: int, epochs: int, cold: bool = False, limit: int | None = None) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); from test_open_scale import probe; from pathlib import Path; "
            "print(json.dumps(probe(Path(%r), %d, %d, %r, %r)))" % (str(Path(__file__).parent), str(path), n, epochs,
                                                                      cold, limit))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sizes(quick: bool) -> list[int]:
    if quick:
        return [1000, 4000]
    return [10_000, 100_000] + ([1_000_000] if os.environ.get("LOGITSTORE_BENCH_1M") else [])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, quick):
    folder = tmp_path_factory.mktemp("scale")
    return {n: (folder / f"s{n}", write_synthetic(folder / f"s{n}", n)) for n in sizes(quick)}


def test_open_is_flat_in_the_number_of_pairs(stores, quick):
    results = {n: run_probe(path, n, epochs=2, limit=2000 if quick else 20_000) for n, (path, _) in stores.items()}
    for r in results.values():  # figures are for the report; here: it runs, and opening maps nothing
        assert len(r["epochs"]) == 2 and min(r["epochs"]) > 0
        assert r["rss_open"] < 8 << 20 and r["bytes"] > 0
    print(json.dumps(results))


def main(argv: list[str]) -> None:
    """Arguments: sizes N, or N:PATH to measure a store already written by `write_synthetic`."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=os.environ.get("LOGITSTORE_BENCH_DIR")) as tmp:
        for arg in argv or [str(n) for n in sizes(False)]:
            n, _, given = arg.partition(":")
            n = int(n)
            path = Path(given) if given else Path(tmp) / f"s{n}"
            write_s = None if given else write_synthetic(path, n)
            opens = [run_probe(path, n, epochs=0) for _ in range(5)]
            run = run_probe(path, n, epochs=2, cold=True, limit=min(n, 200_000))
            row = {"n": n, "write_s": write_s, "open_s_min": min(o["open_s"] for o in opens),
                   "open_s_median": sorted(o["open_s"] for o in opens)[2],
                   "rss_open_mb": max(o["rss_open"] for o in opens) / 2**20,
                   "first_lookup_s": sorted(o["first_lookup_s"] for o in opens)[2],
                   "rss_first_lookup_mb": run["rss_first_lookup"] / 2**20,
                   "first_epoch": run["epochs"][0], "warm": run["epochs"][1],
                   "first_over_warm": run["epochs"][0] / run["epochs"][1], "rss_end_mb": run["rss_end"] / 2**20,
                   "rss_anon_end_mb": run["rss_anon_end"] / 2**20,
                   "hash_all_s": run["hash_all_s"], "bytes": run["bytes"],
                   "hash_share_of_first_epoch": run["hash_all_s"] / (n / run["epochs"][0])}
            print(json.dumps(row), flush=True)
            if not given:
                shutil.rmtree(path)


if __name__ == "__main__":
    main(sys.argv[1:])
