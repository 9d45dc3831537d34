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
    """Records (each with an ``id``) that the store holds, with `ref_chosen_logps`/`ref_rejected_logps` added.

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
    out = []
    for i, record in enumerate(keep):
        row = dict(record)
        row["ref_chosen_logps"] = float(values["chosen_logps"][i])
        row["ref_rejected_logps"] = float(values["rejected_logps"][i])
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
