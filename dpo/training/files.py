"""A run folder's files that must survive a crash or a power cut: weights and checkpoints published whole or not at
all, and metrics.jsonl cut back to the step a resumed run continues from.

A folder is written under a staging name, every file in it and the folder itself fsynced, then renamed into place
(:func:`publish_folder`): after a crash at any point the folder's name holds the old contents, the new ones, or is
absent, never a part (a staging folder may be left; the next write of that folder removes it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from logitstore.durable import fsync_dir, sync_written, write_durably

STAGING = ".partial"  # suffix of a folder being written
RETIRED = ".old"  # suffix of the folder a publish replaces, removed once the new one is in place


def staging_folder(target: Path) -> Path:
    """A fresh, empty folder to write `target`'s contents into (what a crashed write left there is removed)."""
    staging = target.with_name(target.name + STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_folder(staging: Path, target: Path) -> Path:
    """Make every file in `staging` durable and put the folder at `target`, replacing what was there whole."""
    sync_written([p for p in staging.rglob("*") if p.is_file()], staging)
    retired = target.with_name(target.name + RETIRED)
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(retired, ignore_errors=True)
    return target


def cut_metrics(path: Path, step: int) -> None:
    """Keep only the records of metrics.jsonl up to `step` (a resumed run logs the steps after it again); a torn
    last line (a crash while it was written) goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_durably(path, "".join(kept).encode())

