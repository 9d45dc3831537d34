"""benchmarks/children.py: a workload's process, fresh or forked from a preloaded interpreter, answers the same: its
exit status, its output, its environment and directory, an exception or a SystemExit message, and a timeout that
kills its whole process group."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

SCRIPT = """import os, sys, time
print("argv", sys.argv[1:], "cwd", os.getcwd() == sys.argv[2], "env", os.environ.get("CHILD_TEST"), flush=True)
print("on stderr", file=sys.stderr)
print("preloaded", "colorsys" in sys.modules, "path", sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
what = sys.argv[1]
if what == "raise":
    raise ValueError("the workload failed")
if what == "exit":
    sys.exit("a one-line refusal")
if what == "code":
    sys.exit(3)
if what == "sleep":  # and a grandchild in the same process group, which the timeout must kill too
    import subprocess
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(sys.argv[3], "w").write(str(grandchild.pid))
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def children():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import children
    finally:
        sys.path.remove(str(BENCHMARKS))
    return children


@pytest.fixture(params=["fresh", "forked"])
def mode(request, children, monkeypatch):
    """Each test runs with a fresh interpreter per child and with forks of one that preloaded a module, in an
    environment that the children see."""
    monkeypatch.setenv("CHILD_TEST", "set")
    with children.preloaded(("colorsys",), when=request.param == "forked"):
        yield request.param


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("what, code, err", [("ok", 0, "on stderr\n"), ("code", 3, "on stderr\n"),
                                             ("exit", 1, "on stderr\na one-line refusal\n")])
def test_a_child_answers_as_a_fresh_python_would(children, mode, tmp_path, monkeypatch, what, code, err):
    script = tmp_path / "workload.py"
    script.write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    done = children.run([str(script), what, str(tmp_path)])
    preloaded = mode == "forked"
    assert (done.returncode, done.stderr) == (code, err)
    assert done.stdout == (f"argv ['{what}', '{tmp_path}'] cwd True env set\n"
                           f"preloaded {preloaded} path True\n")


def test_an_exception_is_a_traceback_and_exit_1(children, mode, tmp_path):
    script = tmp_path / "workload.py"
    script.write_text(SCRIPT)
    done = children.run([str(script), "raise", str(tmp_path)])
    assert done.returncode == 1 and done.stderr.startswith("on stderr\nTraceback (most recent call last):\n")
    assert done.stderr.endswith("ValueError: the workload failed\n")
    assert f"preloaded {mode == 'forked'}" in done.stdout


def test_a_timeout_kills_the_child_and_its_process_group(children, mode, tmp_path):
    script = tmp_path / "workload.py"
    script.write_text(SCRIPT)
    pid_file = tmp_path / "grandchild"
    with pytest.raises(subprocess.TimeoutExpired):
        children.run([str(script), "sleep", str(tmp_path), str(pid_file)], timeout=1)
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
    # ... and the next child runs as before.
    assert children.run([str(script), "ok", str(tmp_path)]).returncode == 0


def test_children_fork_from_the_preloaded_interpreter_only_within_its_block(children, tmp_path, monkeypatch):
    script = tmp_path / "workload.py"
    script.write_text(SCRIPT)
    monkeypatch.setenv("CHILD_TEST", "outer")
    with children.preloaded(("colorsys",)):
        inside = children.run([str(script), "ok", str(tmp_path)])
        other_env = children.run([str(script), "ok", str(tmp_path)], env={"PATH": "/usr/bin:/bin"})
        monkeypatch.setenv("CHILD_TEST", "inner")
        with children.preloaded(("colorsys",)):  # its own interpreter, in its own environment
            nested = children.run([str(script), "ok", str(tmp_path)])
        monkeypatch.setenv("CHILD_TEST", "outer")
        outer_again = children.run([str(script), "ok", str(tmp_path)])
    after = children.run([str(script), "ok", str(tmp_path)])
    assert "preloaded True" in inside.stdout and "env outer" in inside.stdout
    assert "preloaded False" in other_env.stdout  # another environment: a fresh interpreter
    assert "preloaded True" in nested.stdout and "env inner" in nested.stdout
    assert "preloaded True" in outer_again.stdout and "env outer" in outer_again.stdout
    assert "preloaded False" in after.stdout
