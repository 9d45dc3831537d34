"""Training memory of the teacher terms on CPU (issue 20), by benchmarks/memory.py's methods: each objective trains
in its own process; peak memory = that process's maximum resident set size (model load included) after its
steps, and, for one more step under torch.profiler (memprofile.py), the step's tracked peak: the most bytes of
tensors allocated during the step alive at once, which the C allocator's reuse and fragmentation do not blur.

    python benchmarks/distill_memory.py [--smoke] [--json OUT] [--objective NAME ...]

The setting is memory.py's: a Mistral-architecture model of 12 layers x 512 (the real 32k vocabulary, float32),
LoRA r=8 on every linear layer, batch 4 pairs of 512 tokens (a 64-token prompt, 448-token completions), AdamW,
3 steps. The teacher records are synthetic top-128 records in the loader's layout (ids, sorted log-probs, tail),
as the pairs task's step (`dpo/kinds/pairs.py`) reads them: the training step's memory does not depend on their values.

Objectives: sigmoid (no teacher), distill, sigmoid+distill, tdpo2; and two other ways to compute distill's
divergence, to show what the trainer's way saves: "autograd slices", the same slices under autograd, each
recomputed in the backward pass (the path of heads with a logit scale or soft-capping, forced here by a logit scale
of 1.0), and "whole logits", the divergence from the [2B, T, V] logits of one ordinary forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import children  # noqa: E402
from workloads import child_env, make_model_in_child  # noqa: E402

SETTING = {"size": "memory", "prompt": 64, "completion": 448, "pairs": 4, "k": 128, "steps": 3}
SMOKE = {"size": "small", "prompt": 16, "completion": 48, "pairs": 2, "k": 16, "steps": 2}
OBJECTIVES = {
    "sigmoid": {"loss_types": ("sigmoid",)},
    "distill": {"loss_types": ("distill",), "distill_beta": 0.0},
    "sigmoid+distill": {"loss_types": ("sigmoid", "distill"), "loss_weights": (1.0, 0.5), "distill_beta": 0.0},
    "tdpo2": {"loss_types": ("tdpo2",)},
    "distill, autograd slices": {"loss_types": ("distill",), "distill_beta": 0.0, "mode": "autograd"},
    "distill, whole logits": {"loss_types": ("distill",), "distill_beta": 0.0, "mode": "whole"},
}


def synthetic_batch(s: dict, vocab: int):
    import torch

    from logitstore.loader import pad_pairs

    g = torch.Generator().manual_seed(0)
    n, p, c, k = s["pairs"], s["prompt"], s["completion"], s["k"]
    draw = lambda m: torch.randint(3, vocab, (m,), generator=g)  # noqa: E731
    batch = pad_pairs([draw(p) for _ in range(n)], [draw(c) for _ in range(n)], [draw(c) for _ in range(n)], 0)
    rows, width = 2 * n, c - (0 if p else 1)  # every completion token is scored (the prompt is not empty)
    # clone(): a slice of a permutation would keep the whole permutation's storage (256 KB a position) alive
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k].clone() for _ in range(rows * width)])
    ids = ids.reshape(rows, width, k)
    logps = torch.sort(torch.randn(rows, width, k, generator=g) * 2 - 6, dim=-1, descending=True).values
    batch.update({"teacher_ids": ids, "teacher_logps": logps, "teacher_tail_logp": torch.full((rows, width), -1.0),
                  "ref_chosen_logps": torch.full((n,), -100.0), "ref_rejected_logps": torch.full((n,), -100.0),
                  "rows": torch.arange(n)})
    return batch


def child(args: dict) -> dict:
    import resource

    import torch

    import memprofile

    from logitstore.dpo.objectives.distill import top_k_divergence
    from logitstore.dpo.objectives.objective import Objective
    from logitstore.dpo.kinds.pairs import KIND as PAIRS
    from logitstore.dpo.training import TrainConfig
    from logitstore.dpo.training.policy import make_optimizer, setup_policy

    spec = dict(OBJECTIVES[args["objective"]])
    mode = spec.pop("mode", None)
    whole = mode == "whole"
    objective = Objective(**spec)
    cfg = TrainConfig(model=args["model"], store="-", out="-", dtype="float32", device="cpu")
    torch.manual_seed(0)
    policy = setup_policy(cfg)
    if mode == "autograd":  # not a plain head any more: dpo.model.head.head_divergences takes its autograd path
        policy.get_base_model().config.logit_scale = 1.0
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    batch = synthetic_batch(args["setting"], policy.config.vocab_size)
    times = []

    def step() -> None:
        if whole:
            logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            scored = batch["completion_mask"][:, 1:].bool()
            real = torch.arange(batch["teacher_ids"].shape[1])[None, :] < scored.sum(1)[:, None]
            loss = top_k_divergence(logits[scored], batch["teacher_ids"][real], batch["teacher_logps"][real],
                                    batch["teacher_tail_logp"][real], 0.0).mean()
        else:
            loss, _ = PAIRS.task(cfg, objective).step(policy, batch, torch.device("cpu"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args["setting"]["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with memprofile.profiler() as prof:
        step()
    tracked = memprofile.peak_breakdown(prof, vocab=policy.config.vocab_size)
    return {"objective": args["objective"], "peak_rss_bytes": rss, "step_seconds": min(times[1:] or times),
            "tracked_peak_bytes": tracked["tracked_peak_bytes"], "tracked_pieces": tracked["pieces"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small model and 2 steps")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--work", help="folder for the model (default: a temporary one)")
    parser.add_argument("--objective", action="append",
                        help="one of OBJECTIVES to run (repeat for more; default: all)")
    a = parser.parse_args()
    s = SMOKE if a.smoke else SETTING
    names = a.objective or list(OBJECTIVES)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown objective {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}")
    # A smoke run's children fork from one interpreter that imported the libraries once (memory.py's smoke).
    with tempfile.TemporaryDirectory() as tmp, \
            children.preloaded(env=child_env(), when=a.smoke):
        work = Path(a.work or tmp)
        model = work / f"model-{s['size']}"
        if not (model / "config.json").exists():
            make_model_in_child(model, s["size"])
        results = []
        for name in names:
            done = children.run([__file__, "--child", json.dumps({"objective": name, "model": str(model),
                                                                  "setting": s})], env=child_env())
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{name:24s} peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB  step's tracked peak "
                  f"{r['tracked_peak_bytes'] / 2**30:6.2f} GiB  step {r['step_seconds']:6.1f} s", flush=True)
    out = {"setting": s, "results": results}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
