"""Named crash points for testing crash safety.

Code that must survive a crash calls :func:`fault_point` at the moments worth crashing in. When the environment
variable ``LOGITSTORE_FAULT`` names that point, the process kills itself with SIGKILL right there, so a test can
stop a writer in exactly the state a point is named after (e.g. ``before-commit:3``: every file of shard 3
written, its commit record not) instead of guessing the moment with sleeps. Unset, a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LOGITSTORE_FAULT"
SIGNAL_ENV = "LOGITSTORE_FAULT_SIGNAL"  # "SIGINT": a Ctrl-C at the point instead of a kill -9


def fault_point(name: str) -> None:
    """Die here, as `kill -9` would, if ``LOGITSTORE_FAULT`` equals `name` (or take a Ctrl-C here, with
    ``LOGITSTORE_FAULT_SIGNAL=SIGINT``)."""
    if os.environ.get(FAULT_ENV) == name:
        if os.environ.get(SIGNAL_ENV) == "SIGINT":
            raise KeyboardInterrupt  # what Python's SIGINT handler raises at this point
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        os._exit(137)  # not reached where SIGKILL exists
