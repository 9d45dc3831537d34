"""torchrun and accelerate launch whose ranks start without the imports: `torchrun(ARGS, port=...)` is the command
line of `torchrun --nproc_per_node 2 --no-python logitstore ARGS` whose ranks are forked from an interpreter that
imported torch, transformers, peft, TRL and logitstore once (`preloaded=False`: that command line itself);
`accelerate_launch(CONFIG, PORT, SCRIPT, ARGS)` is `accelerate launch`'s, the same way.

A rank of `torchrun --no-python logitstore ...` is a fresh interpreter that spends 6-9 s of CPU on imports before it
does anything: most of a two-rank test on a tiny model, twice per launch. Here torchrun starts a stub in the rank's
place (this file, run with `python -S`: the standard library only). The stub hands a server its arguments,
environment, directory and the descriptors of its standard streams; the server (this file with --serve, started
once per test process) forks the rank, which runs the program as `python PROGRAM ARGS` would (runpy, as
__main__), in a session of its own as torchrun starts each rank. The stub passes on every signal torchrun sends
(SIGTERM, then SIGKILL after its grace period: the server kills a rank whose stub is gone) and exits as the rank
did, with its exit code or by the same signal, so torchrun sees, reports and cleans up after the rank as after a
fresh one. Rendezvous, gloo, the error file torchrun reads (TORCHELASTIC_ERROR_FILE) are the rank's own.

A rank runs fresh (the stub execs the program) when the server does not answer, or when its environment differs
from the server's in more than what the launcher sets per rank and what is read at run time only: what a library
reads at import cannot differ. Tests whose point is a fresh process (a rank's peak memory, what a user sees from a bad
launch) pass `preloaded=False` or call torch.distributed.run themselves. No pickle: requests and answers are JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

# What torchrun sets per rank, and what is read at run time only: a rank's environment may differ from the
# server's in these.
PER_RANK = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
            "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTEST_CURRENT_TEST",
            "SOURCE_DATE_EPOCH", "LOGITSTORE_FAULT", "LOGITSTORE_FAULT_SIGNAL", "COLUMNS", "LINES")
PER_RANK_PREFIXES = ("TORCHELASTIC_", "TORCH_NCCL_", "NCCL_", "ACCELERATE_", "FSDP_")  # accelerate launch's too

# What a rank of `logitstore build | train` imports, and one of the TRL examples under `accelerate launch`.
MODULES = ("torch", "torch.distributed.fsdp", "torch.distributed.checkpoint",
           "transformers.models.mistral.modeling_mistral", "transformers.models.llama.tokenization_llama",
           "transformers.models.byt5.tokenization_byt5", "peft", "logitstore.dpo.reference.build",
           "logitstore.dpo.training.loop", "logitstore.cli.main", "datasets", "accelerate", "trl",
           "logitstore.integrations.trl")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def comparable(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_RANK and not k.startswith(PER_RANK_PREFIXES)}


# ---------------------------------------------------------------------------------------------------------------
# The test side: the server, once per test process, and torchrun's command line


class Server:
    """The preloaded interpreter (`python ranks.py --serve SOCKET MODULES`) and the stub torchrun starts, in a new
    temporary folder that goes with the server."""

    def __init__(self, modules: tuple[str, ...] = MODULES) -> None:
        import subprocess
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="ranks-")
        self.socket = os.path.join(self.folder, "ranks.sock")
        self.stub = os.path.join(self.folder, "rank")
        with open(self.stub, "w") as f:  # torchrun --no-python runs it as a program: a shebang line
            f.write(f"#!{sys.executable} -S\n")
            with open(__file__) as source:
                f.write(source.read())
        os.chmod(self.stub, 0o755)
        # Its stdin is a pipe from this process: when this process ends, however, the server does too.
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", self.socket, *modules],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ))
        ready = self.process.stdout.readline()
        if ready != b"ready\n":
            raise RuntimeError(f"the rank server did not start (exit {self.process.wait()})")

    def command(self, program: str, *args: str) -> list[str]:
        """What torchrun runs in place of `PROGRAM ARGS` (a program, with its shebang line)."""
        return [self.stub, self.socket, program, *args]

    def close(self) -> None:
        import shutil

        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_server: Server | None = None


def torchrun(*args: str, port: int, nproc: int = 2, preloaded: bool = True) -> list[str]:
    """The command line of `torchrun --nproc_per_node NPROC --master_port PORT --no-python logitstore ARGS`, its
    ranks forked from the server (started at the first call) unless `preloaded` is false."""
    program = os.path.join(os.path.dirname(sys.executable), "logitstore")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
              str(port), "--no-python"]
    return [*launch, *_server.command(program, *args)] if preloaded and _server_runs() else [*launch, program, *args]


def accelerate_launch(config: str, port: int, script: str, *args: str) -> list[str]:
    """The command line of `accelerate launch --config_file CONFIG --main_process_port PORT SCRIPT ARGS`, its ranks
    forked from the server (accelerate's --no_python runs the stub in place of `python SCRIPT`)."""
    launch = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file", config,
              "--main_process_port", str(port)]
    return [*launch, "--no_python", *_server.command(script, *args)] if _server_runs() else [*launch, script, *args]


