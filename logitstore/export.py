"""Exporting a store's reference values next to the source data: a `datasets` folder for TRL, Parquet or JSONL.

Rows are matched by example ID, so the export is right whatever order the data comes in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LogitstoreError
from .reader import Store

FORMATS = ("trl", "parquet", "jsonl")


def joined_records(store: Store, records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Records (each with an ``id``) that the store holds, with `ref_chosen_logps`/`ref_rejected_logps` added
    (TRL's KTOTrainer columns `ref_logps`/`ref_KL_logps` for an unpaired store).

    Returns the joined records and how many input records the store does not hold (left out, e.g. skipped in
    the build). Store IDs absent from the records are an error: the data is not the data of the store.
    """
    held = set(store.ids)
    keep = [r for r in records if r["id"] in held]
    if len(keep) < len(held):
        missing = len(held) - len({r["id"] for r in keep})
        raise LogitstoreError(f"{missing} examples of the store are not in the data; export needs the data the "
                              "store was built from")
    values = store.get([r["id"] for r in keep])
    unpaired = store.kind.name == "unpaired"
    if unpaired and [r["id"] for r in keep] != store.ids:
        # TRL pairs KL completions by position: the export must hold the store's examples in the store's order
        raise LogitstoreError("the data holds the store's examples in another order; an unpaired store's KL values "
                              "pair examples by position, so export needs the data the store was built from")
    names = ({"ref_logps": "completion_logps", "ref_KL_logps": "kl_logps"} if unpaired
             else {"ref_chosen_logps": "chosen_logps", "ref_rejected_logps": "rejected_logps"})
    out = []
    for i, record in enumerate(keep):
        row = dict(record)
        for column, field in names.items():
            row[column] = float(values[field][i])
        out.append(row)
    return out, len(records) - len(keep)


def export(store: Store, records: Sequence[Mapping[str, Any]], to: str, out: str | os.PathLike[str]) -> dict[str, Any]:
    if to not in FORMATS:
        raise LogitstoreError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    rows, left_out = joined_records(store, records)
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise LogitstoreError(f"{out} already exists; choose a new path")
    if to == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if to == "parquet":
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".partial")
            ds.to_parquet(str(tmp))
            os.replace(tmp, out)
        else:
            ds.save_to_disk(str(out))
    return {"rows": len(rows), "left_out": left_out, "out": str(out)}
