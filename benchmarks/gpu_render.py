"""benchmarks/gpu.py's results as the docs/benchmarks.md sections (between the gpu and gpu-sweep markers), and the
targets of issue 26 computed from them: at the seed's setting, ours against TRL's peak and step; in the 12 GiB
length sweep, ours against TRL's longest max length."""

from __future__ import annotations

from typing import Any

GIB = 1 << 30
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
SWEEP_BEGIN, SWEEP_END = "<!-- gpu-sweep:begin -->", "<!-- gpu-sweep:end -->"

# Issue 26's targets: at 1,024 tokens and batch 2, ours / TRL; in the 12 GiB sweep at batch 1, ours' longest max
# length against TRL's and on its own.
PEAK_TARGET, STEP_TARGET = 0.85, 0.78
LENGTH_RATIO_TARGET, LENGTH_TARGET = 4.0, 16384
OURS_RUNS = {"train_logitstore": "logitstore train", "train_logitstore_memory": "logitstore train + memory options"}
TRL_RUNS = {"train_trl": "TRL default", "train_trl_frugal": "TRL most frugal"}


def problem(r: dict | None) -> str | None:
    """Why a stage has no figures ("not run", "out of memory", "skipped: budget", "failed: ..."), or None."""
    if not r:
        return "not run"
    status = r.get("status", "ok")
    if status == "ok":
        return f"failed: {r['error']}" if "error" in r else None
    if status == "failed":
        return f"failed: {r.get('error', '?')}"
    return status


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def targets(results: dict) -> dict:
    """Every ours / TRL ratio the results allow, each against its target (met: None where a figure is missing)."""
    seed = []
    for ours, ours_label in OURS_RUNS.items():
        for trl, trl_label in TRL_RUNS.items():
            o, t = results.get(ours), results.get(trl)
            if problem(o) or problem(t):
                continue
            peak = _ratio(o.get("peak_allocated_gib"), t.get("peak_allocated_gib"))
            step = _ratio(o.get("step_seconds"), t.get("step_seconds"))
            seed.append({"ours": ours_label, "trl": trl_label, "peak_ratio": peak, "peak_target": PEAK_TARGET,
                         "peak_met": None if peak is None else peak <= PEAK_TARGET, "step_ratio": step,
                         "step_target": STEP_TARGET, "step_met": None if step is None else step <= STEP_TARGET})
    out: dict[str, Any] = {"seed": seed}
    sweep = results.get("sweep")
    if sweep:
        ours, trl = sweep["logitstore"].get("longest_fits"), sweep["trl"].get("longest_fits")
        ratio = _ratio(ours, trl)
        out["sweep"] = {"longest_logitstore": ours, "longest_trl": trl, "ratio": ratio,
                        "ratio_target": LENGTH_RATIO_TARGET, "length_target": LENGTH_TARGET,
                        "ratio_met": None if ratio is None else ratio >= LENGTH_RATIO_TARGET,
                        "length_met": None if ours is None else ours >= LENGTH_TARGET,
                        "bounds": {side: sweep[side].get("bound") for side in ("logitstore", "trl")}}
    return out


