"""Training memory on CPU, logitstore against TRL DPOTrainer + peft (issue 17): each trainer in its own process,
peak memory = that process's maximum resident set size (model load included, as a user's `top` sees it).

    python benchmarks/memory.py compare [--json OUT]     # peak RSS and step time, side by side
    python benchmarks/memory.py breakdown [--json OUT]   # one step's peak split by what holds the memory
    python benchmarks/memory.py ... --smoke              # a tiny model and 2 steps (the tests run this)

The setting: a Mistral-architecture model of 12 layers x 512 (MLP 1792, the real 32k vocabulary, float32), LoRA
r=8 on every linear layer (alpha 16, dropout 0.05), max length 512, batch 4 pairs, 6 steps, AdamW. The pairs are
synthetic text long enough that every sequence reaches the 512-token limit, so both trainers meet the same,
worst-case batch shapes whatever order they read the pairs in.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu import synthetic_pairs  # noqa: E402
from workloads import run_child  # noqa: E402

SETTING = {"size": "memory", "max_length": 512, "batch_size": 4, "steps": 6, "lora_r": 8, "pairs": 32,
           "words": (40, 130)}
SMOKE = {"size": "small", "max_length": 96, "batch_size": 2, "steps": 2, "lora_r": 8, "pairs": 8, "words": (8, 24)}


def prepare(work: Path, s: dict) -> dict:
    """The model, the pairs and the store both trainers read."""
    model, data, store = work / "model", work / "pairs.jsonl", work / "train.lstore"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "workloads.py"), "make-model", str(model), s["size"]], check=True)
    if not data.exists():
        rows = synthetic_pairs(s["pairs"], *s["words"])
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (store / "zarr.json").exists():
        run_child("build", {"model": str(model), "data": str(data), "out": str(store), "max_length": s["max_length"],
                            "batch_size": 8, "share_prompt": True, "bucketing": True})
    return {"model": str(model), "data": str(data), "store": str(store), "max_length": s["max_length"],
            "batch_size": s["batch_size"], "steps": s["steps"], "lora_r": s["lora_r"]}


def compare(work: Path, s: dict) -> dict:
    common = prepare(work, s)
    ours = run_child("train", {**common, "out": str(work / "run-logitstore")})
    trl = run_child("trl-train", {**common, "out": str(work / "run-trl")})
    return {"setting": s, "logitstore": ours, "trl": trl,
            "rss_ratio": ours["peak_rss_bytes"] / trl["peak_rss_bytes"],
            "step_ratio": ours["step_seconds"] / trl["step_seconds"]}


def breakdown(work: Path, s: dict) -> dict:
    common = prepare(work, s)
    ours = run_child("profile-train", {**common, "out": str(work / "prof-logitstore")})
    trl = run_child("profile-trl-train", {**common, "out": str(work / "prof-trl")})
    return {"setting": s, "logitstore": ours, "trl": trl}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compare", "breakdown"])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps")
    parser.add_argument("--work", type=Path, help="folder for the model, data and store (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="logitstore-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    s = SMOKE if args.smoke else SETTING
    result = (compare if args.what == "compare" else breakdown)(work, s)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
