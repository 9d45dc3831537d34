"""Benchmark fixtures. Under `--benchmark-disable` (the test command) every suite runs once on a small corpus,
so the benchmarks never rot; the report (`python benchmarks/report.py`) runs them at full size."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bool(request.config.getoption("benchmark_disable"))


@pytest.fixture(scope="session")
def corpus(quick):
    from corpus import load_corpus

    return load_corpus(200 if quick else 1500)
