"""Teacher distributions: bytes per token against fidelity, for top-k and sampled records.

Teacher: the interpolated bigram/unigram model of ``corpus.py`` (the one whose log-probs every other benchmark
stores), whose full next-token distribution over Mistral's 32,000 tokens is known at every position. Student: the
same kind of model fitted on half as much text with 10x the smoothing, so that it is a plausible mid-training
student rather than the teacher itself.

For each record kind and size it measures, over the completion positions (chosen and rejected) of the first pairs,
handled as one shard of a store would be (pass 1: records and the teacher's tail mass; the shard context, i.e.
vocabulary order and prior, from them; pass 2: blocks of ``teacher_blocks`` written and read back):

- **bytes/token**: the blocks (``logitstore.teacher_blocks``, header included), and with the shard context
  (``topk_codec.encode_order``) added, amortized over a realistic shard of 2^18 positions and over the benchmark's
  own positions.
- **KL**: mean per-position KL(teacher || reconstruction) for both reconstructions (``teacher.reconstruct``): the tail
  mass spread evenly over the tokens left out, and spread in proportion to the shard's prior; sampled records are
  not distributions (their use is an unbiased gradient), so none.
- **loss / full loss**: the record's forward-KL loss (top-k: over K + 1 buckets, a lower bound; sampled: KL of the
  draws' frequencies, not an estimate of the loss's value) over the full-logit loss: the K < V bias of the value.
- **grad cosine**: cosine between the forward-KL distillation gradient in the student's logits from the record
  (``dpo.distill``: top-k plus tail bucket, or the sampled estimator) and from the full teacher, over all positions
  (the tail is one bucket: the prior does not enter).
- **decode positions/s**: ``teacher_blocks.decode_block`` alone (wall time: noisy on a shared machine).

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
TOP_K = (1, 4, 8, 16, 32, 64, 128)
SAMPLE_K = (4, 12, 32)
CODECS = ("exact", "fine", "standard", "compact", "sqrt", "sqrt-compact")
SHARD_POSITIONS = 1 << 18  # a realistic shard, over which the per-shard context is amortized
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
        long = long or [np.concatenate(train).astype(np.int64)]  # short texts only (the bundled pairs): one stream
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


def run(pairs: int = 60, codecs=CODECS, teacher_kind: str = "bigram", lm_steps: int = 150,
        top_k=TOP_K, sample_k=SAMPLE_K) -> dict:
    import torch

    from logitstore import teacher as T
    from logitstore import teacher_blocks as B
    from logitstore import topk_codec as C
    from logitstore.dpo.objectives.distill import full_divergence, sampled_divergence, top_k_divergence

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

    def teacher_block(start: int) -> np.ndarray:
        return teacher.logps(prev[start:start + BLOCK]) if lm is None else lm_logps[start:start + BLOCK]

    # pass 1, as a build does over a shard: the records, and the tail mass that the shard's prior is made of
    records = {("top", k): [] for k in top_k} | {("sample", k): [] for k in sample_k}
    mass = {k: np.zeros(VOCAB) for k in top_k}
    for start in range(0, prev.size, BLOCK):
        t_logps = teacher_block(start)
        for k in top_k:
            rec = T.top_k(t_logps, k)
            records[("top", k)].append(rec)
            mass[k] += T.tail_mass(t_logps, rec.ids)
        for k in sample_k:
            records[("sample", k)].append(T.sample(t_logps, k, seed=0, stream=start))
    contexts = {}
    for (kind, k), recs in records.items():
        ids = np.concatenate([r.ids if kind == "top" else r.ids[r.counts > 0] for r in recs])
        contexts[(kind, k)] = C.vocab_order(ids, VOCAB, tail_mass=mass[k] if kind == "top" else None)

    # pass 2: blocks written and read back as a store would, then fidelity against the full teacher
    configs = [("top", k, c) for k in top_k for c in codecs] + [("sample", k, "-") for k in sample_k]
    acc = {cfg: {"bytes": 0, "kl": 0.0, "kl_prior": 0.0, "dot": 0.0, "norm_rec": 0.0, "loss": 0.0, "streams": {},
                 "decode_s": 0.0} for cfg in configs}
    full_loss = 0.0
    norm_full = 0.0
    started = time.perf_counter()
    for b, start in enumerate(range(0, prev.size, BLOCK)):
        t_logps = teacher_block(start)
        s_logits = torch.from_numpy(student.logps(prev[start:start + BLOCK])).float().requires_grad_()
        t_logits = torch.from_numpy(t_logps).float()
        full = full_divergence(s_logits, t_logits, 0.0).sum()
        full_grad, = torch.autograd.grad(full, s_logits)
        full_loss += float(full.detach())
        norm_full += float((full_grad ** 2).sum())
        n = t_logps.shape[0]
        for kind, k, codec in configs:
            rec, ctx, a = records[(kind, k)][b], contexts[(kind, k)], acc[(kind, k, codec)]
            (block,) = B.encode_blocks(rec, ctx, codec if kind == "top" else "standard", positions=n)
            t0 = time.perf_counter()
            back = B.decode_block(block, kind="top_k" if kind == "top" else "sampled", k=k, positions=n, order=ctx,
                                  codec=codec if kind == "top" else "standard")
            a["decode_s"] += time.perf_counter() - t0
            a["bytes"] += len(block)
            sizes = C.encode_top_k(rec, ctx, codec) if kind == "top" else C.encode_sampled(rec, ctx)
            for name, blob in sizes.streams.items():
                a["streams"][name] = a["streams"].get(name, 0) + len(blob)
            if kind == "top":
                a["kl"] += float(T.reconstruction_kl(t_logps, back).sum())
                a["kl_prior"] += float(T.reconstruction_kl(t_logps, back, ctx.log_prior).sum())
                loss = top_k_divergence(s_logits, torch.from_numpy(back.ids).long(), torch.from_numpy(back.logps),
                                        torch.from_numpy(back.tail_logp), 0.0).sum()
            else:
                assert np.array_equal(back.counts, rec.counts)
                loss = sampled_divergence(s_logits, torch.from_numpy(back.ids).long(),
                                          torch.from_numpy(back.counts.astype(np.int64))).sum()
            grad, = torch.autograd.grad(loss, s_logits)
            a["loss"] += float(loss.detach())
            a["dot"] += float((grad * full_grad).sum())
            a["norm_rec"] += float((grad ** 2).sum())
    tokens = int(prev.size)
    rows = []
    for (kind, k, codec), a in acc.items():
        context_bytes = len(C.encode_order(contexts[(kind, k)]))
        rows.append({"kind": kind, "k": k, "codec": codec, "bytes_per_token": a["bytes"] / tokens,
                     "context_bytes": context_bytes,
                     # all bytes counted: the blocks plus the shard context, over these positions and over a
                     # realistic shard of 2^18 positions (same records per token)
                     "bytes_per_token_here": (a["bytes"] + context_bytes) / tokens,
                     "bytes_per_token_shard": a["bytes"] / tokens + context_bytes / SHARD_POSITIONS,
                     "stream_bytes_per_token": {k: v / tokens for k, v in a["streams"].items()},
                     "kl": a["kl"] / tokens if kind == "top" else None,
                     "kl_prior": a["kl_prior"] / tokens if kind == "top" else None,
                     "grad_cosine": a["dot"] / np.sqrt(a["norm_rec"] * norm_full),
                     "loss_ratio": a["loss"] / full_loss,  # the record's forward-KL loss over the full one
                     "decode_positions_per_s": tokens / a["decode_s"]})
    name = ("interpolated bigram/unigram of benchmarks/corpus.py" if lm is None else
            f"2-layer Mistral (hidden 64) trained {lm_steps} steps on the bigram's fit text, final training loss "
            f"{np.mean(lm.losses[-10:]):.2f} nats")
    return {"teacher": name + ", Mistral tokenizer (V = 32000)",
            "source": corpus.source, "pairs": min(pairs, len(corpus)), "positions": tokens, "block": BLOCK,
            "shard_positions": SHARD_POSITIONS, "seconds": time.perf_counter() - started, "rows": rows}


def goal(result: dict) -> dict | None:
    """The fewest bytes (all counted, context over a 2^18-position shard) at the float32 top-128 record's KL with
    the even spread (DistillKit's k = 128 fidelity), with either reconstruction."""
    rows = {(r["kind"], r["k"], r["codec"]): r for r in result["rows"]}
    ref = rows.get(("top", 128, "exact"))
    if ref is None:
        return None
    fits = [(r["bytes_per_token_shard"], r) for r in result["rows"] if r["kind"] == "top"
            and min(r["kl"], r["kl_prior"]) <= ref["kl"]]
    best = min(fits, key=lambda f: f[0])[1] if fits else None
    return {"reference_kl": ref["kl"], "best": best}


def table(result: dict) -> str:
    lines = ["| record | codec | bytes/token (blocks) | + context, over 2^18 positions | + context, over these "
             "| KL even spread, nats | KL prior spread, nats | KD-gradient cosine | loss / full loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = f"top-{r['k']}" if r["kind"] == "top" else f"sampled K={r['k']}"
        kl = f"{r['kl']:.3f}" if r["kl"] is not None else "n/a (estimator)"
        kl_prior = f"{r['kl_prior']:.3f}" if r["kl_prior"] is not None else ""
        lines.append(f"| {name} | {r['codec']} | {r['bytes_per_token']:.1f} | {r['bytes_per_token_shard']:.1f} "
                     f"| {r['bytes_per_token_here']:.1f} | {kl} | {kl_prior} | {r['grad_cosine']:.4f} "
                     f"| {r['loss_ratio']:.4f} |")
    for name, b in OTHERS:
        lines.append(f"| {name} | | {b} | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--teacher", choices=("bigram", "transformer"), default="bigram")
    parser.add_argument("--lm-steps", type=int, default=150)
    args = parser.parse_args()
    result = run(args.pairs, teacher_kind=args.teacher, lm_steps=args.lm_steps)
    result["goal"] = goal(result)
    print(f"teacher: {result['teacher']}")
    print(f"{result['positions']} positions of {result['pairs']} pairs ({result['source']}); "
          f"{result['seconds']:.0f} s")
    print(table(result))
    for r in result["rows"]:
        if r["codec"] in ("exact", "-"):
            print(f"context, {r['kind']} {r['k']}: {r['context_bytes']} bytes once per shard")
    for r in result["rows"]:
        split = ", ".join(f"{name} {b:.1f}" for name, b in r["stream_bytes_per_token"].items())
        print(f"bytes/token by stream, {r['kind']} {r['k']} {r['codec']}: {split}; "
              f"decode {r['decode_positions_per_s']:,.0f} positions/s")
    g = result["goal"]
    if g and g["best"]:
        b = g["best"]
        print(f"goal: fewest bytes at KL <= {g['reference_kl']:.3f} (float32 top-128, even spread): top-{b['k']} "
              f"{b['codec']}, {b['bytes_per_token_shard']:.1f} B/token over a 2^18-position shard "
              f"({b['bytes_per_token_here']:.1f} over these positions), KL {b['kl_prior']:.3f} with the prior, "
              f"{b['kl']:.3f} even")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
