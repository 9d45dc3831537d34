"""Teacher distributions: bytes per token against fidelity, for top-k and sampled records.

Teacher: the interpolated bigram/unigram model of ``corpus.py`` (the one whose log-probs every other benchmark
stores), whose full next-token distribution over Mistral's 32,000 tokens is known at every position. Student: the
same kind of model fitted on half as much text with 10x the smoothing, so that it is a plausible mid-training
student rather than the teacher itself.

For each record kind and size it measures, over the completion positions (chosen and rejected) of the first pairs:

- **bytes/token**: the encoded streams (``logitstore.topk_codec``), compressed per block of positions as a store's
  shard would be; the vocabulary order, stored once per store, is reported apart (and amortizes to nothing over a
  real data set).
- **KL**: mean per-position KL(teacher || reconstruction), the tail mass spread evenly over the tokens left out
  (``teacher.reconstruct``); sampled records are not distributions (their use is an unbiased gradient), so none.
- **loss / full loss**: the record's forward-KL loss (top-k: over K + 1 buckets, a lower bound; sampled: KL of the
  draws' frequencies, not an estimate of the loss's value) over the full-logit loss: the K < V bias of the value.
- **grad cosine**: cosine between the forward-KL distillation gradient in the student's logits from the record
  (``dpo.distill``: top-k plus tail bucket, or the sampled estimator) and from the full teacher, over all positions.

``--teacher transformer`` swaps the teacher for a tiny Mistral trained for a few seeded steps on the same text
(CPU minutes): weak, but a contextual softmax model, whose top-k lists vary from position to position far more
than the bigram's (whose unseen contexts all fall back to the same unigram order).

Run: ``python benchmarks/topk.py [--pairs N] [--teacher bigram|transformer] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import load_corpus  # noqa: E402

VOCAB = 32000
BLOCK = 1024  # positions per compressed block (a store shard holds about this many or more)
TOP_K = (1, 8, 32, 64, 128)
SAMPLE_K = (4, 12, 32)
# Published figures the issue quotes (not measured here): bytes/token at k = 50 and 128.
OTHERS = [("DistillKit top-50 (published)", 114), ("DistillKit top-128 (published)", 300),
          ("Megatron-LM top-128, fp16 + 17-bit ids (published, before compression)", 640)]


class Bigram:
    """An interpolated bigram/unigram model with every next-token distribution available (corpus.py's formula)."""

    def __init__(self, train: list[np.ndarray], vocab: int, smoothing: float = 5.0):
        flat = np.concatenate(train)
        self.vocab, self.smoothing = vocab, smoothing
        unigram = np.bincount(flat, minlength=vocab).astype(np.float64) + 0.1
        self.unigram = unigram / unigram.sum()
        pairs = np.concatenate([t[:-1].astype(np.int64) * vocab + t[1:] for t in train if len(t) > 1])
        self.keys, self.counts = np.unique(pairs, return_counts=True)
        self.context = np.bincount(self.keys // vocab, weights=self.counts, minlength=vocab)

    def logps(self, prev: np.ndarray) -> np.ndarray:
        """[n, V] log-probs of the next token after each of `prev`."""
        prev = prev.astype(np.int64)
        ctx = self.context[prev]
        lam = ctx / (ctx + self.smoothing)
        p = np.outer(1 - lam, self.unigram)
        lo = np.searchsorted(self.keys, prev * self.vocab)
        hi = np.searchsorted(self.keys, (prev + 1) * self.vocab)
        for i in range(prev.size):
            cur = self.keys[lo[i]:hi[i]] % self.vocab
            p[i, cur] += lam[i] * self.counts[lo[i]:hi[i]] / ctx[i]
        return np.log(p)


class TinyLM:
    """A 2-layer Mistral (hidden 64, tied embeddings) trained for `steps` seeded steps on the teacher's fit text: a
    weak but genuinely contextual softmax teacher, whose top-k lists vary from context to context."""

    def __init__(self, train: list[np.ndarray], vocab: int, steps: int = 150, seed: int = 0):
        import torch
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(seed)
        config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                               tie_word_embeddings=True)
        self.model = MistralForCausalLM(config)
        opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        rng = np.random.default_rng(seed)
        long = [t.astype(np.int64) for t in train if len(t) > 129]
        self.losses = []
        for _ in range(steps):
            crops = []
            for _ in range(16):
                t = long[rng.integers(len(long))]
                o = rng.integers(len(t) - 129)
                crops.append(t[o:o + 129])
            x = torch.from_numpy(np.stack(crops))
            loss = self.model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.losses.append(float(loss.detach()))
        self.model.eval()

    def logps(self, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
        """[len(completion), V] log-probs of each completion token's position (prompt cut to its last 256 tokens)."""
        import torch

        prompt = prompt[-256:]
        x = torch.from_numpy(np.concatenate([prompt, completion]).astype(np.int64))[None]
        with torch.no_grad():
            logits = self.model(input_ids=x).logits[0, len(prompt) - 1:-1]
        return torch.log_softmax(logits.double(), -1).numpy()


def positions(corpus, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous token, token) of every completion position, chosen then rejected, of the first `pairs` pairs."""
    prev, cur = [], []
    for i in range(min(pairs, len(corpus))):
        for side in (corpus.chosen[i], corpus.rejected[i]):
            prev.append(np.concatenate([corpus.prompt[i][-1:], side[:-1]]))
            cur.append(side)
    return np.concatenate(prev).astype(np.int64), np.concatenate(cur).astype(np.int64)


def run(pairs: int = 60, codecs=("exact", "fine", "standard", "compact"), teacher_kind: str = "bigram",
        lm_steps: int = 150) -> dict:
    import torch

    from logitstore import teacher as T
    from logitstore import topk_codec as C
    from logitstore.dpo.distill import full_divergence, sampled_divergence, top_k_divergence

    corpus = load_corpus(1500)
    fit = [np.concatenate([p, c]) for p, c in zip(corpus.prompt, corpus.chosen)]
    teacher = Bigram(fit[: 2 * len(fit) // 3], VOCAB)
    student = Bigram(fit[: len(fit) // 3], VOCAB, smoothing=50.0)
    prev, cur = positions(corpus, pairs)
    # the teacher is corpus.py's model: its log-prob of the token that was there is the stored one
    m = len(corpus.chosen[0])  # positions() starts with pair 0's chosen side
    assert np.allclose(teacher.logps(prev[:m])[np.arange(m), cur[:m]], corpus.chosen_logps[0], atol=1e-5)
    lm = None
    if teacher_kind == "transformer":
        lm = TinyLM(fit[: 2 * len(fit) // 3], VOCAB, steps=lm_steps)
        lm_logps = np.concatenate([lm.logps(corpus.prompt[i], side) for i in range(min(pairs, len(corpus)))
                                   for side in (corpus.chosen[i], corpus.rejected[i])])

    configs = [("top", k, c) for k in TOP_K for c in codecs] + [("sample", k, "-") for k in SAMPLE_K]
    acc = {cfg: {"bytes": 0, "kl": 0.0, "dot": 0.0, "norm_rec": 0.0, "loss": 0.0, "streams": {}} for cfg in configs}
    full_loss = 0.0
    orders: dict = {}
    norm_full = 0.0
    started = time.perf_counter()
    for start in range(0, prev.size, BLOCK):
        t_logps = teacher.logps(prev[start:start + BLOCK]) if lm is None else lm_logps[start:start + BLOCK]
        s_logits = torch.from_numpy(student.logps(prev[start:start + BLOCK])).float().requires_grad_()
        t_logits = torch.from_numpy(t_logps).float()
        full = full_divergence(s_logits, t_logits, 0.0).sum()
        full_grad, = torch.autograd.grad(full, s_logits)
        full_loss += float(full.detach())
        norm_full += float((full_grad ** 2).sum())
        n = t_logps.shape[0]
        for k in TOP_K:
            rec = T.top_k(t_logps, k)
            orders.setdefault(("top", k), C.vocab_order(rec.ids, VOCAB))  # built from the first block, kept
            for codec in codecs:
                enc = C.encode_top_k(rec, orders[("top", k)], codec)
                back = C.decode_top_k(enc.streams, n, k, orders[("top", k)], codec)
                a = acc[("top", k, codec)]
                a["bytes"] += enc.nbytes
                for name, blob in enc.streams.items():
                    a["streams"][name] = a["streams"].get(name, 0) + len(blob)
                a["kl"] += float(T.reconstruction_kl(t_logps, back).sum())
                ids = torch.from_numpy(back.ids).long()
                loss = top_k_divergence(s_logits, ids, torch.from_numpy(back.logps),
                                        torch.from_numpy(back.tail_logp), 0.0).sum()
                grad, = torch.autograd.grad(loss, s_logits)
                a["loss"] += float(loss.detach())
                a["dot"] += float((grad * full_grad).sum())
                a["norm_rec"] += float((grad ** 2).sum())
        for k in SAMPLE_K:
            rec = T.sample(t_logps, k, seed=0, stream=start)
            orders.setdefault(("sample", k), C.vocab_order(rec.ids[rec.counts > 0], VOCAB))
            enc = C.encode_sampled(rec, orders[("sample", k)])
            back = C.decode_sampled(enc.streams, n, k, orders[("sample", k)])
            assert np.array_equal(back.counts, rec.counts)
            a = acc[("sample", k, "-")]
            a["bytes"] += enc.nbytes
            for name, blob in enc.streams.items():
                a["streams"][name] = a["streams"].get(name, 0) + len(blob)
            loss = sampled_divergence(s_logits, torch.from_numpy(back.ids).long(),
                                      torch.from_numpy(back.counts.astype(np.int64))).sum()
            grad, = torch.autograd.grad(loss, s_logits)
            a["loss"] += float(loss.detach())
            a["dot"] += float((grad * full_grad).sum())
            a["norm_rec"] += float((grad ** 2).sum())
    tokens = int(prev.size)
    rows = []
    for (kind, k, codec), a in acc.items():
        order_bytes = len(C.encode_order(orders[(kind, k)]))
        rows.append({"kind": kind, "k": k, "codec": codec, "bytes_per_token": a["bytes"] / tokens,
                     "order_bytes": order_bytes,
                     "stream_bytes_per_token": {k: v / tokens for k, v in a["streams"].items()},
                     "kl": a["kl"] / tokens if kind == "top" else None,
                     "grad_cosine": a["dot"] / np.sqrt(a["norm_rec"] * norm_full),
                     "loss_ratio": a["loss"] / full_loss})  # the record's forward-KL loss over the full one
    name = ("interpolated bigram/unigram of benchmarks/corpus.py" if lm is None else
            f"2-layer Mistral (hidden 64) trained {lm_steps} steps on the bigram's fit text, final training loss "
            f"{np.mean(lm.losses[-10:]):.2f} nats")
    return {"teacher": name + ", Mistral tokenizer (V = 32000)",
            "source": corpus.source, "pairs": min(pairs, len(corpus)), "positions": tokens, "block": BLOCK,
            "seconds": time.perf_counter() - started, "rows": rows}


def table(result: dict) -> str:
    lines = ["| record | codec | bytes/token | KL(teacher ‖ reconstruction), nats | KD-gradient cosine "
             "| loss / full loss |", "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = f"top-{r['k']}" if r["kind"] == "top" else f"sampled K={r['k']}"
        kl = f"{r['kl']:.2e}" if r["kl"] is not None else "n/a (estimator)"
        lines.append(f"| {name} | {r['codec']} | {r['bytes_per_token']:.1f} | {kl} | {r['grad_cosine']:.4f} "
                     f"| {r['loss_ratio']:.4f} |")
    for name, b in OTHERS:
        lines.append(f"| {name} | | {b} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--teacher", choices=("bigram", "transformer"), default="bigram")
    parser.add_argument("--lm-steps", type=int, default=150)
    args = parser.parse_args()
    result = run(args.pairs, teacher_kind=args.teacher, lm_steps=args.lm_steps)
    print(f"teacher: {result['teacher']}")
    print(f"{result['positions']} positions of {result['pairs']} pairs ({result['source']}); "
          f"{result['seconds']:.0f} s")
    print(table(result))
    for r in result["rows"]:
        if r["kind"] == "top" and r["codec"] == "exact" or r["kind"] == "sample":
            print(f"vocabulary order, {r['kind']} {r['k']}: {r['order_bytes']} bytes once per store")
    for r in result["rows"]:
        split = ", ".join(f"{name} {b:.1f}" for name, b in r["stream_bytes_per_token"].items())
        print(f"bytes/token by stream, {r['kind']} {r['k']} {r['codec']}: {split}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
