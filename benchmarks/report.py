"""Run the benchmark suite and write docs/benchmarks.md (tables) and docs/img/*.png (plots).

    python benchmarks/report.py                  # run everything (about 15 minutes on 2 cores), then write
    python benchmarks/report.py --from a.json b.json   # write from earlier --benchmark-json files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


def run_suite(out: Path) -> list[Path]:
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "-p", "no:cacheprovider",
                    f"--benchmark-json={out}"], check=True, cwd=ROOT)
    return [out]


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    by_name, machine = {}, {}
    for p in paths:  # a later file's figure replaces an earlier one of the same benchmark
        data = json.loads(p.read_text())
        by_name.update({b["fullname"]: b for b in data["benchmarks"]})
        machine = data.get("machine_info", machine)
    return list(by_name.values()), machine


def param(b: dict, key: str) -> str:
    return str((b.get("params") or {}).get(key, ""))


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def versions() -> str:
    import importlib.metadata as md

    names = ["logitstore", "zarr", "numcodecs", "numpy", "torch", "transformers", "trl", "peft"]
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def log_bars(name: str, labels: list[str], values: list[float], xlabel: str, color: str) -> None:
    """A horizontal bar chart on a log scale, saved as docs/img/NAME."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.barh(labels, values, color=color)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(IMG / name, dpi=110)
    plt.close(fig)


def goal_lines(benches: list[dict]) -> list[str]:
    """The targets the suite exists to check, with the figure that decides each."""
    def find(group: str, **params: str) -> dict | None:
        for b in benches:
            if b["extra_info"].get("group") == group and all(param(b, k) == v for k, v in params.items()):
                return b
        return None

    def rate(b: dict) -> float:
        return b["extra_info"]["examples"] / b["stats"]["mean"]

    rows = []
    ceiling, raw = find("read", reader="memmap ceiling", order="random"), find("read", reader="logitstore raw", order="random")
    zraw, packed = find("read", reader="zarr-python raw", order="random"), find("read", reader="logitstore compressed", order="random")
    zpacked = find("read", reader="zarr-python compressed", order="random")
    cold = find("read", reader="logitstore compressed, no chunk cache", order="random")
    if ceiling and raw and zraw:
        r = rate(raw) / rate(ceiling)
        rows.append(f"| uncompressed reads >= 50% of the memmap ceiling | {r:.0%} | {'yes' if r >= 0.5 else 'no'} |")
        r = rate(raw) / rate(zraw)
        rows.append(f"| uncompressed reads >= 50x zarr-python | {r:.0f}x | {'yes' if r >= 50 else 'no'} |")
    if packed and zpacked:
        r, c = rate(packed) / rate(zpacked), (rate(cold) / rate(zpacked) if cold else float("nan"))
        rows.append(f"| compressed reads >= 10x zarr-python, same codec | {r:.0f}x with the chunk cache, {c:.0f}x "
                    f"decoding every chunk | {'yes' if r >= 10 else 'no'}{'' if c >= 10 else ' (not without the cache)'} |")
    fixed = find("size", preset="fixed")
    if fixed:
        e = fixed["extra_info"]
        ok = e["per_token_value_bytes"] <= 1.6 and e["max_sum_error"] <= 0.015
        rows.append(f"| fixed point <= 1.6 B/token at <= 0.015 nats sum error | {e['per_token_value_bytes']:.2f} B/token, "
                    f"{e['max_sum_error']:.4f} nats | {'yes' if ok else 'no'} |")
    trl_build, build = find("build", variant="TRL precompute_ref_log_probs"), find("build", variant="logitstore build")
    if trl_build and build:
        r = build["extra_info"]["tokens_per_second"] / trl_build["extra_info"]["tokens_per_second"]
        m = build["extra_info"]["peak_rss_bytes"] / trl_build["extra_info"]["peak_rss_bytes"]
        rows.append(f"| build >= 1.5x TRL's throughput at no more peak memory | {r:.1f}x, {m:.2f}x the memory | "
                    f"{'yes' if r >= 1.5 and m <= 1 else 'no'} |")
    trl_step = find("train-step", trainer="TRL DPOTrainer + peft (reference = adapter off)")
    step = find("train-step", trainer="logitstore train")
    if trl_step and step:
        r = step["extra_info"]["step_seconds"] / trl_step["extra_info"]["step_seconds"]
        f = step["extra_info"]["loader_seconds"] / step["extra_info"]["step_seconds"]
        rows.append(f"| training step <= 0.75x TRL's | {r:.2f}x | {'yes' if r <= 0.75 else 'no'} |")
        rows.append(f"| loader < 1% of a training step | {f:.2%} | {'yes' if f < 0.01 else 'no'} |")
    full, reuse = find("reuse", variant="full rebuild"), find("reuse", variant="build --reuse")
    if full and reuse:
        r = full["extra_info"]["seconds"] / reuse["extra_info"]["seconds"]
        c = full["extra_info"]["cpu_seconds"] / reuse["extra_info"]["cpu_seconds"]
        rows.append(f"| rebuild after a 10% change about 10x faster with --reuse (issue 12) | {r:.1f}x wall time, "
                    f"{c:.1f}x CPU time | {'yes' if r >= 8 else 'no'} |")
    loader = find("loader")
    if loader:
        r = loader["stats"]["mean"] / loader["extra_info"]["loader_seconds_per_batch"]
        rows.append(f"| loader >= 10x faster than unpickling per-batch logits | {r:,.0f}x | {'yes' if r >= 10 else 'no'} |")
    return rows


