"""The reference pass's teacher records: the model's distribution at every scored completion position, reduced to a
top-k or sampled record (logitstore/teacher.py) while the per-token values are computed.

What a build checks before any model work (:func:`teacher_entry`): one of --top-k / --sample-k, K that the
vocabulary and the codec can hold, and a data kind and options that records can be taken with. The scoring itself
(:func:`pair_logps_teacher`) runs one forward pass per batch like ``pair_logps_full``: the per-token values come from
the same ``_head_logps`` call (so they equal a build without records bit for bit), and the records from the LM
head's logits recomputed in chunks of whole rows, at most ``LOGIT_BYTES`` of logits at a time where a row fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from logitstore import teacher as T
from logitstore import teacher_blocks as TB
from logitstore import teacher_store as TS
from logitstore.errors import LogitstoreError
from logitstore.loader import pad_pairs

Record = T.TopK | T.Sampled


def model_vocab(model: str, revision: str | None = None) -> int:
    """The width of the model's logits, from its config (before any weights load)."""
    from transformers import AutoConfig

    from .models import model_source

    config = AutoConfig.from_pretrained(str(model_source(model, revision).path))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def teacher_entry(*, top_k: int | None, sample_k: int | None, codec: str, seed: int, vocab: int) -> dict[str, Any]:
    """The header's teacher entry for a build, after `teacher_blocks.check_request` refused what cannot be stored."""
    if top_k is not None and sample_k is not None:
        raise T.TeacherError("--top-k and --sample-k are two kinds of record; a store holds one: choose one")
    TB.check_request(top_k=top_k, sample_k=sample_k, vocab=vocab, codec=codec)
    if top_k is not None:
        return TS.entry("top_k", top_k, vocab, codec=codec)
    return TS.entry("sampled", int(sample_k), vocab, seed=seed)  # type: ignore[arg-type]


def stream(row: int, side: int) -> int:
    """The random stream of a row's side: the draws depend on (seed, row, side) only, never on sharding, batching or
    ranks, and the two sides of a pair draw independently."""
    return 2 * row + side


def recorder(entry: dict[str, Any]) -> Callable[[np.ndarray, int], Record]:
    """logits [n, V] of one row side's scored positions, and its stream -> the record the store keeps."""
    k = entry["k"]
    if entry["kind"] == "top_k":
        return lambda logits, _: T.top_k(logits, k)
    return lambda logits, s: T.sample(logits, k, seed=entry["seed"], stream=s)


def empty_record(entry: dict[str, Any]) -> Record:
    k = entry["k"]
    if entry["kind"] == "top_k":
        return T.TopK(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32))
    return T.Sampled(np.zeros((0, k), np.int32), np.zeros((0, k), np.uint16), k)


def pair_logps_teacher(model: Any, prompts: list[Any], chosen: list[Any], rejected: list[Any], pad_id: int, *,
                       entry: dict[str, Any], rows: list[int]) -> tuple[list[Any], list[Any], list[Record],
                                                                        list[Record]]:
    """`pair_logps_full`'s per-token values of chosen and rejected, and each side's teacher record per pair
    (`rows`: the pairs' store rows, for the sampled records' streams)."""
    import torch

    from .logps import LOGIT_BYTES, _head_logps, exact_4bit, head_logits, split_lm
    from .models import input_device

    device = input_device(model)
    batch = pad_pairs(prompts, chosen, rejected, pad_id)
    ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
    backbone, head, config = split_lm(model)
    vocab = head.weight.shape[0]
    if vocab != entry["vocab"]:
        raise LogitstoreError(f"the model's LM head has {vocab} outputs, its config says {entry['vocab']} tokens")
    record = recorder(entry)
    n = len(prompts)
    with torch.no_grad(), exact_4bit(model):
        hidden = backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        scored = comp[:, 1:].bool().to(hidden.device)
        h = hidden[:, :-1][scored]
        values, _ = _head_logps(h, ids[:, 1:].to(hidden.device)[scored], head, config)
        counts = scored.sum(dim=1).tolist()
        logits_of = head_logits(head, config)
        budget = max(1, LOGIT_BYTES // (4 * vocab))  # positions of float32 logits per chunk
        records: list[Record] = []
        start, i = 0, 0
        while i < 2 * n:  # chunks of whole rows: a sampled row's draws are one call on all its positions
            j, size = i + 1, counts[i]
            while j < 2 * n and size + counts[j] <= budget:
                size += counts[j]
                j += 1
            logits = logits_of(h[start:start + size]).detach().float().cpu().numpy() if size else None
            offset = 0
            for r in range(i, j):
                if counts[r]:
                    records.append(record(logits[offset:offset + counts[r]], stream(rows[r % n], r // n)))
                else:
                    records.append(empty_record(entry))
                offset += counts[r]
            start += size
            i = j
    pieces = torch.split(values.detach().cpu(), counts)
    return list(pieces[:n]), list(pieces[n:]), records[:n], records[n:]


def compare_records(store: Any, rows: list[int], records: dict[str, list[Record]]) -> list[str]:
    """`verify --model`'s check of the stored teacher records of `rows` against recomputed ones (`records`).

    Top-k: at each position the stored and recomputed log-probs, both sorted, agree within the codec's bound
    plus 1e-3 nats (ties may order ids either way), the tail log-mass too, and every token the model clearly
    ranks in the K (above the K-th value by more than that tolerance) is among the stored ids. Sampled: the
    draws, which depend on (seed, row, side) and the logits only, are the same."""
    from logitstore import topk_codec as C

    entry = store.teacher
    tol = (C.PRESETS[entry["codec"]].step / 2 if entry["kind"] == "top_k" else 0.0) + 1e-3
    problems = []
    for side in ("chosen", "rejected"):
        stored = store.top_k(side, rows)
        for i, row in enumerate(rows):
            new = records[side][i]
            what = f"example {store.id_of(row)!r}: {side} teacher records"
            if entry["kind"] == "top_k":
                got, want = stored["logps"][i].astype(np.float64), new.logps.astype(np.float64)
                if got.shape != want.shape or np.any(np.abs(got - want) > tol):
                    problems.append(f"{what} differ from the recomputed log-probs (tolerance {tol:.4g} nats)")
                    continue
                tails = stored["tail_logp"][i].astype(np.float64), new.tail_logp.astype(np.float64)
                finite = np.isfinite(tails[1])
                if np.any(np.isfinite(tails[0]) != finite) or np.any(np.abs(tails[0] - tails[1])[finite] > tol):
                    problems.append(f"{what}: the tail log-mass differs from the recomputed one")
                    continue
                clear = new.logps > new.logps[:, -1:] + tol
                if any(not np.isin(new.ids[t][clear[t]], stored["ids"][i][t]).all() for t in range(len(new.ids))):
                    problems.append(f"{what}: a token the model ranks in the top {entry['k']} is not stored")
            elif not (np.array_equal(stored["ids"][i], new.ids) and np.array_equal(stored["counts"][i], new.counts)):
                problems.append(f"{what}: the draws differ from those the seed gives")
    return problems
