"""The whole mission on a laptop CPU in a few minutes, with nothing downloaded.

A tiny Mistral-architecture model is made on the spot (random weights, byte-level ByT5 tokenizer, which needs no
files), the bundled medical-statement preference pairs (a faithful statement chosen, an unsupported one rejected)
are split into train and eval, a store is built and verified for each, and a LoRA policy is trained from them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

DATA = Path(__file__).parent / "data" / "medical_pairs.jsonl"


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import ByT5Tokenizer, MistralConfig, MistralForCausalLM

    tokenizer = ByT5Tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    MistralForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def split_data(folder: Path, pairs: int, eval_fraction: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()][:pairs]
    random.Random(seed).shuffle(rows)
    n_eval = max(1, int(len(rows) * eval_fraction))
    paths = []
    for name, part in (("train", rows[n_eval:]), ("eval", rows[:n_eval])):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


def pickle_alternative_bytes(store: Any) -> int:
    """Bytes of what the original pipeline cached: float32 logits for every position of every sequence, padded
    to the batch (here: padding ignored, so this is a lower bound)."""
    vocab = int(store.tokenizer["vocab_size"])
    off = {f: store.offsets(f) for f in ("prompt_ids", "chosen_ids", "rejected_ids")}
    lens = {f: o[:, 1] - o[:, 0] for f, o in off.items()}
    positions = 2 * lens["prompt_ids"] + lens["chosen_ids"] + lens["rejected_ids"]
    return int(positions.sum()) * vocab * 4


DEMO_ENTRIES = ("model", "train.jsonl", "eval.jsonl", "train.lstore", "eval.lstore", "run")


def _earlier_demo(out: Path) -> list[str]:
    """What an earlier demo left in `out` (to be replaced); refuses a folder holding anything else."""
    from logitstore.errors import LogitstoreError

    if not out.exists():
        return []
    if not out.is_dir():
        raise LogitstoreError(f"{out} exists and is not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    others = [name for name in entries if name not in DEMO_ENTRIES]
    if others:
        raise LogitstoreError(f"{out} holds {others[0]!r}, which no demo writes; the demo replaces only an earlier "
                              "demo's folder: choose another --out")
    return entries


def run_demo(out: str | Path, *, pairs: int = 320, steps: int = 40, batch_size: int = 8,
             log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    import warnings

    import logitstore
    from logitstore.describe import human_bytes

    from .reference import BuildConfig, build

    # ByT5 appends </s> itself and warns when the text (TRL-style) already ends with it; the ids are right.
    warnings.filterwarnings("ignore", message="This sequence already has </s>")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .training import TrainConfig, train

    out = Path(out)
    replacing = _earlier_demo(out)
    if replacing:
        log(f"Replacing the earlier demo in {out} ({', '.join(replacing)}).")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(out / "model")
    train_data, eval_data = split_data(out, pairs)
    log(f"1/4 Made a tiny model (random weights) in {model} and split {pairs} bundled pairs into "
        f"{train_data.name} / {eval_data.name}.")
    stores = {}
    for name, data in (("train", train_data), ("eval", eval_data)):
        result = build(BuildConfig(model=str(model), data=str(data), out=str(out / f"{name}.lstore"),
                                   max_length=512, per_token=True, rows_per_shard=64, batch_size=16),
                       progress=progress, log=log)
        stores[name] = result
    log(f"2/4 {stores['train'].summary()}")
    report = logitstore.verify(out / "train.lstore")
    log(f"3/4 Verified {report.files_checked} files of {report.shards} shard{'' if report.shards == 1 else 's'}: "
        f"{'sound' if report.ok else '; '.join(report.problems)}.")
    result = train(TrainConfig(model=str(model), store=str(out / "train.lstore"), out=str(out / "run"),
                               eval_store=str(out / "eval.lstore"), max_steps=steps, batch_size=batch_size,
                               lr=2e-3, log_every=5, eval_every=10, lora_r=16, lora_alpha=32),
                   progress=progress, log=log)
    history = result["history"]
    store = logitstore.open(out / "train.lstore")
    size = store.location.total_bytes()
    alt = pickle_alternative_bytes(store)
    first, last = history[0], history[-1]
    log(f"4/4 Trained {result['steps']} steps: loss {first['loss']:.4f} (ln 2 = 0.6931) -> {last['loss']:.4f}, "
        f"reward accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}; "
        f"eval loss {result['eval']['eval/loss']:.4f}, eval accuracy {result['eval']['eval/rewards_accuracies']:.2f}.")
    log(f"Store: {human_bytes(size)} for {len(store)} pairs with per-token values; full-logit pickles of the same "
        f"pairs: {human_bytes(alt)} ({alt / max(size, 1):,.0f}x larger, at this tiny {store.tokenizer['vocab_size']}"
        f"-token vocabulary; x{32000 / store.tokenizer['vocab_size']:.0f} more at 32k).")
    log(f"Files: stores {out / 'train.lstore'}, {out / 'eval.lstore'}; adapter {out / 'run' / 'adapter'} (the one "
        f"with the lowest eval loss: {out / 'run' / 'best'}); "
        f"metrics {out / 'run' / 'metrics.jsonl'}; plot {result.get('plot')}")
    return {"out": str(out), "history": history, "eval": result["eval"], "store_bytes": size,
            "pickle_bytes": alt, "plot": result.get("plot")}