def render(benches: list[dict], machine: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    group = lambda g: [b for b in benches if b["extra_info"].get("group") == g]  # noqa: E731
    lines = ["# Benchmarks", "",
             f"Generated {datetime.date.today().isoformat()} by `python benchmarks/report.py` on {cpu_name()}, "
             f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB; "
             f"Python {platform.python_version()}; {versions()}. CPU only: no GPU was available for these runs.", "",
             "Inputs: the first 1,500 pairs of Anthropic's hh-rlhf harmless-base test split, tokenized with the "
             "Mistral-7B v0.1 tokenizer by TRL 1.16's rules (max_length 1024). Per-token log-probs are held-out "
             "log-probs of a real language model, an interpolated bigram/unigram model fitted on two thirds of "
             "the pairs (mean -4.0 nats/token, 1st percentile -16.6): realistic in shape, which is what decides "
             "compression. See `benchmarks/corpus.py`.", ""]

    goals = goal_lines(benches)
    if goals:
        lines += ["## Goals at a glance", "", "| goal | measured | met |", "|---|---|---|"] + goals + [""]

    reads = group("read")
    if reads:
        rate = {(param(b, "reader"), param(b, "order")): b["extra_info"]["examples"] / b["stats"]["mean"]
                for b in reads}
        ceiling = {o: rate.get(("memmap ceiling", o)) for o in ("random", "sequential")}
        lines += ["## Reading batches by example ID", "",
                  "32-example batches chosen by ID; each example's prompt, chosen and rejected token ids and both "
                  "per-token log-prob arrays. Warm page cache. `compressed` = zstd token ids + fixed-point "
                  "log-probs (the defaults); `raw` = uncompressed. The chunk cache is logitstore's LRU of decoded "
                  "chunks (128 MiB by default); the 'no chunk cache' row decodes every chunk on every read.", "",
                  "| reader | random: examples/s | vs memmap | vs zarr-python, same codec | sequential: examples/s |",
                  "|---|---:|---:|---:|---:|"]
        for name in ["memmap ceiling", "logitstore raw", "zarr-python raw", "logitstore compressed",
                     "logitstore compressed, no chunk cache", "zarr-python compressed", "pickle per batch"]:
            r, s = rate.get((name, "random")), rate.get((name, "sequential"))
            if r is None:
                continue
            codec = "compressed" if "compressed" in name else "raw"
            zp = rate.get((f"zarr-python {codec}", "random"))
            vs_zarr = f"{r / zp:.0f}x" if name.startswith("logitstore") and zp else ""
            lines.append(f"| {name} | {r:,.0f} | {r / ceiling['random']:.0%} | {vs_zarr} | {s:,.0f} |")
        names = list(dict.fromkeys(k[0] for k in rate))
        log_bars("read.png", names, [rate[(n, "random")] for n in names],
                 "examples/s, random 32-example batches (log scale)", "tab:blue")
        lines += ["", "![read throughput](img/read.png)", ""]

    cold = group("read-cold")
    if cold:
        dropped = all(b["extra_info"].get("page_cache_dropped") for b in cold)
        lines += ["### Cold page cache", "",
                  ("Each round starts after `posix_fadvise(POSIX_FADV_DONTNEED)` on every file and with a freshly "
                   "opened reader (empty chunk cache), so the data comes from disk. "
                   if dropped else "The OS could not drop the page cache here; these are warm figures. ") +
                  "Random 32-example batches.", "", "| reader | examples/s |", "|---|---:|"]
        for b in cold:
            lines.append(f"| {param(b, 'reader')} | {b['extra_info']['examples'] / b['stats']['mean']:,.0f} |")
        lines.append("")

    by_batch = group("read-batch")
    if by_batch:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        table = ["### Throughput against batch size", "", "Random batches, warm.", "",
                 "| reader | " + " | ".join(f"batch {n}" for n in sorted({b['extra_info']['batch'] for b in by_batch}))
                 + " |", "|---|" + "---:|" * len({b['extra_info']['batch'] for b in by_batch})]
        for name in dict.fromkeys(param(b, "reader") for b in by_batch):
            points = sorted((b["extra_info"]["batch"], b["extra_info"]["examples"] / b["stats"]["mean"])
                            for b in by_batch if param(b, "reader") == name)
            ax.plot(*zip(*points), marker="o", label=name)
            table.append(f"| {name} | " + " | ".join(f"{r:,.0f}" for _, r in points) + " |")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (examples)")
        ax.set_ylabel("examples/s")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(IMG / "read_batch.png", dpi=110)
        plt.close(fig)
        lines += table + ["", "![throughput against batch size](img/read_batch.png)", ""]

    sizes = group("size")
    if sizes:
        lines += ["## Per-token presets", "",
                  "Bytes per scored token of the per-token log-prob arrays alone, bytes per stored token of the "
                  "token ids (zstd), whole store per pair, and the largest error of a per-sequence sum of decoded "
                  "values against the exact float32 sum.", "",
                  "| preset | per-token values, B/token | token ids, B/token | store, B/pair | max sum error, nats |",
                  "|---|---:|---:|---:|---:|"]
        for b in sizes:
            e = b["extra_info"]
            lines.append(f"| {e['preset']} | {e['per_token_value_bytes']:.2f} | {e['token_id_bytes']:.2f} | "
                         f"{e['bytes_per_pair']:,.0f} | {e['max_sum_error']:.4f} |")
        lines.append("")

    chunks = group("chunks")
    if chunks:
        lines += ["### Choosing the inner chunk size", "",
                  "Compressed store (defaults), random 32-example batches decoding every chunk (no chunk cache): "
                  "the worst case a larger chunk makes slower. 8,192 values is the default.", "",
                  "| inner chunk (values) | per-token values, B/token | token ids, B/token | examples/s, no cache |",
                  "|---:|---:|---:|---:|"]
        for b in sorted(chunks, key=lambda b: b["extra_info"]["inner_chunk"]):
            e = b["extra_info"]
            lines.append(f"| {e['inner_chunk']:,} | {e['per_token_value_bytes']:.2f} | {e['token_id_bytes']:.2f} | "
                         f"{e['examples'] / b['stats']['mean']:,.0f} |")
        lines += ["", "Shards of 1,024 rows (the default) keep a shard's files around a megabyte at hh-rlhf lengths: "
                  "small enough that a killed build loses little, large enough that a million pairs make under a "
                  "thousand shards (docs/scaling.md).", ""]

    formats = group("formats")
    if formats:
        lines += ["## Disk size against other formats", "",
                  "The same token ids and per-token reference log-probs in each format (the first row instead "
                  "holds what the original pipeline cached: float32 logits for every position, measured on 8 "
                  "pairs). The last column scales bytes per stored token to 17k pairs of 1k tokens each "
                  "(prompt + chosen + rejected), the size of the medical data set in the original report; "
                  "it is an extrapolation.", "",
                  "| format | bytes/pair | bytes/token | 17k pairs x 1k tokens (extrapolated) |", "|---|---:|---:|---:|"]
        for b in formats:
            e = b["extra_info"]
            lines.append(f"| {param(b, 'name')} | {e['bytes_per_pair']:,.0f} | {e['bytes_per_token']:,.2f} | "
                         f"{human(e['extrapolated_17k_pairs_1k_tokens'])} |")
        log_bars("sizes.png", [param(b, "name") for b in formats],
                 [b["extra_info"]["bytes_per_token"] for b in formats], "bytes per stored token (log scale)",
                 "tab:orange")
        lines += ["", "![sizes](img/sizes.png)", ""]

    writes = group("write")
    if writes:
        b = writes[0]
        e = b["extra_info"]
        lines += ["## Writing", "",
                  f"Writing the whole corpus ({e['examples']:,} pairs, {e['tokens']:,} tokens, per-token values, "
                  f"default codecs) as a store, planning and checksums included: {e['examples'] / b['stats']['mean']:,.0f} "
                  f"pairs/s, {e['tokens'] / b['stats']['mean']:,.0f} tokens/s.", ""]

    builds = group("build")
    if builds:
        trl = next((b for b in builds if param(b, "variant").startswith("TRL")), None)
        lines += ["## Building: reference pass", "",
                  "Same model (Mistral architecture, 4 layers, hidden 256, the real 32k vocabulary; float32 on "
                  "CPU), same pairs, batch size 8, max_length 1024, each run in its own process; tokens counted as "
                  "a one-pass scorer sees them (prompt twice). Wall time from data file to stored values, "
                  "tokenization included; peak memory is the process's maximum RSS. In this model the 32k-vocabulary "
                  "LM head is most of the compute, and prompt sharing only saves transformer layers; the 'deeper "
                  "model' rows (12 layers, hidden 512, where layers dominate as in real models) measure what "
                  "prompt sharing saves there.", "",
                  "| run | pairs | tokens/s | vs TRL | peak memory |", "|---|---:|---:|---:|---:|"]
        for b in builds:
            e = b["extra_info"]
            same_model = not param(b, "variant").startswith("deeper")  # TRL ran on the small model only
            vs = f"{e['tokens_per_second'] / trl['extra_info']['tokens_per_second']:.2f}x" if trl and same_model else ""
            lines.append(f"| {param(b, 'variant')} | {e['pairs']} | {e['tokens_per_second']:,.0f} | {vs} | "
                         f"{human(e['peak_rss_bytes'])} |")
        lines.append("")

    rebuilds = group("reuse")
    if rebuilds:
        full = next((b for b in rebuilds if param(b, "variant") == "full rebuild"), None)
        e0 = rebuilds[0]["extra_info"]
        lines += ["## Rebuilding after a data change", "",
                  f"{e0['pairs']} pairs of which {e0['changed']} ({e0['changed'] / e0['pairs']:.0%}) changed (a new "
                  "first turn, so the whole pair differs); the deeper model (12 layers, hidden 512, 32k vocabulary, "
                  "float32 on CPU), batch size 8, max_length 1024, each build in its own process. Wall time is the "
                  "build call from data file to finalised store: loading the model, tokenizing every pair and "
                  "computing its content key, matching keys against the old store, copying the reused values and "
                  "writing every shard are all included. CPU time (user + system, all threads) is the whole child "
                  "process's, interpreter start and imports included, and depends much less than wall time on "
                  "other work on the machine. The old store was built beforehand from the unedited data.", "",
                  "| run | pairs through the model | pairs reused | wall time | vs full rebuild | CPU time | "
                  "vs full rebuild |", "|---|---:|---:|---:|---:|---:|---:|"]
        for b in rebuilds:
            e, f = b["extra_info"], full["extra_info"] if full else None
            vs = f"{f['seconds'] / e['seconds']:.1f}x faster" if f and b is not full else ""
            vs_cpu = f"{f['cpu_seconds'] / e['cpu_seconds']:.1f}x less" if f and b is not full else ""
            lines.append(f"| {param(b, 'variant')} | {e['pairs_scored']} | {e['reused']} | {e['seconds']:.1f} s | "
                         f"{vs} | {e['cpu_seconds']:.1f} s | {vs_cpu} |")
        lines.append("")

    steps = group("train-step")
    if steps:
        trl = next((b for b in steps if param(b, "trainer").startswith("TRL")), None)
        lines += ["## Training step", "",
                  "Same model, LoRA r=16 on all linear layers, batch 4 pairs, float32 on CPU; median step time "
                  "after the first step. TRL computes the reference each step by running the model with the "
                  "adapter disabled; logitstore reads it from the store. The gap is wider than the removed "
                  "reference forward alone (which would give about 0.6-0.7x): TRL's step on CPU also computes its "
                  "fused LM head's extra per-token outputs (entropy, top-1, mean logits) and gathers metrics; its "
                  "step time was not broken down further.", "",
                  "| trainer | step time | vs TRL | loader time per step | peak memory |", "|---|---:|---:|---:|---:|"]
        for b in steps:
            e = b["extra_info"]
            vs = f"{e['step_seconds'] / trl['extra_info']['step_seconds']:.2f}x" if trl else ""
            loader = f"{e['loader_seconds'] * 1e3:.2f} ms ({e['loader_seconds'] / e['step_seconds']:.2%})" \
                if "loader_seconds" in e else ""
            lines.append(f"| {param(b, 'trainer')} | {e['step_seconds']:.3f} s | {vs} | {loader} | "
                         f"{human(e['peak_rss_bytes'])} |")
        lines.append("")

    loader = group("loader")
    if loader:
        b = loader[0]
        e = b["extra_info"]
        lines += ["## Loader against unpickling logits", "",
                  f"One training batch from the store through `make_loader` (4 pairs, padded width "
                  f"{e['batch_width']}): {e['loader_seconds_per_batch'] * 1e3:.2f} ms. Unpickling the float32 "
                  f"logits of the same batch ({human(e['pickle_bytes'])}), as the original pipeline read them: "
                  f"{b['stats']['mean'] * 1e3:.0f} ms, {b['stats']['mean'] / e['loader_seconds_per_batch']:,.0f}x "
                  "slower.", ""]
    fingerprint = group("fingerprint")
    if fingerprint:
        size = fingerprint[0]["extra_info"]["bytes"]
        lines += ["## Fingerprinting a model", "",
                  f"Identifying a {human(size)} weight file (warm page cache). The store's fingerprint reads the "
                  "safetensors header and 16 samples of 64 KiB per file; hashing every byte is what keying a cache "
                  "on the full weights costs (TRL hashes the whole state dict at every start).", "",
                  "| method | time |", "|---|---:|"]
        for b in fingerprint:
            lines.append(f"| {param(b, 'method')} | {b['stats']['mean'] * 1e3:,.1f} ms |")
        lines.append("")
    lines += ["## Regenerate", "", "```bash", "python benchmarks/report.py", "```", "", *GPU_REGENERATE]
    return "\n".join(lines)


# How the GPU sections below are made: text of the page, since this suite does not run them.
GPU_REGENERATE = [
    "The GPU sections below come from one script on one GPU (H100 or H200): `python benchmarks/gpu.py --all` runs, "
    "in priority order within an 8-minute budget (`--budget`, model set-up included), the seed's training step and "
    "peak against TRL's default and its most frugal setting, each side's longest max length that trains within "
    "12 GiB at batch 1 (binary search), and the reference pass's MFU, 4-bit and bf16; a stage that does not fit "
    "the budget is recorded as skipped. It writes one JSON file, rewritten after every stage, and its table (under "
    "`--out`, or `$OUT`, else `benchmarks/results/`); `python benchmarks/gpu.py --render RESULTS` puts the table "
    "here. `--all --smoke` runs every stage on a tiny model on CPU (tests/test_gpu_benchmark.py).", "",
    "```bash", "python benchmarks/gpu.py --all", "python benchmarks/gpu.py --render benchmarks/results/gpu-all-<device>.json",
    "```", ""]


# Sections other scripts write between these markers (benchmarks/memory.py, benchmarks/gpu.py): carried over as
# they are, since this suite does not measure them.
KEPT = (("<!-- memory:begin -->", "<!-- memory:end -->"), ("<!-- memory-long:begin -->", "<!-- memory-long:end -->"),
        ("<!-- gpu:begin -->", "<!-- gpu:end -->"),
        ("<!-- gpu-sweep:begin -->", "<!-- gpu-sweep:end -->"), ("<!-- kto:begin -->", "<!-- kto:end -->"))



def write_section(doc: Path, section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the doc's section between those
    markers, or at its end: the sections of docs/benchmarks.md that other scripts write."""
    text = doc.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def kept_sections(old: str) -> str:
    out = []
    for begin, end in KEPT:
        if begin in old and end in old.split(begin, 1)[1]:
            out.append(begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n")
    return "".join("\n" + section for section in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", nargs="*", type=Path, help="Existing --benchmark-json files.")
    args = parser.parse_args()
    sources = args.sources or run_suite(ROOT / ".benchmarks" / "report.json")
    benches, machine = load(sources)
    DOC.write_text(render(benches, machine) + kept_sections(DOC.read_text() if DOC.exists() else ""))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
