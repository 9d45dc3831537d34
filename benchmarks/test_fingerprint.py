"""Identifying a model for the store's fingerprint: logitstore's sampled identity against hashing every byte
(what TRL's precompute does to the whole state dict on every start)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from logitstore.dpo.model.loading import folder_identity


@pytest.fixture(scope="module")
def weights(tmp_path_factory, quick):
    folder = tmp_path_factory.mktemp("weights")
    (folder / "config.json").write_text("{}")
    size = (16 if quick else 2048) << 20  # a 2 GiB shard, a quarter of a 7B checkpoint in bf16
    block = np.random.default_rng(0).bytes(1 << 20)
    with open(folder / "model.safetensors", "wb") as f:
        f.write((8).to_bytes(8, "little") + b"{}      ")
        for _ in range(size >> 20):
            f.write(block)
    return folder


@pytest.mark.parametrize("method", ["logitstore sampled identity", "sha256 of every byte"])
def test_model_identity(benchmark, weights, method):
    def full():
        h = hashlib.sha256()
        with open(weights / "model.safetensors", "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()

    fn = (lambda: folder_identity(weights)) if method.startswith("logitstore") else full
    benchmark.extra_info.update(group="fingerprint", bytes=(weights / "model.safetensors").stat().st_size)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
