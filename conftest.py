"""Test selection: `python -m pytest` runs the quick tests; `--full` adds the ones marked `slow` (builds and training
in subprocesses, torchrun, S3, the demos, TRL parity, the benchmarks). CI runs `--full`. An explicit `-m`
expression overrides both."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="also run the tests marked slow (what CI runs)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full") or config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
