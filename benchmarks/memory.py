"""Training memory on CPU, logitstore against TRL DPOTrainer + peft (issue 17): each trainer in its own process,
peak memory = that process's maximum resident set size (model load included, as a user's `top` sees it).

    python benchmarks/memory.py compare [--json OUT]     # peak RSS and step time, side by side
    python benchmarks/memory.py breakdown [--json OUT]   # one step's peak split by what holds the memory
    python benchmarks/memory.py ... --smoke              # a tiny model and 2 steps (the tests run this)
    python benchmarks/memory.py render COMPARE BREAKDOWN [BEFORE BEFORE_BREAKDOWN]  # into docs/benchmarks.md
    python benchmarks/memory.py long [--lengths 2048,1024,512] [--train-option split_sequences=true] --json OUT
        # issue 26's long-context table: batch 2, gradient checkpointing on both sides, TRL most frugal
    python benchmarks/memory.py breakdown --long --max-length 2048   # that setting's breakdown at one length
    python benchmarks/memory.py render-long LONG_JSON [LONG_JSON ...]  # its section of docs/benchmarks.md

The setting: a Mistral-architecture model of 12 layers x 512 (MLP 1792, the real 32k vocabulary, float32), LoRA
r=8 on every linear layer (alpha 16, dropout 0.05), max length 512, batch 4 pairs, 6 steps, AdamW. The pairs are
synthetic text long enough that every sequence reaches the 512-token limit, so both trainers meet the same,
worst-case batch shapes whatever order they read the pairs in.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu import synthetic_pairs  # noqa: E402
from report import write_section  # noqa: E402
import children  # noqa: E402
from workloads import child_env, make_model_in_child, run_child  # noqa: E402

SETTING = {"size": "memory", "max_length": 512, "batch_size": 4, "steps": 6, "lora_r": 8, "pairs": 32,
           "words": (40, 130)}
# Issue 26's long-context table: batch 2, gradient checkpointing on both sides, TRL at its most frugal
# (precompute_ref_log_probs); --max-length picks the length, the words scale with it so every sequence reaches it.
LONG = {"size": "memory", "max_length": 2048, "batch_size": 2, "steps": 2, "lora_r": 8, "pairs": 8,
        "gradient_checkpointing": True, "precompute_ref": True}
SMOKE = {"size": "small", "max_length": 96, "batch_size": 2, "steps": 2, "lora_r": 8, "pairs": 8, "words": (8, 24)}


def prepare(work: Path, s: dict) -> dict:
    """The model, the pairs and the store both trainers read."""
    model = work / "model"
    tag = "" if s.get("words") else f"-{s['max_length']}"  # the long settings' data and stores, one per length
    data, store = work / f"pairs{tag}.jsonl", work / f"train{tag}.lstore"
    if not (model / "config.json").exists():
        make_model_in_child(model, s["size"])
    if not data.exists():
        rows = synthetic_pairs(s["pairs"], *(s.get("words") or (40 * s["max_length"] // 512,
                                                                   130 * s["max_length"] // 512)))
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (store / "zarr.json").exists():
        run_child("build", {"model": str(model), "data": str(data), "out": str(store), "max_length": s["max_length"],
                            "batch_size": 8, "share_prompt": True, "bucketing": True})
    return {"model": str(model), "data": str(data), "store": str(store), "max_length": s["max_length"],
            "batch_size": s["batch_size"], "steps": s["steps"], "lora_r": s["lora_r"],
            "gradient_checkpointing": s.get("gradient_checkpointing", False),
            "precompute_ref": s.get("precompute_ref", False), "train_options": s.get("train_options", {})}


def compare(work: Path, s: dict, *, trl: dict | None = None) -> dict:
    """Both trainers' peak RSS and step time; `trl`: TRL's figures measured earlier in this setting (not rerun)."""
    common = prepare(work, s)
    ours = run_child("train", {**common, "out": str(work / "run-logitstore")})
    trl = trl or run_child("trl-train", {**common, "out": str(work / "run-trl")})
    return {"setting": s, "logitstore": ours, "trl": trl,
            "rss_ratio": ours["peak_rss_bytes"] / trl["peak_rss_bytes"],
            "step_ratio": ours["step_seconds"] / trl["step_seconds"]}


def long_table(work: Path, s: dict, lengths: list[int], out: Path | None, trl_from: Path | None) -> dict:
    """`compare` at each max length of the long setting; the JSON is rewritten after each, so an interrupted run
    keeps what it measured. `trl_from`: an earlier long table whose TRL rows are reused (TRL's code is the same)."""
    earlier = {r["setting"]["max_length"]: r["trl"] for r in json.loads(trl_from.read_text())["rows"]} if trl_from \
        else {}
    result: dict = {"setting": {k: v for k, v in s.items() if k != "max_length"}, "rows": []}
    for length in lengths:
        result["rows"].append(compare(work, {**s, "max_length": length}, trl=earlier.get(length)))
        if out:
            out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def breakdown(work: Path, s: dict, *, trl: dict | None = None) -> dict:
    """Each trainer's first step split into pieces; `trl`: TRL's breakdown measured earlier in this setting."""
    common = prepare(work, s)
    ours = run_child("profile-train", {**common, "out": str(work / "prof-logitstore")})
    trl = trl or run_child("profile-trl-train", {**common, "out": str(work / "prof-trl")})
    return {"setting": s, "logitstore": ours, "trl": trl}


BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
ROOT = HERE.parent
PIECES = ["weights", "adapter weights", "optimizer state", "activations saved for backward", "logits / log-softmax",
          "reference forward (TRL)", "loss", "batch tensors", "backward: gradients in flight",
          "other (optimizer step, loader)"]


def _table(compare_result: dict) -> list[str]:
    trl = compare_result["trl"]
    rows = []
    for name, r in (("logitstore train", compare_result["logitstore"]), ("TRL DPOTrainer + peft", trl)):
        rows.append(f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_rss_bytes'] / trl['peak_rss_bytes']:.2f}x | "
                    f"{r['step_seconds']:.1f} s | {r['step_seconds'] / trl['step_seconds']:.2f}x | "
                    f"{r['loss_first']:.6f}")
    return rows


def render(compare_result: dict, breakdown_result: dict, before: dict | None = None,
           before_breakdown: dict | None = None) -> str:
    """The section of docs/benchmarks.md; `before`: the same two measurements of an earlier version, side by side."""
    gb = 1e9
    s = compare_result["setting"]
    lines = [BEGIN, "## Training memory on CPU, against TRL", "",
             f"`python benchmarks/memory.py compare`: a Mistral-architecture model of 12 layers x 512 (MLP 1792, the "
             f"real 32k vocabulary, float32), LoRA r={s['lora_r']} on every linear layer, max length {s['max_length']}, "
             f"batch {s['batch_size']} pairs, {s['steps']} steps, AdamW, no gradient checkpointing; {s['pairs']} "
             f"synthetic pairs whose every sequence reaches the {s['max_length']}-token limit, so both trainers meet "
             "the same batch shapes. Each trainer runs in its own process; peak RSS is that process's maximum "
             "resident set size (model load included, what the operating system counts); step time is the median "
             "after the first step. Each ran one math thread on the 2-core machine of this page while other jobs "
             "shared it: step times are noisy.", "",
             "| trainer | peak RSS | vs TRL | step time | vs TRL | step-0 loss |", "|---|---:|---:|---:|---:|---:|"]
    names = ["logitstore train", "TRL DPOTrainer + peft"]
    if before is not None:
        for name, row in zip(names, _table(before)):
            lines.append(f"| {name}, before | {row} |")
    for name, row in zip(names, _table(compare_result)):
        lines.append(f"| {name}{', after' if before is not None else ''} | {row} |")
    for note in (compare_result.get("note"), compare_result.get("timing_note")):
        if note:
            lines += ["", note]
    lines += ["", "Where one step's peak goes (`python benchmarks/memory.py breakdown`: each trainer's first step "
                  "under torch.profiler's allocation records, the live allocations at its largest instant put in "
                  "pieces by the region they were made in; weights, adapter, optimizer state and batch counted from "
                  "the tensors; the last row is the peak RSS of the table above less the tensors):", ""]
    columns = [("logitstore", breakdown_result["logitstore"], compare_result["logitstore"]),
               ("TRL + peft", breakdown_result["trl"], compare_result["trl"])]
    if before_breakdown is not None and before is not None:
        columns.insert(0, ("logitstore, before", before_breakdown["logitstore"], before["logitstore"]))
    lines += ["| piece | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]

    def get(b: dict, piece: str) -> int:
        return b["held"].get(piece, 0) + b["pieces"].get(piece, 0)

    for piece in PIECES:
        values = [get(b, piece) for _, b, _ in columns]
        if any(values):
            lines.append(f"| {piece} | " + " | ".join(f"{v / gb:.3f} GB" for v in values) + " |")
    totals = [sum(b["held"].values()) + b["tracked_peak_bytes"] for _, b, _ in columns]
    lines.append("| **tensors at the peak** | " + " | ".join(f"**{t / gb:.2f} GB**" for t in totals) + " |")
    lines.append("| interpreter, libraries, allocator slack | " +
                 " | ".join(f"{(r['peak_rss_bytes'] - t) / gb:.2f} GB" for (_, _, r), t in zip(columns, totals)) + " |")
    ours, trl = breakdown_result["logitstore"], breakdown_result["trl"]
    positions, layers = 2 * s["batch_size"] * s["max_length"], 12
    act = ours["pieces"].get("activations saved for backward", 0)
    lines += ["", "What each piece is, and why it is that size:", "",
              f"- **weights**: the frozen base model in float32, {ours['held']['weights'] / 4e6:.0f} M parameters x 4 "
              "bytes, the same in both: TRL's reference is these weights with the adapter switched off, not a copy.",
              f"- **adapter weights, optimizer state**: LoRA's A and B on the 84 linear layers "
              f"({ours['held']['adapter weights'] / 4e6:.2f} M parameters at r={s['lora_r']}) and AdamW's two moments "
              "for each; small at this rank.",
              f"- **activations saved for backward**: what autograd keeps from the forward pass: for each layer and "
              "position the inputs of the linear layers (one tensor for the layers that read the same input), the "
              "MLP's 1,792-wide intermediates (gate, up, their activation and product), attention's queries, keys, "
              f"values and output, the norms' inputs; {act / (positions * layers) / 1e3:.0f} kB per position per "
              f"layer here, for {positions:,} positions x {layers} layers. Dropout is off in both policies, as TRL's "
              "DPOTrainer has it by default (`disable_dropout`); before, logitstore ran LoRA's dropout (p = 0.05), "
              "which kept a dropped copy of each adapted layer's input and its mask besides (now `--keep-dropout`). "
              "Gradient checkpointing is what shrinks this piece further.",
              "- **logits / log-softmax**: logitstore runs the LM head only at positions that score a completion "
              "token, in slices of at most 64 MiB of float32 logits; at the peak one slice's logits and logsumexp's "
              "temporary are live, and the backward recomputes a slice's logits and turns them into their own "
              "gradient in place (`_LinearHeadLogps` in dpo/model/head.py). Before, autograd through a checkpointed "
              "256 MiB slice held five [2,097 x 32,000] float32 tensors at the start of the backward (the logits, "
              "their difference from log Z, its exponential, its product with the incoming gradient and gather's "
              "zero-filled gradient). TRL 1.16 computes log-probs with its chunked log-prob function, whose CPU "
              "path works on 4,096-token tiles of the vocabulary's chunks.",
              "- **reference**: nothing in logitstore: the reference is two floats per pair read from the store. TRL "
              "runs a second forward with the adapter off under `no_grad`; its buffers live only while it runs.",
              "- **batch tensors**: token ids and masks (int64) and the two reference floats per pair.",
              "- **interpreter, libraries, allocator slack**: Python, torch, transformers, peft (and TRL's "
              "imports), and memory freed by PyTorch that glibc's allocator keeps: its mmap threshold rises with "
              "each large block freed (up to 32 MiB), after which activation-sized blocks come from the heap and "
              "stay resident once freed. A fixed 1 MiB threshold (`MALLOC_MMAP_THRESHOLD_=1048576`) returns them: "
              "measured side by side on this version, 3.03 GB peak RSS instead of 4.59 GB, but a 25% slower step "
              "(63.8 s against 50.9 s; 26.7 s of system time for page faults against 3.9 s), so training leaves "
              "glibc's default alone.",
              ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


LONG_BEGIN, LONG_END = "<!-- memory-long:begin -->", "<!-- memory-long:end -->"


def _options_label(options: dict) -> str:
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in options.items() if v]
    return " ".join(flags) or "default"


def _long_breakdown(columns: list[tuple[str, dict]]) -> list[str]:
    """Rows of pieces (GiB) for `breakdown --long` results: what one step holds at its largest instant."""
    gib = 2**30
    lines = ["| piece | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    pieces = list(dict.fromkeys(k for _, b in columns for k in (*b["held"], *b["pieces"])))
    for piece in pieces:
        values = [b["held"].get(piece, 0) + b["pieces"].get(piece, 0) for _, b in columns]
        if any(v >= gib / 1000 for v in values):
            lines.append(f"| {piece} | " + " | ".join(f"{v / gib:.3f}" for v in values) + " |")
    totals = [sum(b["held"].values()) + b["tracked_peak_bytes"] for _, b in columns]
    lines.append("| **tensors at the peak** | " + " | ".join(f"**{t / gib:.2f}**" for t in totals) + " |")
    lines.append("| interpreter, libraries, allocator slack, profiler | " + " | ".join(
        f"{(b['peak_rss_bytes'] - t) / gib:.2f}" for (_, b), t in zip(columns, totals)) + " |")
    lines.append("| peak RSS of the profiled process | " + " | ".join(
        f"{b['peak_rss_bytes'] / gib:.2f}" for _, b in columns) + " |")
    return lines


def render_long(tables: list[dict], breakdowns: list[tuple[str, dict]] = ()) -> str:
    """The long-context section of docs/benchmarks.md: one `long` table per set of training options, and
    `breakdown --long` results at one length as (column name, that result's logitstore or trl side)."""
    gib = 2**30
    s = tables[0]["setting"]
    lines = [LONG_BEGIN, "## Training memory on CPU at long context (issue 26)", "",
             "`python benchmarks/memory.py long [--train-option FIELD=VALUE ...]`: the model above (12 layers x 512, "
             f"MLP 1792, 32k vocabulary, float32), LoRA r={s['lora_r']}, batch {s['batch_size']} pairs, gradient "
             "checkpointing on both sides, TRL DPOTrainer + peft at its most frugal (`precompute_ref_log_probs=True`, "
             "`gradient_checkpointing=True`, its chunked log-prob head); every sequence reaches the max length. "
             f"{s['steps']} steps; peak RSS is the whole process's (model load and TRL's precompute included), in "
             "GiB; step time the median after the first. The 2-core machine was shared with other jobs while these "
             "ran: peaks are the process's own and hold, step times are noisy (compare within a row).", "",
             "| logitstore options | max length | logitstore | TRL | ratio | step, logitstore | step, TRL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for table in tables:
        label = _options_label(table["setting"].get("train_options", {}))
        for row in table["rows"]:
            ours, trl = row["logitstore"], row["trl"]
            lines.append(f"| {label} | {row['setting']['max_length']:,} | {ours['peak_rss_bytes'] / gib:.2f} | "
                         f"{trl['peak_rss_bytes'] / gib:.2f} | {row['rss_ratio']:.2f}x | "
                         f"{ours['step_seconds']:.1f} s | {trl['step_seconds']:.1f} s |")
    for table in tables:
        if table.get("note"):
            lines += ["", table["note"]]
    if breakdowns:
        lines += ["", "Where one step's peak goes at this length, in GiB (`python benchmarks/memory.py breakdown --long "
                  "--max-length N [--train-option ...]`, as in the section above: the live allocations at the step's "
                  "largest instant by the region they were made in, the held tensors counted from themselves; the "
                  "profiler's own records add to the process's RSS):", ""]
        lines += _long_breakdown(list(breakdowns))
    lines += ["", LONG_END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compare", "breakdown", "render", "long", "render-long"])
    parser.add_argument("results", nargs="*", type=Path, help="render: the compare and breakdown JSON files")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps")
    parser.add_argument("--work", type=Path, help="folder for the model, data and store (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--long", action="store_true", help="issue 26's long-context setting: batch 2, gradient "
                        "checkpointing on both sides, TRL with precompute_ref_log_probs (the `long` table's setting)")
    parser.add_argument("--max-length", type=int, help="with --long: the max length (default 2048)")
    parser.add_argument("--lengths", default="2048,1024,512", help="long: the max lengths, in this order")
    parser.add_argument("--train-option", action="append", default=[], metavar="FIELD=JSON",
                        help="a TrainConfig field for logitstore's runs, e.g. split_sequences=true (repeatable)")
    parser.add_argument("--trl-from", type=Path, help="reuse TRL's figures from this earlier result of the same "
                        "command and setting (long: its rows), instead of running TRL again")
    parser.add_argument("--breakdown", action="append", default=[], metavar="COLUMN=SIDE:JSON",
                        help="render-long: a breakdown column, e.g. 'logitstore, before=logitstore:bd.json'")
    args = parser.parse_args(argv)
    if args.what == "render-long":
        named = [(spec.split("=", 1)[0], spec.split("=", 1)[1].split(":", 1)) for spec in args.breakdown]
        breakdowns = [(name, json.loads(Path(path).read_text())[side]) for name, (side, path) in named]
        write_section(args.doc, render_long([json.loads(p.read_text()) for p in args.results], breakdowns),
                      LONG_BEGIN, LONG_END)
        return 0
    if args.what == "render":
        if len(args.results) not in (2, 4):
            parser.error("render takes COMPARE BREAKDOWN, and optionally an earlier version's two after them")
        loaded = [json.loads(p.read_text()) for p in args.results]
        if any(r["setting"] != json.loads(json.dumps(SETTING)) for r in loaded):
            raise SystemExit("benchmarks/memory.py: these results are not from the benchmark's setting (--smoke?)")
        write_section(args.doc, render(*loaded), BEGIN, END)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="logitstore-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    s = dict(SMOKE if args.smoke else LONG if args.long or args.what == "long" else SETTING)
    if args.smoke and (args.long or args.what == "long"):
        s.update(gradient_checkpointing=True, precompute_ref=True)
    if args.max_length:
        s["max_length"] = args.max_length
    if args.train_option:
        s["train_options"] = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.train_option)}
    # A smoke run's children fork from one interpreter that imported the libraries once (its figures are not
    # published: the preloaded modules count in every child's peak RSS).
    with children.preloaded(env=child_env(), when=args.smoke):
        if args.what == "long":
            lengths = [s["max_length"]] if args.smoke else [int(x) for x in args.lengths.split(",")]
            result = long_table(work, s, lengths, args.json, args.trl_from)
        else:
            earlier = json.loads(args.trl_from.read_text())["trl"] if args.trl_from else None
            result = (compare if args.what == "compare" else breakdown)(work, s, trl=earlier)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
