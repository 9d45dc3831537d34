"""Unpaired preference data (thumbs up / thumbs down) as TRL 1.16's KTOTrainer reads and tokenizes it, and the
KL completions it pairs with each example.

Format (detected from the columns, as TRL does): `prompt`, `completion` and a boolean `label` per record, plain
strings (standard) or lists of `{role, content}` messages (conversational). TRL's KTOTrainer extracts an implicit
prompt only from paired data, so an unpaired record without a prompt is refused here as it fails there.

Tokenization is TRL's `_prepare_dataset`: a plain-text completion gets EOS appended unless it ends with it; prompt
and prompt+completion are tokenized separately (chat template, with the generation prompt for the prompt alone,
for messages) and the completion starts where the tokenized prompt stops being a prefix of prompt+completion. Each
example's KL completion is the completion of its neighbour within chunks of the KL batch size
(:func:`logitstore.kinds.kl_rows`); prompt + completion and prompt + KL completion are each cut to `max_length`
tokens at the end, as TRL's collator cuts them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from logitstore.errors import InputDataError
from logitstore.storage import tidy_path
from logitstore.kinds import kl_rows

from .records import Text, check_style, check_text, json_objects, read_records, record_id, rows_digest
from .tokenization import TokenizedPair, _ids, common_prefix_length

PAIR_FIELDS = ("chosen", "rejected")
UNPAIRED_FIELDS = ("completion", "label")


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    id: str
    prompt: Text
    completion: Text
    label: bool
    line: int


def is_unpaired(record: Any) -> bool:
    return isinstance(record, dict) and any(f in record for f in UNPAIRED_FIELDS)


def content_id(prompt: Text, completion: Text, label: bool) -> str:
    blob = json.dumps([prompt, completion, label], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def load_unpaired(path: str | Path, split: str | None = None) -> list[UnpairedExample]:
    """Every record of `path` as an :class:`UnpairedExample`, or one :class:`InputDataError` for the first bad one."""
    path = tidy_path(path)
    out: list[UnpairedExample] = []
    seen: dict[str, int] = {}
    kinds: set[bool] = set()
    for line, record, where in json_objects(path, split):
        if any(f in record for f in PAIR_FIELDS):
            first = out[0].line if out else line
            raise InputDataError(f"{where}: a preference pair (chosen/rejected) in unpaired data (the first "
                                 f"record, line {first}, is unpaired); keep pairs and unpaired examples in "
                                 "separate files")
        if "label" not in record and out:
            raise InputDataError(f"{where}: a prompt/completion record without a label in unpaired data (the first "
                                 f"record, line {out[0].line}, has one); keep kinds in separate files")
        for field in ("prompt", "completion", "label"):
            if record.get(field) is None:
                extra = (" (TRL's KTOTrainer extracts an implicit prompt only from chosen/rejected pairs)"
                         if field == "prompt" else "")
                raise InputDataError(f"{where}: missing field {field!r}{extra}")
        label = record["label"]
        if type(label) is not bool:
            raise InputDataError(f"{where}: field 'label' must be true or false, got {type(label).__name__} "
                                 f"{json.dumps(label)[:40]}")
        prompt = check_text(record["prompt"], "prompt", where)
        completion = check_text(record["completion"], "completion", where)
        check_style(kinds, where, prompt, completion)
        example_id = record_id(record, where, seen, line, lambda: content_id(prompt, completion, label))
        out.append(UnpairedExample(example_id, prompt, completion, label, line))
    if not out:
        raise InputDataError(f"{path}: no examples found")
    return out


def tokenize_example(tokenizer: Any, example: UnpairedExample, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, whole completion ids) of one example, as TRL's KTOTrainer tokenizes it; the completion is not
    cut yet (its KL use is cut against another prompt)."""
    where = f"line {example.line} (id {example.id!r})"
    if len(example.completion) == 0:
        raise InputDataError(f"{where}: empty completion")
    if isinstance(example.completion, list):
        prompt_ids = _ids(tokenizer, example.prompt, add_generation_prompt=True)
        full = _ids(tokenizer, example.prompt + example.completion)  # type: ignore[operator]
    else:
        eos = tokenizer.eos_token
        completion = example.completion if example.completion.endswith(eos) else example.completion + eos
        prompt_ids = _ids(tokenizer, example.prompt)
        full = _ids(tokenizer, example.prompt + completion)  # type: ignore[operator]
    cut = common_prefix_length(prompt_ids, full)
    if cut >= max_length:
        raise InputDataError(f"{where}: the prompt alone is {cut} tokens, at or over --max-length {max_length}")
    prompt, completion_ids = np.asarray(prompt_ids[:cut], dtype=np.int64), np.asarray(full[cut:], dtype=np.int64)
    if len(completion_ids) - (cut == 0) <= 0:
        raise InputDataError(f"{where}: the completion has no token to score")
    return prompt, completion_ids


def pair_kl(tokenized: list[tuple[np.ndarray, np.ndarray]], kl_batch_size: int, max_length: int,
            ) -> list[TokenizedPair]:
    """Each example as (prompt, completion, KL completion), both completions cut so that prompt + completion fits
    `max_length` (the layout the reference pass scores: the KL completion in the second slot)."""
    sources = kl_rows(len(tokenized), kl_batch_size)
    out = []
    for (prompt, completion), source in zip(tokenized, sources):
        room = max_length - len(prompt)
        out.append(TokenizedPair(prompt, completion[:room], tokenized[source][1][:room]))
    return out


def data_digest(examples: list[UnpairedExample]) -> str:
    """SHA-256 over the examples' IDs, content and labels, in order: the data part of a store's fingerprint."""
    return rows_digest([ex.id, ex.prompt, ex.completion, ex.label] for ex in examples)


def export_records(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The examples of `path` as an export writes them: ``id``, ``prompt``, ``completion``, ``label``."""
    return [{"id": ex.id, "prompt": ex.prompt, "completion": ex.completion, "label": ex.label}
            for ex in load_unpaired(path, split)]
