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


@pytest.fixture(scope="module")
def workload_processes(quick):
    """Where a module's workload processes come from: under `--benchmark-disable`, forks of one interpreter that
    imported the libraries once (benchmarks/children.py); at full size, a fresh interpreter each, as published."""
    import children
    from workloads import child_env

    with children.preloaded(env=child_env(), when=quick):
        yield
