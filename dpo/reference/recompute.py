"""`logitstore verify --model --data`: recompute a random sample of a store's rows with the model and data it was
built from, in the precision and tokenization the store records, and list every disagreement."""

from __future__ import annotations

from typing import Any

import numpy as np

from logitstore import format as fmt

from .. import kinds
from ..config import BuildConfig
from ..inputs.tokenization import TokenizedPair
from ..model.loading import load_model, load_tokenizer, precision
from .scoring import score_rows


def recompute_sample(store: Any, model: str, data: str, *, adapter: str | None = None, revision: str | None = None,
                     adapter_revision: str | None = None, sample: int = 16, seed: int = 0,
                     tolerance: float = 1e-3) -> list[str]:
    """Recompute a random sample of a store's rows with `model` (plus `adapter`) on `data`; return the
    disagreements: token ids, each side's sum (within `tolerance` nats), and teacher records. What the data must
    also agree on first is the kind's (an unpaired store's order and labels, which its KL pairing follows)."""
    recorded = store.fingerprint.get("precision", {})
    tokenization = store.fingerprint.get("tokenization", {})
    cfg = BuildConfig(model=model, data=data, out=store.location.url, adapter=adapter, revision=revision,
                      adapter_revision=adapter_revision, dtype=recorded.get("dtype", "float32"),
                      quantize=recorded.get("quantize"), max_prompt_length=tokenization.get("max_prompt_length"),
                      max_length=store.header["max_length"], kl_batch_size=store.kl_batch_size or 2)
    kind = kinds.of_store(store)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    lookup, problems = kind.sample_source(store, cfg, tokenizer)
    if problems:
        return problems
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), size=min(sample, len(store)), replace=False))
    sampled: list[tuple[int, TokenizedPair]] = []
    for row in rows.tolist():
        key = store.id_of(row)
        tokenized = lookup(key)
        if tokenized is None:
            problems.append(f"example {key!r} is not in {cfg.data}")
            continue
        for field, attr in zip(kind.fields.token_fields, fmt.TOKEN_FIELDS):
            if not np.array_equal(store.ragged(field, [row])[0], getattr(tokenized, attr)):
                problems.append(f"example {key!r}: stored {field} differ from the tokenized data")
        sampled.append((row, tokenized))
    if not sampled:
        return problems
    return problems + compare_sample(store, kind, cfg, tokenizer, sampled, tolerance)


def compare_sample(store: Any, kind: kinds.StoreKind, cfg: BuildConfig, tokenizer: Any,
                   sampled: list[tuple[int, TokenizedPair]], tolerance: float) -> list[str]:
    """Score the sampled rows with the model and compare each side's sum and the teacher records with the store's."""
    import torch

    problems: list[str] = []
    reference = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device=cfg.device, adapter=cfg.adapter,
                           revision=cfg.revision, adapter_revision=cfg.adapter_revision,
                           attn_implementation=cfg.attn_implementation)
    reference.eval()
    rows = [r for r, _ in sampled]
    with torch.no_grad(), precision(next(reference.parameters()).device, cfg.dtype):
        values, records = score_rows(reference, [t for _, t in sampled], sides=len(kind.sides),
                                     pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size,
                                     batch_tokens=cfg.batch_tokens, share_prompt=False, teacher=store.teacher,
                                     store_rows=rows)
    if records is not None:
        from .teacher import compare_records

        problems += compare_records(store, rows, dict(zip(kind.teacher_sides, records)))
    stored = store.row_values(rows)
    for i, row in enumerate(rows):
        for name, side, side_values in zip(kind.sides, kind.fields.sides, values):
            got, want = float(side_values[i].sum(dtype=np.float64)), float(stored[side.logps][i])
            if abs(got - want) > tolerance:
                problems.append(f"example {store.id_of(row)!r}: {name} log-prob {want:.5f} stored, {got:.5f} "
                                f"recomputed (tolerance {tolerance})")
    return problems
