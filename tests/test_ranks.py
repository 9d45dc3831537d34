"""tests/ranks.py: a rank forked from the preloaded server answers torchrun as a fresh one would: its output on the
stub's own streams, its exit status or the signal that killed it, its arguments, environment and directory; the
signals torchrun sends reach it; a rank whose stub is killed goes too; and it runs fresh where preloading could
change what it does (an environment read at import differs, or no server answers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranks import Server

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the rank server runs on Linux")

# The server preloads a module no fresh interpreter imports by itself: whether a rank has it says how it started.
PRELOADED = "colorsys"

PROGRAM = f"""#!{sys.executable}
import os, signal, sys, time
print("preloaded" if {PRELOADED!r} in sys.modules else "fresh", sys.argv[1:], os.getcwd(), os.environ.get("RANK"),
      __name__, flush=True)
print("to stderr", file=sys.stderr, flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise ValueError("boom")
if mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "wait":
    signal.signal(signal.SIGTERM, lambda *_: (print("terminated", flush=True), sys.exit(7)))
    with open(sys.argv[2], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def server():
    server = Server(modules=(PRELOADED,))
    yield server
    server.close()


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("program") / "program.py"
    path.write_text(PROGRAM)
    path.chmod(0o755)
    return str(path)


def run(server: Server, program: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(server.command(program, *args), env={**os.environ, "RANK": "1", **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_a_rank_runs_the_program_as_python_would_on_the_stubs_streams(server, program, tmp_path):
    done = run(server, program, "exit", "0", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"preloaded ['exit', '0'] {tmp_path} 1 __main__\n", "to stderr\n")
    assert run(server, program, "exit", "3").returncode == 3
    message = run(server, program, "message")
    assert (message.returncode, message.stderr) == (1, "to stderr\na message\n")
    raised = run(server, program, "raise")
    assert raised.returncode == 1
    assert raised.stderr.startswith("to stderr\nTraceback (most recent call last):\n")
    assert raised.stderr.endswith("ValueError: boom\n")


def test_a_rank_killed_by_a_signal_kills_its_stub_with_it(server, program):
    assert run(server, program, "kill").returncode == -signal.SIGKILL


def test_torchruns_sigterm_reaches_the_rank_and_its_sigkill_takes_the_rank_too(server, program, tmp_path):
    def start(pid_file: Path) -> subprocess.Popen:
        stub = subprocess.Popen(server.command(program, "wait", str(pid_file)), env=dict(os.environ),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)  # as torchrun starts one
        assert stub.stdout.readline().startswith("preloaded")
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.01)
        return stub

    stub = start(tmp_path / "a")
    os.killpg(stub.pid, signal.SIGTERM)  # what torchrun sends first
    assert stub.wait(timeout=30) == 7 and stub.stdout.read() == "terminated\n"
    stub.stdout.close()

    stub = start(tmp_path / "b")
    rank = int((tmp_path / "b").read_text())
    os.killpg(stub.pid, signal.SIGKILL)  # what torchrun sends after its grace period
    assert stub.wait(timeout=30) == -signal.SIGKILL
    stub.stdout.close()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{rank}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{rank}").exists()


def test_a_rank_runs_fresh_where_preloading_could_change_what_it_does(server, program):
    # What torchrun sets per rank, and what is read at run time only, may differ from the server's environment.
    per_rank = run(server, program, "exit", "0", env={"MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
                                                      "LOGITSTORE_FAULT": "after-commit:2"})
    assert per_rank.stdout.startswith("preloaded")
    # Anything else may be read at import: the rank starts fresh, with the same answer.
    other = run(server, program, "exit", "3", env={"HF_HUB_OFFLINE": "1"})
    assert (other.returncode, other.stdout.split()[0]) == (3, "fresh")
    # No server at the socket: fresh too.
    gone = subprocess.run([server.stub, str(Path(server.folder) / "nothing.sock"), program, "exit", "4"],
                          capture_output=True, text=True, timeout=60)
    assert (gone.returncode, gone.stdout.split()[0]) == (4, "fresh")
