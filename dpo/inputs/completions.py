"""Plain prompt/completion data (TRL's "prompt-completion" format, as its SFTTrainer and DistillationTrainer take
it) for a completion store: distillation without pairs.

Format (detected from the columns, as TRL does): `prompt` and `completion` per record, plain strings (standard) or
lists of `{role, content}` messages (conversational), and no `label` (a `label` column makes the data unpaired, for
KTO: dpo/inputs/unpaired.py). Tokenization is TRL 1.16 SFTTrainer's for prompt-completion data: a plain-text
completion gets EOS appended unless it ends with it; prompt and prompt+completion are tokenized separately (chat
template, with the generation prompt for the prompt alone, for messages) and the completion starts where the
tokenized prompt stops being a prefix of prompt+completion; prompt + completion is cut to `max_length` tokens at the
end (TRL's default truncation, keep_start). The tokenization is the one unpaired data shares
(:func:`dpo.inputs.unpaired.tokenize_example`).
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

from .records import Text, check_style, check_text, json_objects, record_id, rows_digest
from .unpaired import tokenize_example


@dataclasses.dataclass(frozen=True)
class CompletionExample:
    id: str
    prompt: Text
    completion: Text
    line: int


def content_id(prompt: Text, completion: Text) -> str:
    blob = json.dumps([prompt, completion], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def load_completions(path: str | Path, split: str | None = None) -> list[CompletionExample]:
    """Every record of `path` as a :class:`CompletionExample`, or one :class:`InputDataError` for the first bad
    one."""
    path = tidy_path(path)
    out: list[CompletionExample] = []
    seen: dict[str, int] = {}
    kinds: set[bool] = set()
    for line, record, where in json_objects(path, split):
        first = out[0].line if out else line
        if "chosen" in record or "rejected" in record:
            raise InputDataError(f"{where}: a preference pair (chosen/rejected) in prompt/completion data (the "
                                 f"first record, line {first}, is prompt/completion); keep kinds in separate files")
        if "label" in record:
            raise InputDataError(f"{where}: a labelled (unpaired, KTO) record in prompt/completion data (the first "
                                 f"record, line {first}, has no label); keep kinds in separate files")
        for field in ("prompt", "completion"):
            if record.get(field) is None:
                raise InputDataError(f"{where}: missing field {field!r}")
        prompt = check_text(record["prompt"], "prompt", where)
        completion = check_text(record["completion"], "completion", where)
        check_style(kinds, where, prompt, completion)
        example_id = record_id(record, where, seen, line, lambda: content_id(prompt, completion))
        out.append(CompletionExample(example_id, prompt, completion, line))
    if not out:
        raise InputDataError(f"{path}: no examples found")
    return out


def tokenize_completion(tokenizer: Any, example: CompletionExample, max_length: int,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, completion ids cut to fit `max_length`) of one example, as TRL's SFTTrainer tokenizes it."""
    prompt, completion = tokenize_example(tokenizer, example, max_length)  # type: ignore[arg-type]
    return prompt, completion[:max_length - len(prompt)]


def data_digest(examples: list[CompletionExample]) -> str:
    """SHA-256 over the examples' IDs and content, in order: the data part of a store's fingerprint."""
    return rows_digest([ex.id, ex.prompt, ex.completion] for ex in examples)


def export_records(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The examples of `path` as an export writes them: ``id``, ``prompt``, ``completion``."""
    return [{"id": ex.id, "prompt": ex.prompt, "completion": ex.completion} for ex in load_completions(path, split)]
