"""Workloads in child processes: `run(SCRIPT, ARGS...)` is `python SCRIPT ARGS...` in a fresh interpreter, what every
published figure measures (a workload's peak memory is its own process's).

A smoke run (the tests') pays mostly for imports: each child imports torch, transformers and TRL anew, seconds of
CPU for a workload of a fraction of one. Inside `with preloaded(MODULES):` each child is instead forked from one
interpreter that imported MODULES once and then only waits (`python children.py --serve MODULES`): still a process
of its own (its exit status, output, process group and timeout as a fresh one's), started without the imports. Its
peak memory includes the preloaded modules, so it is for smoke runs only, and for CPU runs only: the server never
touches a device, but CUDA does not survive a fork of a process that has used it.

The server reads one JSON request per line on stdin ({"argv", "env", "cwd", "stdout", "stderr"}), forks, answers
{"pid"} at once and {"pid", "status"} when the child ends; the child runs the script as `python` would
(`runpy.run_path` as __main__) and exits as it would. No pickle: requests and answers are JSON.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# While a `preloaded` block is open: the modules to preload, the environment of its children, the preloaded
# interpreter once started, and what it has written that no answer has consumed yet.
_preload: tuple[str, ...] | None = None
_server: subprocess.Popen | None = None
_server_env: dict[str, str] | None = None
_pending = b""

# What the benchmarks' children import: torch, a Mistral model and its tokenizers, peft, TRL's trainers, datasets,
# and logitstore's two passes and CLI.
WORKLOAD_MODULES = ("torch", "transformers.models.mistral.modeling_mistral",
                    "transformers.models.llama.tokenization_llama", "transformers.models.byt5.tokenization_byt5",
                    "peft", "datasets", "trl.trainer.dpo_trainer", "logitstore.dpo.reference.build",
                    "logitstore.dpo.training.loop", "logitstore.cli.main")


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None
        ) -> subprocess.CompletedProcess:
    """`python ARGV` (ARGV[0] a script) in its own process group; the CompletedProcess subprocess.run would give
    (text output). Past `timeout` seconds the whole group is killed and subprocess.TimeoutExpired raised."""
    env = dict(os.environ if env is None else env)
    if _preload is None or _comparable(env) != _comparable(_server_env):
        return _run_fresh(argv, env, timeout)
    return _run_forked(argv, env, timeout)


def _comparable(env: dict[str, str]) -> dict[str, str]:
    """An environment less what pytest changes for each test (a child still gets its own value of it)."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


def _run_fresh(argv: list[str], env: dict[str, str], timeout: float | None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_group(proc.pid)
        proc.communicate()
        raise
    return subprocess.CompletedProcess([sys.executable, *argv], proc.returncode, out, err)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def preloaded(modules: tuple[str, ...] = WORKLOAD_MODULES, env: dict[str, str] | None = None, *,
              when: bool = True) -> Iterator[None]:
    """Within this block, `run` forks its children from one interpreter that has imported `modules` (in `env`, the
    environment every child gets: what a library reads at import cannot differ between children), started at the
    first child. A call with another environment still starts a fresh interpreter. A block inside another has its
    own interpreter; the outer one's serves again after it. With `when` false the block changes nothing (a
    published run's children start fresh)."""
    global _preload, _server, _server_env, _pending
    if not when:
        yield
        return
    outer = (_preload, _server, _server_env, _pending)
    _preload, _server, _server_env, _pending = tuple(modules), None, dict(os.environ if env is None else env), b""
    try:
        yield
    finally:
        server = _server
        _preload, _server, _server_env, _pending = outer
        if server is not None:  # idle (`run` waits for each child): nothing of it is worth an orderly exit
            server.kill()
            server.wait()
            server.stdin.close()
            server.stdout.close()


def _start_server() -> subprocess.Popen:
    global _server
    if _server is None:
        _server = subprocess.Popen([sys.executable, __file__, "--serve", *_preload], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=_server_env)
    return _server


def _answer(deadline: float | None) -> dict | None:
    """The server's next answer line, or None once `deadline` (time.monotonic()) passes. Read from the pipe's
    descriptor, not a buffered file: both of a fast child's answers may arrive in one read."""
    global _pending
    fd = _server.stdout.fileno()
    while b"\n" not in _pending:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"the preloaded interpreter ended (exit {_server.wait()})")
        _pending += chunk
    line, _pending = _pending.split(b"\n", 1)
    return json.loads(line)


def _run_forked(argv: list[str], env: dict[str, str], timeout: float | None) -> subprocess.CompletedProcess:
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="child-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "stdout": str(out), "stderr": str(err)}
        server = _start_server()
        server.stdin.write(json.dumps(request).encode() + b"\n")
        server.stdin.flush()
        pid, done = _answer(None)["pid"], None
        try:
            done = _answer(deadline)
        finally:
            if done is None:  # past the deadline, or interrupted: the child's whole group goes, and its end is read
                _kill_group(pid)
                _answer(None)
        if done is None:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, *argv], done["status"], out.read_text(),
                                           err.read_text())


# ---------------------------------------------------------------------------------------------------------------
# The server (`python children.py --serve MODULES`)


def _serve(modules: list[str]) -> dict | None:
    """Import `modules`, then fork one child per request. Returns the request in the child (which goes on to run
    it), None in the server when its stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills the children
    for name in modules:
        with contextlib.suppress(Exception):  # one that fails here fails in the child, as in a fresh process
            importlib.import_module(name)
    gc.freeze()  # what the imports made stays untouched by the children's collections: its pages stay shared
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)
    return None


def _become(request: dict) -> None:
    """In the forked child: a process group of its own, the request's directory, output and arguments."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags | (os.O_CREAT if fd else 0), 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    script = str(Path(request["argv"][0]).resolve())
    sys.argv = [script, *request["argv"][1:]]
    sys.path[0] = str(Path(script).parent)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    child_request = _serve(sys.argv[2:])
    if child_request is not None:
        import runpy

        _become(child_request)
        runpy.run_path(sys.argv[0], run_name="__main__")  # an uncaught exception or SystemExit ends it as `python` would
