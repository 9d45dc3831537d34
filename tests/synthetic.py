"""Deterministic synthetic store content, shared by the store tests and the writer subprocess they kill."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import logitstore


def shard_rows(writer: logitstore.StoreWriter, shard: int, seed: int = 0) -> dict:
    rows = writer.shard_rows(shard)
    rng = np.random.default_rng([seed, shard])
    per_token = "chosen_token_logps" in {s.name for s in writer.ragged}
    max_len = writer.geometry.max_length
    data: dict = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for _ in rows:
        p = int(rng.integers(1, max_len // 2))
        data["prompt_ids"].append(rng.integers(0, 32000, p).astype(np.int64))
        for side in ("chosen", "rejected"):
            data[f"{side}_ids"].append(rng.integers(0, 32000, int(rng.integers(1, max_len - p + 1))).astype(np.int64))
    for side in ("chosen", "rejected"):
        values = [-rng.gamma(0.6, 6.0, len(c)).astype(np.float32) for c in data[f"{side}_ids"]]
        data[f"{side}_logps"] = np.array([v.sum(dtype=np.float64) for v in values])
        data[f"{side}_tokens"] = np.array([len(v) for v in values])
        if per_token:
            data[f"{side}_token_logps"] = values
    return data


def plan(path, n: int = 100, rows_per_shard: int = 16, **kw) -> logitstore.StoreWriter:
    kw.setdefault("per_token", True)
    return logitstore.create(path, [f"ex-{i}" for i in range(n)], fingerprint={"test": "synthetic"},
                             vocab_size=32000, max_length=64, rows_per_shard=rows_per_shard, inner_chunk=256, **kw)


def fill(path, n: int = 100, rows_per_shard: int = 16, shards=None, pause: float = 0.0, finalize=True,
         **kw) -> logitstore.StoreWriter:
    writer = plan(path, n, rows_per_shard, **kw)
    for shard in writer.missing_shards if shards is None else shards:
        writer.write_shard(shard, shard_rows(writer, shard))
        time.sleep(pause)
    if finalize and not writer.missing_shards:
        writer.finalize()
    return writer


def join(path, shards, pause: float = 0.0) -> None:
    """Fill `shards` of a store another process planned and holds the lock of (as a rank other than 0 does)."""
    writer = logitstore.StoreWriter.attach(path)
    for shard in shards:
        writer.write_shard(shard, shard_rows(writer, shard))
        time.sleep(pause)


if __name__ == "__main__":  # python synthetic.py PATH: plan and fill slowly (to be killed); PATH SHARD ...: join
    target = sys.argv[1]
    only = [int(s) for s in sys.argv[2:]]
    pause = float(os.environ.get("WRITER_PAUSE", "0.02"))
    if only:
        join(target, only, pause)
    else:
        fill(target, pause=pause)
