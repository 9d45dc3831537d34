"""A build's plan: every example read, validated and tokenized before the model loads, so that bad input stops the
build before anything is written. Each store kind plans its own data (:mod:`dpo.kinds`) into a :class:`Plan`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from logitstore.errors import InputDataError

from .records import Skipped
from .tokenization import TokenizedPair


@dataclasses.dataclass
class Plan:
    """The examples to build, known before the model loads: each one's content key and scoring cost."""

    examples: list[Any]  # the kind's examples (PreferenceExample, UnpairedExample, CompletionExample)
    skipped: list[Skipped]
    keys: np.ndarray  # uint8 [n, 16]
    cost: np.ndarray  # int64 [n]: prompt + longer completion, in tokens
    # int64 [n]: positions through the model in one pass over prompt + each completion (sizes the shards)
    positions: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    # The token ids of every example, for kinds whose tokenization depends on other examples (unpaired: each
    # example's KL completion is a neighbour's); None: the kind tokenizes a row again when it is scored.
    tokenized: list[TokenizedPair] | None = None
    tokenize_row: Callable[[Any], TokenizedPair] | None = None  # an example -> its token ids (tokenized is None)

    def tokenize(self, row: int) -> TokenizedPair:
        if self.tokenized is not None:
            return self.tokenized[row]
        return self.tokenize_row(self.examples[row])  # type: ignore[misc]


def tokenize_each(data: str, skip_invalid: bool, examples: list[Any], tokenize: Callable[[Any], Any], noun: str,
                  ) -> tuple[list[Any], list[Skipped], list[Any]]:
    """`tokenize` applied to every example: the examples kept, the ones skipped (with `skip_invalid`) and what
    `tokenize` returned for each kept one. The first bad one stops the build unless `skip_invalid`; none left stops
    it too."""
    keep, skipped, tokenized = [], [], []
    for ex in examples:
        try:
            tokenized.append(tokenize(ex))
        except InputDataError as exc:
            if not skip_invalid:
                raise InputDataError(f"{data}: {exc} (use --skip-invalid to leave such {noun} out)") from None
            skipped.append(Skipped(ex.id, ex.line, str(exc)))
            continue
        keep.append(ex)
    if not keep:
        raise InputDataError(f"{data}: every {noun[:-1]} was invalid; nothing to build")
    return keep, skipped, tokenized
