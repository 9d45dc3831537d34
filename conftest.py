"""Test selection: `python -m pytest` runs the quick tests; `--full` adds the ones marked `slow` (builds and training
in subprocesses, torchrun, S3, the demos, TRL parity, the benchmarks). CI runs `--full`. An explicit `-m`
expression overrides both.

Where a test run keeps its files: with `--benchmark-disable` (the test command), in memory (/dev/shm) where the
machine has one with room, so the suite's tens of thousands of store files cost no disk journal or flush; a passing
test's folder is deleted as it ends (pyproject's `tmp_path_retention_policy`), so the run holds little memory. Runs
that measure (benchmarks enabled) keep the disk: the read benchmarks' cold page cache needs one. `--basetemp` or
LOGITSTORE_TEST_TMP=disk overrides."""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_MEMORY = Path("/dev/shm")
_MEMORY_NEEDED = 4 << 30  # a full run's session fixtures, the largest test and its neighbour, with room to spare


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="also run the tests marked slow (what CI runs)")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # the files come in _heaviest_files_first's order
    if (os.environ.get("PYTEST_XDIST_WORKER") or config.option.basetemp  # workers get the main process's folder
            or not config.getoption("benchmark_disable", default=False)
            or os.environ.get("LOGITSTORE_TEST_TMP") == "disk"):
        return
    if _MEMORY.is_dir() and os.access(_MEMORY, os.W_OK | os.X_OK) and shutil.disk_usage(_MEMORY).free >= _MEMORY_NEEDED:
        os.environ["TMPDIR"] = str(_MEMORY)  # pytest's numbered folders, and tempfile's in tests and their children
        tempfile.tempdir = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (config.getoption("--full") or config.option.markexpr):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
    _heaviest_files_first(items)


def _heaviest_files_first(items: list[pytest.Item]) -> None:
    """Test files in the order that lets two test processes end together (xdist sends each file whole, in this
    order: pytest_configure turns its own reordering off): the files with the most slow tests first, then those
    with the most tests; the many small quick files last fill the gaps. Ordered by test count alone (xdist's
    default), a run's few one-test files of subprocesses came last and one process ran them while the other
    idled (42 s of a 501 s run)."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    tests = collections.Counter(item.path for item in items)
    first: dict[Path, int] = {}
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (-slow[item.path], -tests[item.path], first[item.path]))  # stable within a file