def _server_runs() -> bool:
    """Whether ranks can be forked here (the supervisor waits on a pidfd: Linux), the server started if so."""
    global _server
    if not hasattr(os, "pidfd_open"):
        return False
    if _server is None:
        import atexit

        _server = Server()
        atexit.register(_server.close)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The stub (torchrun's rank): hand over, pass signals on, exit as the rank did


def _fresh(argv: list[str]) -> None:
    """Become a fresh rank: the program itself, or `python SCRIPT` for a script that is not executable."""
    if os.access(argv[0], os.X_OK):
        os.execv(argv[0], argv)
    os.execv(sys.executable, [sys.executable, *argv])


def _stub(path: str, argv: list[str]) -> None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        _fresh(argv)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(connection, [len(request).to_bytes(8, "big")], [0, 1, 2])
    connection.sendall(request)
    answers = connection.makefile("rb")
    started = json.loads(answers.readline() or b'{"exec": true}')  # no answer: no rank was started
    if "exec" in started:  # the server judged the environment another: fresh
        connection.close()
        _fresh(argv)
    pid = started["pid"]

    def pass_on(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    for signum in _FORWARDED:
        signal.signal(signum, pass_on)
    line = answers.readline()
    code = json.loads(line)["status"] if line else 1  # no answer: the server is gone, and the rank with it
    if code < 0:  # killed: so is the stub, by the same signal
        if -code in _FORWARDED:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------------------------
# The server: import once, then a supervisor per rank (fork), which forks the rank and waits for it or its stub


# In the server: its environment as started, and what its imports added to it.
_started: dict[str, str] = {}
_imported: dict[str, str] = {}


def _serve(socket_path: str, modules: list[str]):
    """Returns (request, fds) in a rank, which goes on to run it; never returns elsewhere."""
    import gc
    import importlib
    import select

    global _started, _imported
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the test process's to handle
    _started = dict(os.environ)
    for name in modules:
        with contextlib.suppress(Exception):  # one that fails here fails in the rank, as in a fresh process
            importlib.import_module(name)
    _imported = {k: v for k, v in os.environ.items() if _started.get(k) != v}  # set by an import: a rank's too
    gc.freeze()  # what the imports made stays untouched by the ranks' collections: their pages stay shared
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped as they end
    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.flush()
    while True:
        ready = select.select([listener, sys.stdin], [], [])[0]
        if sys.stdin in ready:  # the test process is gone, without closing the server: its folder goes too
            import shutil

            shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)
            os._exit(0)
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            return _supervise(connection)
        connection.close()


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """The stub's request (its size in 8 bytes, then JSON) and the descriptors sent with its first bytes."""
    head, fds, _, _ = socket.recv_fds(connection, 8, 3)
    head += _exactly(connection, 8 - len(head))
    return json.loads(_exactly(connection, int.from_bytes(head, "big"))), fds


def _exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:  # the stub is gone before its request was whole: nothing to start
            os._exit(1)
        data += chunk
    return data


def _supervise(connection: socket.socket):
    import select

    request, fds = _receive(connection)
    if comparable(request["env"]) != comparable(_started):
        connection.sendall(b'{"exec": true}\n')
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        connection.close()
        return request, fds
    for fd in fds:
        os.close(fd)
    connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    ended = os.pidfd_open(pid)
    while True:
        ready = select.select([connection, ended], [], [])[0]
        if ended in ready:
            _, status = os.waitpid(pid, 0)
            with contextlib.suppress(OSError):  # the stub is gone
                connection.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            os._exit(0)
        if not connection.recv(1):  # the stub is gone (torchrun's SIGKILL): so is the rank
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os._exit(0)


def _become(request: dict, fds: list[int]) -> str:
    """In the rank: a session of its own, the stub's streams, environment, directory and arguments."""
    os.setsid()
    for signum in _FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update({**_imported, **request["env"]})
    os.chdir(request["cwd"])
    sys.stdin = open(0, closefd=False)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    program = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(program))
    return program


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        rank = _serve(sys.argv[2], sys.argv[3:])
        import runpy

        runpy.run_path(_become(*rank), run_name="__main__")  # an exception or SystemExit ends it as `python` would
    else:
        _stub(sys.argv[1], sys.argv[2:])
