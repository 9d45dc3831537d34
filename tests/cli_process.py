"""The `logitstore` command run in this process, answering as `python -m logitstore.cli.main` would: its exit status
and everything it writes to stdout and stderr (click's lines, progress bars, library warnings and log records).

A subprocess pays for importing torch and transformers on every call (seconds on a busy 2-core machine); a test
keeps one where the fresh process is its point: kill -9, Ctrl-C, torchrun, the console script, what a process prints
at import time."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

# The interpreter's own warning filters (no -W, no PYTHONWARNINGS): what a user's `logitstore` process shows.
_INTERPRETER_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                        ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                        ("ignore", ResourceWarning, None)]


@contextlib.contextmanager
def _environment(env: dict[str, str], cwd: str | Path | None) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in env}
    here = os.getcwd()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(here)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _log_handlers_to(stream: io.StringIO) -> Iterator[None]:
    """Handlers made at import (transformers', for one) hold the stderr of that moment; point them at `stream`."""
    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger)]
    handlers = {h for lg in loggers for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and not isinstance(getattr(type(h), "stream", None), property)}  # those find sys.stderr anew
    before = {h: h.stream for h in handlers}
    for handler in handlers:  # assigned, not setStream: that flushes the old stream, which may be closed by now
        handler.stream = stream
    try:
        yield
    finally:
        for handler, old in before.items():
            handler.stream = old


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None
            ) -> subprocess.CompletedProcess:
    """`logitstore ARGS` in this process: a CompletedProcess with the exit status a process would have had."""
    from logitstore.cli import main as entry

    entry._DEBUG = False  # --debug is remembered for the life of a process; each call here is a new one
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _environment(env or {}, cwd), _log_handlers_to(err), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(_INTERPRETER_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = _show_warning  # printed, as a process does, not recorded by pytest
        try:
            entry.main(list(args))
        except SystemExit as exc:  # as the interpreter ends a process on SystemExit
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=err)
                code = 1
        except Exception:  # noqa: BLE001 - uncaught (--debug re-raises): the interpreter prints it and exits 1
            traceback.print_exc(file=err)
            code = 1
    return subprocess.CompletedProcess(["logitstore", *args], code, out.getvalue(), err.getvalue())
