"""The README's and docs/api.md's examples run, and print what they say they print."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from pathlib import Path

import pytest

from cli_process import run_cli

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- not run[^>]*-->\n)?```(python|bash)\n(.*?)```", re.S)


def blocks(doc: str, language: str) -> list[str]:
    return [m.group(3) for m in BLOCK.finditer((ROOT / doc).read_text()) if m.group(2) == language and not m.group(1)]


def expected_output(code: str) -> list[str]:
    out, lines = [], code.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# ") and i > 0 and (lines[i - 1].lstrip().startswith("print(") or
                                                 (out and lines[i - 1].startswith("# "))):
            out.append(line[2:])
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_python_examples_run_and_print_what_they_claim(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks(doc, "python"):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, doc, "exec"), namespace)  # noqa: S102 - our own documentation
        assert buffer.getvalue().splitlines() == expected_output(code)


def shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """One line of a README shell block, run in `cwd`. A plain `logitstore ...` line (no quoting, redirection or
    other shell syntax: its words are its arguments) runs the command in this process; any other line runs in the
    shell."""
    if command.startswith("logitstore ") and not re.search(r"[\\'\"$`|&;<>()*?~{}\[\]#]", command):
        return run_cli(*command.split()[1:], env=env, cwd=cwd)
    return subprocess.run(command, shell=True, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # the demo and every usage command
def test_readme_shell_usage_runs(tmp_path):
    env = {"TQDM_DISABLE": "1"}
    commands = ["logitstore demo --out demo-out --quiet"]
    usage = [b for b in blocks("README.md", "bash") if "logitstore build" in b][0]
    commands += [line for line in usage.splitlines() if line.startswith("logitstore ")]
    assert len(commands) == 6
    for command in commands:
        done = shell(command, tmp_path, env)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
    assert (tmp_path / "pairs-trl" / "dataset_info.json").is_file()
    changes = [b for b in blocks("README.md", "bash") if "--reuse" in b][0]  # "When your data changes"
    outputs = []
    for command in [line for line in changes.splitlines() if line and not line.startswith("#")]:
        done = shell(command, tmp_path, env)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs.append(done.stdout)
    readme = (ROOT / "README.md").read_text()
    first, second = (re.search(r"\(\d+ computed, \d+ reused\)", outputs[i]).group(0) for i in (2, 5))
    assert f"The first build prints `{first}`" in readme and f"prints `{second}`" in readme
    duplicates = re.search(r"\d+ duplicates kept once", outputs[6]).group(0)
    assert f"(`{duplicates}`)" in readme.replace("\n", " ")
    assert "values        0 computed, " in outputs[7]
