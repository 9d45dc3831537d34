"""Benchmark inputs: real preference pairs with realistic reference log-probs.

Text: hh-rlhf harmless-base test pairs from ../shared/data when present (the bundled medical pairs otherwise),
tokenized with the Mistral-7B v0.1 tokenizer exactly as a build would (TRL 1.16 rules, max_length 1024).

Log-probs: held-out log-probs of a real (if small) language model, not noise: an interpolated bigram/unigram model
of Mistral tokens fitted on the first two thirds of the pairs and evaluated on every pair. Its values have the
heavy-tailed shape of LM log-probs (many tokens near 0, a long tail to -20 nats), which is what decides how
they compress.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# the shared data folder beside the checkout; LOGITSTORE_SHARED_DATA names another (a worktree lives elsewhere)
HH = (Path(os.environ.get("LOGITSTORE_SHARED_DATA", ROOT.parent / "shared" / "data"))
      / "hh-rlhf-harmless-base-test-first1500.jsonl.gz")
MEDICAL = ROOT / "dpo" / "data" / "medical_pairs.jsonl"


@dataclasses.dataclass
class Corpus:
    source: str
    ids: list[str]
    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    chosen_logps: list[np.ndarray]
    rejected_logps: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self) -> int:
        return int(sum(len(p) + len(c) + len(r) for p, c, r in zip(self.prompt, self.chosen, self.rejected)))

    def scored_tokens(self) -> int:
        return int(sum(len(c) + len(r) for c, r in zip(self.chosen_logps, self.rejected_logps)))

    def shard(self, rows: range) -> dict:
        out: dict = {
            "prompt_ids": [self.prompt[i] for i in rows], "chosen_ids": [self.chosen[i] for i in rows],
            "rejected_ids": [self.rejected[i] for i in rows],
            "chosen_token_logps": [self.chosen_logps[i] for i in rows],
            "rejected_token_logps": [self.rejected_logps[i] for i in rows],
        }
        for side in ("chosen", "rejected"):
            values = out[f"{side}_token_logps"]
            out[f"{side}_logps"] = [v.sum(dtype=np.float64) for v in values]
            out[f"{side}_tokens"] = [len(v) for v in values]
        return out


@functools.lru_cache(maxsize=1)
def mistral_tokenizer():
    """Mistral-7B v0.1's tokenizer, as mistral-common ships it, saved and loaded back as a transformers folder would
    hold it (the folder is gone once it is loaded). Shared: do not change it."""
    import mistral_common
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory(prefix="mistral-tok-") as folder:
        source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        shutil.copy(source, Path(folder) / "tokenizer.model")
        LlamaTokenizer.from_pretrained(folder).save_pretrained(folder)
        return LlamaTokenizer.from_pretrained(folder)


def raw_pairs(limit: int) -> tuple[str, list[dict]]:
    if HH.exists():
        with gzip.open(HH, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:limit]
        return "hh-rlhf harmless-base test (first pairs)", rows
    rows = [json.loads(line) for line in MEDICAL.read_text().splitlines()]
    return "bundled medical pairs (hh-rlhf not found)", (rows * (1 + limit // len(rows)))[:limit]


def bigram_logps(train: list[np.ndarray], sequences: list[tuple[np.ndarray, np.ndarray]], vocab: int
                 ) -> list[np.ndarray]:
    """Log-probs of each completion token given the previous token, under an interpolated bigram model."""
    flat = np.concatenate(train)
    unigram = np.bincount(flat, minlength=vocab).astype(np.float64) + 0.1
    unigram /= unigram.sum()
    pairs = np.concatenate([t[:-1].astype(np.int64) * vocab + t[1:] for t in train if len(t) > 1])
    keys, counts = np.unique(pairs, return_counts=True)
    context = np.bincount(keys // vocab, weights=counts, minlength=vocab)
    out = []
    for prev_tokens, tokens in sequences:
        prev, cur = prev_tokens.astype(np.int64), tokens.astype(np.int64)
        pos = np.searchsorted(keys, prev * vocab + cur)
        pos = np.minimum(pos, keys.size - 1)
        bigram = np.where(keys[pos] == prev * vocab + cur, counts[pos], 0)
        lam = context[prev] / (context[prev] + 5.0)
        p = lam * bigram / np.maximum(context[prev], 1) + (1 - lam) * unigram[cur]
        out.append(np.log(p).astype(np.float32))
    return out


@functools.lru_cache(maxsize=4)
def load_corpus(limit: int = 1500, max_length: int = 1024) -> Corpus:
    from logitstore.dpo.inputs.pairs import PreferenceExample, content_id
    from logitstore.dpo.inputs.tokenization import tokenize_pair

    source, rows = raw_pairs(limit)
    tokenizer = mistral_tokenizer()
    ids, prompt, chosen, rejected = [], [], [], []
    for i, row in enumerate(rows):
        key = row.get("id") or f"{i}-{content_id(row.get('prompt'), row['chosen'], row['rejected'])}"
        try:
            pair = tokenize_pair(tokenizer, PreferenceExample(key, row.get("prompt"), row["chosen"], row["rejected"],
                                                              i + 1), max_length)
        except ValueError:
            continue
        ids.append(key)
        prompt.append(pair.prompt_ids.astype(np.uint16))
        chosen.append(pair.chosen_ids.astype(np.uint16))
        rejected.append(pair.rejected_ids.astype(np.uint16))
    fit = [np.concatenate([p, c]) for p, c in zip(prompt, chosen)][: 2 * len(ids) // 3]
    def scored(p, c):  # each completion token with the token before it
        return np.concatenate([p[-1:], c[:-1]]), c
    vocab = len(tokenizer)
    return Corpus(source, ids, prompt, chosen, rejected,
                  bigram_logps(fit, [scored(p, c) for p, c in zip(prompt, chosen)], vocab),
                  bigram_logps(fit, [scored(p, r) for p, r in zip(prompt, rejected)], vocab))


def write_store(corpus: Corpus, path: Path, *, rows_per_shard: int = 256, **kw) -> Path:
    import logitstore

    writer = logitstore.create(path, corpus.ids, fingerprint={"benchmark": corpus.source}, vocab_size=32000,
                               max_length=1024, rows_per_shard=rows_per_shard, per_token=True, **kw)
    for shard in writer.missing_shards:
        writer.write_shard(shard, corpus.shard(writer.shard_rows(shard)))
    writer.finalize()
    return path
