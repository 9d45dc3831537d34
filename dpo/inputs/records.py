"""Reading data records in the formats TRL accepts, with one clear error per bad record: what every kind's data
reader (:mod:`.pairs`, :mod:`.unpaired`, :mod:`.completions`) shares.

Sources: JSONL (optionally gzipped), Parquet, or a folder written by `datasets.save_to_disk`. Texts are plain
strings (standard) or lists of `{role, content}` messages (conversational), never both in one file.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from logitstore.errors import InputDataError
from logitstore.storage import tidy_path

Text = str | list[dict[str, Any]]


@dataclasses.dataclass
class Skipped:
    id: str
    line: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_records(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    name = path.name.lower()
    if path.is_dir():
        import datasets  # the `data` extra; the command line names it when it is missing
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
            raise InputDataError(f"{path}: not a folder written by datasets.save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            chosen_split = split or ("train" if "train" in ds else None)
            if chosen_split not in ds:
                raise InputDataError(f"{path}: choose a split with --split (it has {', '.join(ds)})")
            ds = ds[chosen_split]
        for i, record in enumerate(ds):
            yield i + 1, record
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001
            raise InputDataError(f"{path}: not a readable Parquet file ({exc})") from None
        for i, record in enumerate(table.to_pylist()):
            yield i + 1, record
    elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    text = line.rstrip("\r\n")  # with its newline, a fault at the end reads "line 2 column 1"
                    try:
                        yield number, json.loads(text)
                    except json.JSONDecodeError as exc:
                        at = "" if exc.msg.endswith(" at") else " at"  # "Unterminated string starting at"
                        end = ", the end of the line" if exc.pos >= len(text) else ""
                        raise InputDataError(f"{path}:{number}: malformed JSON ({exc.msg}{at} column "
                                             f"{exc.colno}{end})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputDataError(f"{path}: cannot be read as UTF-8 JSON lines ({exc})") from None
    else:
        raise InputDataError(f"{path}: unknown data format (use .jsonl, .jsonl.gz, .parquet or a datasets folder)")


def check_text(value: Any, field: str, where: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    kind = type(value).__name__
    raise InputDataError(f"{where}: field {field!r} must be a string or a list of {{role, content}} messages, "
                         f"got {kind}")


def record_id(record: dict[str, Any], where: str, seen: dict[str, int], line: int,
              default: Callable[[], str]) -> str:
    """A record's example ID: its `id` field, or `default()` (a hash of its contents); unique within the file
    (`seen` maps the IDs so far to their lines)."""
    raw_id = record.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise InputDataError(f"{where}: field 'id' must be a string or an integer")
    example_id = str(raw_id) if raw_id is not None else default()
    if example_id == "":
        raise InputDataError(f"{where}: empty example ID")
    if example_id in seen:
        raise InputDataError(f"{where}: duplicate example ID {example_id!r} (first on line {seen[example_id]})")
    seen[example_id] = line
    return example_id


def json_objects(path: Path, split: str | None) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(line, record, "path:line") for every record of `path`; a record that is not a JSON object is an error."""
    for line, record in read_records(path, split):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise InputDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield line, record, where


def check_style(kinds: set[bool], where: str, *texts: Text | None) -> None:
    """One record's texts (None: absent) are all plain strings or all message lists, and so is every record seen
    before it (`kinds` collects what they were)."""
    styles = {isinstance(text, list) for text in texts if text is not None}
    if len(styles) > 1:
        raise InputDataError(f"{where}: mixes plain strings and message lists")
    kinds |= styles
    if len(kinds) > 1:
        raise InputDataError(f"{where}: the data mixes conversational and plain-text records")


def rows_digest(rows: Iterable[list[Any]]) -> str:
    """SHA-256 over rows of JSON values, one compact JSON line each, in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def first_record(path: str | Path, split: str | None = None) -> Any:
    """The first record of `path` (its columns say the data's kind, as TRL reads them)."""
    path = tidy_path(path)
    if not path.exists():
        raise InputDataError(f"{path}: no such file or folder")
    for _, record in read_records(path, split):
        return record
    raise InputDataError(f"{path}: no records found")
