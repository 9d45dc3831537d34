"""Scoring one shard's rows in the reference pass: batched by length under a token budget, each side of every row
through the model (with teacher records where the build takes them), and the values laid out as the store's
fields for :meth:`logitstore.StoreWriter.write_shard`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from logitstore import format as fmt
from logitstore.kinds import Kind

from ..inputs.tokenization import TokenizedPair


def length_batches(rows: list[TokenizedPair], batch_size: int, batch_tokens: int,
                   bucketing: bool = True) -> list[list[int]]:
    """Group rows of similar length so padding stays small: sorted by length, cut by count and token budget. The
    budget counts two completions per row for every kind (a pair's layout), so that the examples batched together,
    and with them the values, do not depend on how many sides a kind scores."""
    cost = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in rows]
    order = sorted(range(len(rows)), key=lambda i: (cost[i], i)) if bucketing else list(range(len(rows)))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([cost[j] for j in current] + [cost[i]])
        if current and (len(current) >= batch_size or 2 * width * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def completions_of(row: TokenizedPair, sides: int) -> list[np.ndarray]:
    """A row's scored completions, side by side (a one-sided kind scores the first)."""
    return [row.chosen_ids, row.rejected_ids][:sides]


def score_rows(model: Any, rows: list[TokenizedPair], *, sides: int, pad_id: int, batch_size: int,
               batch_tokens: int, share_prompt: bool, bucketing: bool = True,
               on_batch: Callable[[int, int], None] | None = None, teacher: dict[str, Any] | None = None,
               store_rows: list[int] | None = None, mass: list[np.ndarray] | None = None,
               ) -> tuple[list[list[np.ndarray]], list[list[Any]] | None]:
    """Per-token log-probs of the scored completion tokens of each of `sides` sides of every row, in input order
    (a list per side). With `teacher` (the header's entry), also each side's teacher record per row
    (`store_rows`: the rows' store rows, which seed sampled records), and with `mass` each side's tail mass added
    up (``teacher.new_mass``)."""
    import torch

    from ..model.scoring import pair_logps_shared, sides_logps
    from .teacher import sides_logps_teacher

    values: list[list[np.ndarray]] = [[np.zeros(0, np.float32)] * len(rows) for _ in range(sides)]
    records: list[list[Any]] | None = [[None] * len(rows) for _ in range(sides)] if teacher is not None else None
    for batch in length_batches(rows, batch_size, batch_tokens, bucketing):
        prompts = [torch.from_numpy(rows[i].prompt_ids) for i in batch]
        completions = [[torch.from_numpy(completions_of(rows[i], sides)[k]) for i in batch] for k in range(sides)]
        if records is not None:
            scored, taken = sides_logps_teacher(model, prompts, completions, pad_id, entry=teacher,  # type: ignore[arg-type]
                                                rows=[store_rows[i] for i in batch], mass=mass)  # type: ignore[index]
            for k in range(sides):
                for i, record in zip(batch, taken[k]):
                    records[k][i] = record
        elif share_prompt and sides == 2:  # each prompt once, both completions from its KV cache
            scored = list(pair_logps_shared(model, prompts, *completions, pad_id))
        else:
            scored = sides_logps(model, prompts, completions, pad_id)
        for k in range(sides):
            for i, v in zip(batch, scored[k]):
                values[k][i] = v.numpy()
        if on_batch is not None:
            on_batch(len(batch), sum(len(v) for side in scored for v in side))
    return values, records


def shard_data(kind: Kind, rows: list[TokenizedPair], values: list[list[np.ndarray]], per_token: bool,
               ) -> dict[str, Any]:
    """The computed rows' fields under the kind's names: token ids, each side's sum (in float64, then stored as
    float32: the per-sequence values stay exact to float32), scored-token count and, with `per_token`, values."""
    data: dict[str, Any] = {field: [getattr(r, attr) for r in rows]
                            for field, attr in zip(kind.token_fields, fmt.TOKEN_FIELDS)}
    for side, side_values in zip(kind.sides, values):
        data[side.logps] = np.array([v.sum(dtype=np.float64) for v in side_values])
        data[side.tokens] = np.array([len(v) for v in side_values])
        if per_token:
            data[side.per_token] = side_values
    return data
