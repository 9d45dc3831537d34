"""Preference-pair data in the formats TRL's DPOTrainer accepts, with one clear error per bad record.

Formats: standard (`prompt`, `chosen`, `rejected` strings), conversational (lists of `{role, content}` messages)
and implicit prompt (only `chosen`/`rejected`; their shared prefix is the prompt). Sources: those of
:mod:`.records`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from logitstore.errors import InputDataError
from logitstore.storage import tidy_path

from .records import Text, check_style, check_text, json_objects, record_id, rows_digest


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    id: str
    prompt: Text | None  # None: implicit prompt, extracted at tokenization like TRL
    chosen: Text
    rejected: Text
    line: int  # 1-based line (JSONL) or row (Parquet, datasets) number, for messages


def content_id(prompt: Text | None, chosen: Text, rejected: Text) -> str:
    """A stable ID for a pair without one: a hash of its content."""
    blob = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def load_examples(path: str | Path, split: str | None = None) -> list[PreferenceExample]:
    """Every record of `path` as a :class:`PreferenceExample`, or one :class:`InputDataError` for the first bad one."""
    path = tidy_path(path)
    if not path.exists():
        raise InputDataError(f"{path}: no such file or folder")
    out: list[PreferenceExample] = []
    seen: dict[str, int] = {}
    kinds: set[bool] = set()
    for line, record, where in json_objects(path, split):
        if "completion" in record or "label" in record:
            raise InputDataError(f"{where}: an unpaired record (completion/label) in preference-pair data (the "
                                 f"first record, line {out[0].line if out else line}, is a pair); keep pairs and "
                                 "unpaired examples in separate files")
        for field in ("chosen", "rejected"):
            if field not in record or record[field] is None:
                raise InputDataError(f"{where}: missing field {field!r}")
        chosen = check_text(record["chosen"], "chosen", where)
        rejected = check_text(record["rejected"], "rejected", where)
        prompt = check_text(record["prompt"], "prompt", where) if record.get("prompt") is not None else None
        check_style(kinds, where, chosen, rejected, prompt)
        example_id = record_id(record, where, seen, line, lambda: content_id(prompt, chosen, rejected))
        out.append(PreferenceExample(example_id, prompt, chosen, rejected, line))
    if not out:
        raise InputDataError(f"{path}: no preference pairs found")
    return out


def export_records(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The pairs of `path` as the records an export writes: ``id``, ``prompt`` (when the data has one),
    ``chosen``, ``rejected``."""
    records = []
    for ex in load_examples(path, split):
        record: dict[str, Any] = {"id": ex.id}
        if ex.prompt is not None:
            record["prompt"] = ex.prompt
        record.update(chosen=ex.chosen, rejected=ex.rejected)
        records.append(record)
    return records


def data_digest(examples: list[PreferenceExample]) -> str:
    """SHA-256 over the examples' IDs and content, in order: the data part of a store's fingerprint."""
    return rows_digest([ex.id, ex.prompt, ex.chosen, ex.rejected] for ex in examples)
