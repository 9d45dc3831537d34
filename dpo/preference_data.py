"""Reading preference data in the formats TRL accepts, with one clear error per bad record.

Formats: standard (`prompt`, `chosen`, `rejected` strings), conversational (lists of `{role, content}` messages)
and implicit prompt (only `chosen`/`rejected`; their shared prefix is the prompt). Sources: JSONL (optionally
gzipped), Parquet, or a folder written by `datasets.save_to_disk`.
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


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    id: str
    prompt: Text | None  # None: implicit prompt, extracted at tokenization like TRL
    chosen: Text
    rejected: Text
    line: int  # 1-based line (JSONL) or row (Parquet, datasets) number, for messages


@dataclasses.dataclass
class Skipped:
    id: str
    line: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _records(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
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


def _check_text(value: Any, field: str, where: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    kind = type(value).__name__
    raise InputDataError(f"{where}: field {field!r} must be a string or a list of {{role, content}} messages, "
                         f"got {kind}")


def content_id(prompt: Text | None, chosen: Text, rejected: Text) -> str:
    """A stable ID for a pair without one: a hash of its content."""
    blob = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


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
    for line, record in _records(path, split):
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
        chosen = _check_text(record["chosen"], "chosen", where)
        rejected = _check_text(record["rejected"], "rejected", where)
        prompt = _check_text(record["prompt"], "prompt", where) if record.get("prompt") is not None else None
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


def rows_digest(rows: Iterable[list[Any]]) -> str:
    """SHA-256 over rows of JSON values, one compact JSON line each, in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def data_digest(examples: list[PreferenceExample]) -> str:
    """SHA-256 over the examples' IDs and content, in order: the data part of a store's fingerprint."""
    return rows_digest([ex.id, ex.prompt, ex.chosen, ex.rejected] for ex in examples)
