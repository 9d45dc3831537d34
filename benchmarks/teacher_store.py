"""Teacher records end to end: `logitstore build --top-k / --sample-k` on a contextual teacher, what the store's
files take per position, what the build costs over one without records, and what reading them costs.

Teacher: ``topk.TinyLM`` (a 2-layer Mistral, hidden 64, trained a few seeded steps on the bigram's fit text, Mistral
tokenizer, V = 32,000), saved as a model folder and built from like any reference. Data: the first pairs of
hh-rlhf harmless-base test (corpus.py's source). Three builds of the same data, side by side in one process: no
records, ``--top-k 128`` (``sqrt``, the default preset, and ``standard``), ``--sample-k 12``; each with
``--per-token``.

Figures: the teacher files' bytes per scored position (everything in them: per shard and side the vocabulary order,
the block table and the blocks; compare with ``topk.py``'s block-codec figure, which leaves the order out), build
seconds (wall time; on a shared machine a ratio measured side by side, not a throughput), and ``store.top_k`` /
``make_loader(..., teacher=True)`` read cost with a cold and a warm block cache.

Run: ``python benchmarks/teacher_store.py [--pairs N] [--steps S] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import mistral_tokenizer, raw_pairs  # noqa: E402


def save_teacher(folder: Path, steps: int) -> float:
    """TinyLM trained on the bigram's fit text, saved with the Mistral tokenizer; returns its final loss."""
    from corpus import load_corpus
    from topk import VOCAB, TinyLM

    corpus = load_corpus(1500)
    fit = [np.concatenate([p, c]) for p, c in zip(corpus.prompt, corpus.chosen)]
    lm = TinyLM(fit[: 2 * len(fit) // 3], VOCAB, steps=steps)
    tokenizer = mistral_tokenizer()
    lm.model.config.pad_token_id = tokenizer.pad_token_id
    lm.model.config.eos_token_id = tokenizer.eos_token_id
    lm.model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return float(np.mean(lm.losses[-10:]))


def run(pairs: int = 40, steps: int = 150, max_length: int = 512) -> dict:
    import logitstore
    from logitstore.describe import teacher_summary
    from logitstore.dpo.reference import BuildConfig, build
    from logitstore.loader import make_loader

    work = Path(tempfile.mkdtemp(prefix="teacher-store-"))
    model = work / "teacher"
    loss = save_teacher(model, steps)
    source, rows = raw_pairs(pairs)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"hh-{i}", **r}) + "\n" for i, r in enumerate(rows)))
    builds = {"none": {}, "top-128 sqrt": {"top_k": 128, "topk_codec": "sqrt"},
              "top-128 standard": {"top_k": 128, "topk_codec": "standard"}, "sampled K=12": {"sample_k": 12, "seed": 0}}
    out: dict = {"teacher": f"2-layer Mistral (hidden 64) trained {steps} steps, final loss {loss:.2f} nats, "
                            "Mistral tokenizer (V = 32000)", "source": source, "pairs": pairs,
                 "max_length": max_length, "builds": {}}
    for name, extra in builds.items():
        path = work / name.replace(" ", "-")
        started = time.perf_counter()
        build(BuildConfig(model=str(model), data=str(data), out=str(path), max_length=max_length, device="cpu",
                          per_token=True, batch_size=8, **extra), progress=False)
        seconds = time.perf_counter() - started
        store = logitstore.open(path)
        entry: dict = {"seconds": seconds, "store_bytes": store.location.total_bytes()}
        summary = teacher_summary(store)
        if summary is not None:
            entry.update(teacher_bytes=summary["bytes"], positions=summary["positions"],
                         bytes_per_position=summary["bytes_per_position"])
            order_bytes = 0
            for key in sorted(path.glob("teacher/*/c/*")):
                head = key.read_bytes()[:24]
                order_bytes += int.from_bytes(head[20:24], "little") + 4 * int.from_bytes(head[16:20], "little")
            entry["order_and_table_bytes_per_position"] = order_bytes / summary["positions"]
            rows_all = np.random.default_rng(0).permutation(len(store))
            for cache in ("cold", "warm"):
                if cache == "cold":
                    store = logitstore.open(path)  # no block decoded yet
                t = time.perf_counter()
                for side in ("chosen", "rejected"):
                    store.top_k(side, rows_all)
                entry[f"top_k_{cache}_us_per_position"] = (time.perf_counter() - t) / summary["positions"] * 1e6
            loader, _ = make_loader(str(path), 8, seed=0, pin_memory=False, teacher=True)
            t = time.perf_counter()
            batches = sum(1 for _ in loader)
            entry["loader_ms_per_batch_of_8"] = (time.perf_counter() - t) / batches * 1e3
        out["builds"][name] = entry
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}, flush=True)
    base = out["builds"]["none"]["seconds"]
    for entry in out["builds"].values():
        entry["seconds_over_none"] = entry["seconds"] / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.pairs, args.steps)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
