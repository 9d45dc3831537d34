"""The core install serves stores without the training stack: opening, verifying, describing, exporting and the
loader's numpy side run with torch, transformers, peft and every other extra's package made unimportable, and a
command that needs an extra says which one to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitstore
from logitstore.extras import DISTRIBUTIONS, MODULE_EXTRAS
from logitstore.loader import PairBatchSampler

from synthetic import fill

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "logitstore"
CORE = {"numpy", "zarr", "numcodecs", "click"}

# Imported at interpreter start-up (PYTHONPATH): the path finder no longer finds any module an extra provides, so
# importing one fails and importlib.util.find_spec answers None, exactly as when the package is not installed.
BLOCKER = f"""
import sys
from importlib.machinery import PathFinder

BLOCKED = {sorted(MODULE_EXTRAS)!r}


class NotInstalled(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [NotInstalled if finder is PathFinder else finder for finder in sys.meta_path]
"""


def requirement_name(requirement: str) -> str:
    for stop in "<>=[;! ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower()


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extra_names(extras: dict[str, list[str]], extra: str) -> set[str]:
    """Distributions an extra installs, following `logitstore[...]` self-references."""
    names = set()
    for requirement in extras[extra]:
        name = requirement_name(requirement)
        if name == "logitstore":
            for inner in requirement.split("[")[1].split("]")[0].split(","):
                names |= extra_names(extras, inner.strip())
        else:
            names.add(name)
    return names


def test_core_requirements_are_the_store_stack_only():
    project = pyproject()
    assert {requirement_name(r) for r in project["dependencies"]} == CORE
    extras = project["optional-dependencies"]
    for module, extra in MODULE_EXTRAS.items():  # each message names an extra that installs the module
        assert DISTRIBUTIONS.get(module, module) in extra_names(extras, extra), (module, extra)
    assert {"torch", "transformers", "peft"} <= extra_names(extras, "train")
    everything = set().union(*(extra_names(extras, e) for e in extras if e != "dev"))
    assert everything <= extra_names(extras, "dev")


@pytest.fixture
def core_env(tmp_path) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(blocker), "TQDM_DISABLE": "1"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_open_verify_info_export_and_loader_without_the_training_stack(core_env, tmp_path, monkeypatch):
    blocked = run(core_env, sys.executable, "-c", "import torch")
    assert blocked.returncode == 1 and "No module named 'torch'" in blocked.stderr  # the blocker works
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    path = tmp_path / "s.lstore"
    fill(path, n=40)
    store = logitstore.open(path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in store.ids))

    verified = run(core_env, str(SCRIPT), "verify", str(path))
    assert (verified.returncode, verified.stdout.splitlines()[-1]) == (0, "sound"), verified.stderr
    info = run(core_env, str(SCRIPT), "info", str(path), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["examples"] == 40 and json.loads(info.stdout)["complete"] is True
    exported = run(core_env, str(SCRIPT), "export", str(path), "--to", "jsonl", "--data", str(data), "--out",
                   str(tmp_path / "e.jsonl"))
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == store.ids
    assert np.array_equal(np.array([r["ref_chosen_logps"] for r in rows], dtype=np.float32),
                          store.get(store.ids)["chosen_logps"])

    read = run(core_env, sys.executable, "-c", f"""
import json, sys
import logitstore
from logitstore.loader import PairBatchSampler, PairDataset, Prefetcher
dataset = PairDataset({str(path)!r})
sampler = PairBatchSampler(len(dataset), 8, seed=3)
batch = list(Prefetcher(dataset.__getitems__(rows) for rows in sampler))[0]
print(json.dumps({{"rows": batch["rows"].tolist(), "chosen_logps": batch["chosen_logps"].tolist(),
                  "chosen_ids": [x.tolist() for x in batch["chosen_ids"]], "torch": "torch" in sys.modules}}))
""")
    assert read.returncode == 0, read.stderr
    got = json.loads(read.stdout)
    rows = next(iter(PairBatchSampler(len(store), 8, seed=3)))
    assert got["rows"] == rows and got["torch"] is False
    assert got["chosen_logps"] == store.row_values(rows)["chosen_logps"].tolist()
    assert got["chosen_ids"] == [x.tolist() for x in store.ragged("chosen_ids", rows)]


@pytest.mark.parametrize("args,extra", [
    (["export", "{store}", "--to", "trl", "--data", "{data}", "--out", "{tmp}/trl"], "data"),
    (["train", "--model", "{tmp}", "--store", "{store}", "--out", "{tmp}/run"], "train"),
    (["build", "--model", "{tmp}", "--data", "{data}", "--out", "{tmp}/new"], "train"),
    (["demo", "--out", "{tmp}/demo"], "train"),
])
def test_a_command_that_needs_an_extra_names_it(core_env, tmp_path, args, extra):
    fill(tmp_path / "s.lstore", n=4)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex-{i}", "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(4)))
    values = {"store": str(tmp_path / "s.lstore"), "data": str(data), "tmp": str(tmp_path)}
    out = run(core_env, str(SCRIPT), *[a.format(**values) for a in args])
    assert out.returncode == 1
    assert out.stderr.startswith("Error: this command needs ") and out.stderr.count("\n") == 1
    assert out.stderr.rstrip().endswith(f"which this install leaves out: pip install 'logitstore[{extra}]'")


def test_an_import_error_no_extra_explains_is_still_one_line():
    code = """
from logitstore.cli.main import cli, main


@cli.command()
def broken():
    import not_a_module_anywhere


main(["broken"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (1, "Error: ModuleNotFoundError: No module named 'not_a_module_anywhere' "
                                               "(run with --debug for the traceback)\n")
