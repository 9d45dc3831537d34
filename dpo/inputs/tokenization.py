"""Tokenizing preference pairs exactly as TRL 1.16's DPOTrainer does, so a store can feed TRL and be checked
against it:

1. an implicit prompt is the longest common prefix of chosen and rejected (TRL's `extract_prompt`);
2. plain-text completions get the EOS token appended unless they end with it;
3. prompt, prompt+chosen and prompt+rejected are tokenized separately (chat template for messages), and the
   completion starts where the tokenized prompt stops being a prefix of both;
4. prompt+completion is cut to `max_length` tokens at the end (`keep_start`).

TRL silently drops pairs whose prompt alone fills `max_length`; here they are an error (or skipped on request).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from logitstore.errors import InputDataError

from .pairs import PreferenceExample
from .records import Text


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray

    @property
    def chosen_scored(self) -> int:
        """Completion tokens that get a log-prob: the first has no context when the prompt is empty."""
        return max(len(self.chosen_ids) - (len(self.prompt_ids) == 0), 0)

    @property
    def rejected_scored(self) -> int:
        return max(len(self.rejected_ids) - (len(self.prompt_ids) == 0), 0)


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's `extract_prompt`: the shared prefix (of characters or of messages) is the prompt."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # keep the space with the completion
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, text: Text, **chat_kwargs: Any) -> list[int]:
    if isinstance(text, list):
        out = tokenizer.apply_chat_template(text, tokenize=True, return_dict=True, **chat_kwargs)
        return list(out["input_ids"])
    with warnings.catch_warnings():  # tokenizers that append EOS warn when the text (as in TRL) already ends in it
        warnings.filterwarnings("ignore", message="This sequence already has")
        return list(tokenizer(text=text)["input_ids"])


def tokenize_pair(tokenizer: Any, example: PreferenceExample, max_length: int,
                  max_prompt_length: int | None = None) -> TokenizedPair:
    """Tokenize one pair; raises :class:`InputDataError` naming the record when it cannot be used."""
    where = f"line {example.line} (id {example.id!r})"
    if example.prompt is None:
        prompt, chosen, rejected = extract_prompt(example.chosen, example.rejected)
    else:
        prompt, chosen, rejected = example.prompt, example.chosen, example.rejected
    if len(chosen) == 0 or len(rejected) == 0:
        side = "chosen" if len(chosen) == 0 else "rejected"
        raise InputDataError(f"{where}: empty {side} completion")
    if isinstance(chosen, list):
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full_chosen = _ids(tokenizer, prompt + chosen)
        full_rejected = _ids(tokenizer, prompt + rejected)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _ids(tokenizer, prompt)
        full_chosen = _ids(tokenizer, prompt + chosen)
        full_rejected = _ids(tokenizer, prompt + rejected)
    cut = min(common_prefix_length(prompt_ids, full_chosen), common_prefix_length(prompt_ids, full_rejected))
    prompt_ids, chosen_ids, rejected_ids = prompt_ids[:cut], full_chosen[cut:], full_rejected[cut:]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end of the prompt, next to the completion
    if len(prompt_ids) >= max_length:
        raise InputDataError(f"{where}: the prompt alone is {len(prompt_ids)} tokens, at or over --max-length "
                             f"{max_length}")
    room = max_length - len(prompt_ids)
    pair = TokenizedPair(np.asarray(prompt_ids, dtype=np.int64), np.asarray(chosen_ids[:room], dtype=np.int64),
                         np.asarray(rejected_ids[:room], dtype=np.int64))
    if pair.chosen_scored == 0 or pair.rejected_scored == 0:
        side = "chosen" if pair.chosen_scored == 0 else "rejected"
        raise InputDataError(f"{where}: the {side} completion has no token to score")
    return pair
