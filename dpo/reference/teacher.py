"""The reference pass's teacher records: the model's distribution at every scored completion position, reduced to a
top-k or sampled record (logitstore/teacher.py) while the per-token values are computed.

What a build checks before any model work (:func:`teacher_entry`): one of --top-k / --sample-k, K that the
vocabulary and the codec can hold, and a data kind and options that records can be taken with. The scoring itself
(:func:`sides_logps_teacher`) runs one forward pass per batch like ``sides_logps``: the per-token values come from
the same ``head_logps`` call (so they equal a build without records bit for bit), and the records from the LM
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

Record = T.TopK | T.Sampled


def model_vocab(model: str, revision: str | None = None) -> int:
    """The width of the model's logits, from its config (before any weights load)."""
    from transformers import AutoConfig

    from ..model.loading import model_source

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


MASS_SCALE = 2.0 ** 32  # tail mass is added up in integer units of 2^-32: the same sum in any order of rows


def new_mass(entry: dict[str, Any], sides: list[str]) -> dict[str, np.ndarray] | None:
    """A shard's tail-mass accumulators, one per side (top-k records only: sampled contexts have no prior)."""
    if entry["kind"] != "top_k":
        return None
    return {side: np.zeros(entry["vocab"], np.int64) for side in sides}


def mass_of(mass: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """The accumulators as `write_shard`'s `teacher_mass` (float64 [V] per teacher array)."""
    if mass is None:
        return None
    return {f"teacher/{side}": m.astype(np.float64) / MASS_SCALE for side, m in mass.items()}


def sides_logps_teacher(model: Any, prompts: list[Any], sides: list[list[Any]], pad_id: int, *,
                        entry: dict[str, Any], rows: list[int], mass: list[np.ndarray] | None = None,
                        ) -> tuple[list[list[Any]], list[list[Record]]]:
    """`sides_logps`' per-token values of each side, and each side's teacher record per row (`rows`: the
    examples' store rows, for the sampled records' streams). With `mass` (one accumulator per side,
    :func:`new_mass`), each top-k row's tail mass (``teacher.tail_mass``) is added to its side's: the shard's
    prior."""
    import torch

    from ..model.head import LOGIT_BYTES, head_logits, head_logps, split_lm
    from ..model.loading import input_device
    from ..model.scoring import exact_4bit, pad_sides

    device = input_device(model)
    batch = pad_sides(prompts, sides, pad_id)
    ids, attn, comp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
    backbone, head, config = split_lm(model)
    vocab = head.weight.shape[0]
    if vocab != entry["vocab"]:
        raise LogitstoreError(f"the model's LM head has {vocab} outputs, its config says {entry['vocab']} tokens")
    record = recorder(entry)
    n, total = len(prompts), len(sides) * len(prompts)
    with torch.no_grad(), exact_4bit(model):
        hidden = backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        scored = comp[:, 1:].bool().to(hidden.device)
        h = hidden[:, :-1][scored]
        values, _ = head_logps(h, ids[:, 1:].to(hidden.device)[scored], head, config)
        counts = scored.sum(dim=1).tolist()
        logits_of = head_logits(head, config)
        budget = max(1, LOGIT_BYTES // (4 * vocab))  # positions of float32 logits per chunk
        records: list[Record] = []
        start, i = 0, 0
        while i < total:  # chunks of whole rows: a sampled row's draws are one call on all its positions
            j, size = i + 1, counts[i]
            while j < total and size + counts[j] <= budget:
                size += counts[j]
                j += 1
            logits = logits_of(h[start:start + size]).detach().float().cpu().numpy() if size else None
            offset = 0
            for r in range(i, j):
                if counts[r]:
                    row_logits = logits[offset:offset + counts[r]]
                    records.append(record(row_logits, stream(rows[r % n], r // n)))
                    if mass is not None:  # added up in place
                        mass[r // n] += np.rint(T.tail_mass(row_logits, records[-1].ids) * MASS_SCALE).astype(np.int64)
                else:
                    records.append(empty_record(entry))
                offset += counts[r]
            start += size
            i = j
    pieces = torch.split(values.detach().cpu(), counts)
    return ([list(pieces[k * n:(k + 1) * n]) for k in range(len(sides))],
            [records[k * n:(k + 1) * n] for k in range(len(sides))])


def compare_records(store: Any, rows: list[int], records: dict[str, list[Record]]) -> list[str]:
    """`verify --model`'s check of the stored teacher records of `rows` against recomputed ones (`records`).

    Top-k: at each position the stored and recomputed values, both sorted, agree within the codec's bound plus
    1e-3 (ties may order ids either way): log-probs in nats for the log presets, sqrt(p) for the sqrt ones; the
    tail too; and every token the model clearly ranks in the K (above the K-th value by more than that
    tolerance) is among the stored ids. Sampled: the draws, which depend on (seed, row, side) and the logits
    only, are the same."""
    from logitstore import topk_codec as C

    entry = store.teacher
    preset = C.PRESETS[entry["codec"]] if entry["kind"] == "top_k" else None
    sqrt = preset is not None and preset.domain == "sqrt"
    tol = (preset.step / 2 if preset is not None else 0.0) + 1e-3

    def domain(logps: np.ndarray) -> np.ndarray:  # where the codec's bound holds
        x = logps.astype(np.float64)
        return np.exp(x / 2) if sqrt else x

    problems = []
    for side in records:  # chosen, rejected; or completion
        stored = store.top_k(side, rows)
        for i, row in enumerate(rows):
            new = records[side][i]
            what = f"example {store.id_of(row)!r}: {side} teacher records"
            if entry["kind"] == "top_k":
                got, want = domain(stored["logps"][i]), domain(new.logps)
                if got.shape != want.shape or np.any(np.abs(got - want) > tol):
                    unit = "in sqrt(p)" if sqrt else "nats"
                    problems.append(f"{what} differ from the recomputed log-probs (tolerance {tol:.4g} {unit})")
                    continue
                tails = domain(stored["tail_logp"][i]), domain(new.tail_logp)
                finite = np.isfinite(new.tail_logp)
                if np.any(np.isfinite(stored["tail_logp"][i]) != finite) or np.any(
                        np.abs(tails[0][finite] - tails[1][finite]) > tol):  # no tail (K = V): -inf on both sides
                    problems.append(f"{what}: the tail log-mass differs from the recomputed one")
                    continue
                clear = want > want[:, -1:] + tol
                if any(not np.isin(new.ids[t][clear[t]], stored["ids"][i][t]).all() for t in range(len(new.ids))):
                    problems.append(f"{what}: a token the model ranks in the top {entry['k']} is not stored")
            elif not (np.array_equal(stored["ids"][i], new.ids) and np.array_equal(stored["counts"][i], new.counts)):
                problems.append(f"{what}: the draws differ from those the seed gives")
    return problems