def _f(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _x(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _met(flag: bool | None) -> str:
    return {True: "met", False: "not met", None: "n/a"}[flag]


def render(results: dict) -> str:
    """The gpu section: the reference pass, the training step at the seed's setting, the targets there."""
    s = results["setup"]
    model = results.get("make_model", {})
    lines = [
        BEGIN,
        f"## On a GPU: Mistral-7B-v0.1's architecture on one {results['device']}",
        "",
        f"Measured by `python benchmarks/gpu.py{' --all' if results.get('mode') == 'all' else ''}` (torch "
        f"{results['torch']}, transformers {results.get('transformers', '?')}, TRL {results.get('trl', '?')}): a "
        f"model with Mistral-7B-v0.1's exact config ({model.get('parameters', 0) / 1e9:.2f} B parameters, random "
        f"weights, nothing downloaded), {s['pairs']} synthetic pairs whose every sequence reaches the "
        f"{s['max_length']}-token limit. Each stage ran in its own process; memory is PyTorch's peak for that process "
        "(allocated / reserved by its caching allocator) and the device memory in use at its end (CUDA context "
        "included).",
        "",
    ]
    lines += _training_lines(results)
    lines += _reference_lines(results)
    lines += _breakdown_lines(results)
    lines.append(END)
    return "\n".join(lines) + "\n"


def _training_lines(results: dict) -> list[str]:
    s = results["setup"]
    options = results.get("ours_options")
    used = "not recorded" if options is None else " ".join(options["used"]) or "none in this CLI"
    lines = [f"**Training step**, the seed's setup ({s['quantization']}; LoRA {s['lora']}; max length "
             f"{s['max_length']}; batch {s['batch_size']}; gradient checkpointing; {s['optimizer']}), median of steps "
             f"2-{s['steps']}. TRL most frugal adds `precompute_ref_log_probs=True` and, on a GPU, "
             "`activation_offloading=True`; logitstore's memory options: "
             f"`{used}`.", "",
             "| trainer | step s | peak alloc GiB | peak reserved GiB | device used GiB | step-0 loss |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = {"train_logitstore": "logitstore train (reference from the store)",
              "train_logitstore_memory": "logitstore train + memory options",
              "train_trl": "TRL DPOTrainer + peft, default (reference = adapter off)",
              "train_trl_frugal": "TRL DPOTrainer + peft, most frugal"}
    for key, label in labels.items():
        r = results.get(key)
        if problem(r):
            lines.append(f"| {label} | {problem(r)} | | | | |")
            continue
        lines.append(f"| {label} | {r['step_seconds']:.3f} | {_f(r.get('peak_allocated_gib'))} | "
                     f"{_f(r.get('peak_reserved_gib'))} | {_f(r.get('device_used_at_end_gib'))} | "
                     f"{r['loss_first']:.4f} |")
    pairs = targets(results)["seed"]
    if pairs:
        lines += ["", f"Against the targets (peak <= {PEAK_TARGET}x TRL's, step <= {STEP_TARGET}x):", "",
                  "| ours | against | peak ratio | target | step ratio | target |", "|---|---|---:|---|---:|---|"]
        lines += [f"| {p['ours']} | {p['trl']} | {_x(p['peak_ratio'])} | {_met(p['peak_met'])} | "
                  f"{_x(p['step_ratio'])} | {_met(p['step_met'])} |" for p in pairs]
    store = results.get("store_seed") or results.get("reference_4bit") or {}
    if "build_seconds" in store:
        lines += ["", f"The 4-bit store of the {s['pairs']} pairs was built end to end by `build` in "
                      f"{store['build_seconds']:.1f} s (model load included)."]
    return lines + [""]


def _reference_lines(results: dict) -> list[str]:
    ref16, ref4 = results.get("reference_bf16"), results.get("reference_4bit")
    lines = ["**Reference pass** (`score_rows`: batches of up to 8 pairs / 16,384 tokens; one pass over "
             "prompt+completion, the default, and with prompt sharing through the KV cache; model FLOPs count only "
             "unpadded positions and the LM head at scored ones; MFU against the GPU's dense bf16 peak):", "",
             "| precision | load s | positions/s | scored tokens/s | model TFLOP/s | MFU | positions/s, prompt sharing "
             "| peak alloc GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in (("bf16", ref16), ("4-bit NF4", ref4)):
        if problem(r) or "positions_per_second" not in r:
            lines.append(f"| {label} | {problem(r) or 'not measured'} | | | | | | |")
            continue
        speedup = r["positions_per_second_no_sharing"] / r["positions_per_second"]  # same work, other time
        tflops = r.get("model_tflops_per_second_no_sharing", r["model_tflops_per_second"] * speedup)
        mfu = r.get("mfu_no_sharing", r["mfu"] and r["mfu"] * speedup)
        lines.append(f"| {label} | {r['load_seconds']:.1f} | {r['positions_per_second_no_sharing']:,.0f} | "
                     f"{r['scored_tokens_per_second'] * speedup:,.0f} | {tflops:.1f} | "
                     f"{_f(mfu and 100 * mfu, '.1f')}% | {r['positions_per_second']:,.0f} | "
                     f"{_f(r.get('peak_allocated_gib'))} |")
    if not problem(ref4) and "sharing_max_abs_delta" in ref4:
        delta, mean = ref4["sharing_max_abs_delta"], ref4["mean_abs_sequence_logp"]
        bf16 = (ref16 or {}).get("sharing_max_abs_delta")
        lines += ["", f"Precision noise floor: scoring the same 4-bit pairs with prompt sharing (KV cache) and in one "
                      f"pass gives sums up to {delta:.2f} nats apart (bf16: {_f(bf16)}), on sequence sums averaging "
                      f"{mean:,.0f} nats ({delta / mean:.1e} relative; random weights make every token cost about "
                      "ln 32000): the bf16 floor between any two batchings, which is why a bf16 step-0 loss may sit "
                      "a little off ln 2. In float32 the step-0 loss is ln 2 within 1e-5 (tests/test_train.py)."]
    return lines


def _breakdown_lines(results: dict) -> list[str]:
    b_ours = (results.get("breakdown_logitstore") or {}).get("breakdown", {})
    b_trl = (results.get("breakdown_trl") or {}).get("breakdown", {})
    if not (b_ours.get("pieces") and b_trl.get("pieces")):
        return []
    names = sorted(set(b_ours["pieces"]) | set(b_trl["pieces"]))
    lines = ["", "**Where the peak goes** (`torch.cuda.memory._record_memory_history` over two steps; the "
                 "allocations live at the largest instant of the trace, by the Python frames they were made under; "
                 "GiB):", "", "| piece | logitstore | TRL + peft |", "|---|---:|---:|",
             f"| held before the steps (weights, adapter) | {b_ours['before_recording_bytes'] / GIB:.2f} | "
             f"{b_trl['before_recording_bytes'] / GIB:.2f} |"]
    return lines + [f"| {n} | {b_ours['pieces'].get(n, 0) / GIB:.2f} | {b_trl['pieces'].get(n, 0) / GIB:.2f} |"
                    for n in names]


def _cell(r: dict | None) -> str:
    if r is None:
        return "not probed"
    if problem(r):
        return problem(r)
    return f"fits: {_f(r.get('peak_allocated_gib'))} GiB, {r['step_seconds']:.2f} s/step"


def _longest(side: dict) -> str:
    longest, bound = side.get("longest_fits"), side.get("bound")
    text = f"{longest:,}" if longest else "none"
    if bound == "top of range":
        return text + " (the top of its range: longer not tried)"
    if bound == "none fits":
        return f"none (not even {side['candidates'][0]:,})"
    if side.get("shortest_fails"):
        text += f" ({side['shortest_fails']:,} did not fit)"
    if not side.get("complete"):
        text += f"; search stopped: {side.get('stopped', '?')}"
    return text


def render_sweep(results: dict) -> str:
    """The gpu-sweep section: each side's binary search for the longest max length that trains within the cap."""
    sw = results["sweep"]
    ours, trl = sw["logitstore"], sw["trl"]
    cap = (f"held to {sw['cap_gib']} GiB (`torch.cuda.set_per_process_memory_fraction`: a 12 GB card less its CUDA "
           "context)" if sw.get("cap_gib") else "without a memory cap")
    lines = [SWEEP_BEGIN, f"**Length headroom** on one {results['device']} {cap}, the seed's setup at "
             f"batch {sw['batch_size']}, {sw['steps']} steps per length, every sequence at the limit; each side's "
             "longest max length found by binary search, each length in its own process; `python benchmarks/gpu.py "
             f"--max-length-sweep` (or `--all`). logitstore with `{' '.join(ours.get('options', [])) or 'no options'}`"
             f"; TRL with {', '.join(k + '=' + str(v) for k, v in trl.get('trl_options', {}).items())}.", "",
             "| max length | logitstore | TRL + peft |", "|---:|---|---|"]
    lengths = sorted({int(k) for k in ours.get("probes", {})} | {int(k) for k in trl.get("probes", {})})
    lines += [f"| {n:,} | {_cell(ours['probes'].get(str(n)))} | {_cell(trl['probes'].get(str(n)))} |"
              for n in lengths]
    t = targets(results)["sweep"]
    lines += ["", f"Longest that fits: logitstore {_longest(ours)}; TRL {_longest(trl)}."]
    if t["ratio"] is not None:
        # A side at the top of its range fits longer than it shows: the ratio is then a bound, not a figure.
        bound = (" (at most: TRL's range ended first)" if trl.get("bound") == "top of range" else
                 " (at least: logitstore's range ended first)" if ours.get("bound") == "top of range" else "")
        lines.append(f"Ratio {t['ratio']:.1f}x{bound} (target >= {LENGTH_RATIO_TARGET:.0f}x: {_met(t['ratio_met'])}); "
                     f"logitstore's longest against {LENGTH_TARGET:,}: {_met(t['length_met'])}.")
    lines.append(SWEEP_END)
    return "\n".join(lines) + "\n"


def render_all(results: dict) -> str:
    """Every section the results have, as they go into docs/benchmarks.md."""
    parts = []
    if any(k in results for k in (*OURS_RUNS, *TRL_RUNS, "reference_4bit", "reference_bf16")):
        parts.append(render(results))
    if "sweep" in results:
        parts.append(render_sweep(results))
    return "\n".join(parts)
