"""How a failing command ends under a launcher of several processes (torchrun, accelerate launch).

Every rank runs the same command, so a refusal (bad options, a store that does not fit) happens on every rank
alike: rank 0 alone prints its line. Each rank also writes the line to the error file torchrun's elastic agent names
in TORCHELASTIC_ERROR_FILE, so torchrun's failure report ("Root Cause") shows the line instead of a link, and an
error that happened on another rank only is not lost. torchrun itself still prints that report, with the traceback
of its own ChildFailedError, whenever a rank exits non-zero: that is the launcher's, not the command's.
"""

from __future__ import annotations

import json
import os
import time


def rank() -> int | None:
    """This process's rank when a launcher started several (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ.get("RANK", "0") or 0)
    return None


def speaks() -> bool:
    """Whether this process prints the command's error: alone, or rank 0 of several."""
    return rank() in (None, 0)


def record(line: str) -> None:
    """Write `line` where torchrun's agent reads a failed rank's error (its ErrorHandler's format)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or rank() is None:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:  # the agent then reports the exit status alone
        pass
