"""The `logitstore` command. Commands are thin: they parse options and call the library.

Errors: a LogitstoreError (or a bad input caught by the library) prints one line and exits 1; usage errors exit 2
(click's convention); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from logitstore.dpo.choices import OPTIMIZERS, QUANTIZATIONS, SCHEDULES
from logitstore.dpo.model.loading import DTYPES
from logitstore.dpo.objectives.objective import (F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSS_TYPES, TEACHER_LOSSES,
                                      UNPAIRED_LOSS_TYPES)
from logitstore import format as fmt
from logitstore.export import FORMATS as EXPORT_FORMATS
from logitstore.topk_codec import PRESETS as TOPK_PRESETS

from . import launcher
from .config_file import config_option

_DEBUG = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _DEBUG
    _DEBUG = _DEBUG or value


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show the full traceback on errors.")


def _storage_options(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        key, value = pair.split("=", 1)
        out[key] = value
    return out or None


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Under --quiet only errors and the command's own lines (whether it resumed, the result) reach the terminal:
    no progress bar of ours, transformers' (loading weights) or huggingface_hub's (downloads), and no library
    warning or log line."""
    if not quiet:
        yield
        return
    import logging
    import os
    import warnings

    os.environ["TQDM_DISABLE"] = "1"  # tqdm bars made without an explicit `disable=`
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars, transformers_bars = not are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    logging.disable(logging.WARNING)  # every library's log records up to WARNING; errors still show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FutureWarnings and UserWarnings of transformers, peft, bitsandbytes
            yield
    finally:  # the command is over; callers in the same process (tests) get their output back
        logging.disable(logging.NOTSET)
        if transformers_bars:
            transformers_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


def _loss_types(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from logitstore.dpo.objectives.objective import UNPAIRED_LOSS_TYPES, ObjectiveError, parse_loss_types

    if any(t.strip() in UNPAIRED_LOSS_TYPES for t in value.split(",")):
        return value.strip()  # checked with the other options by objective_of
    try:
        return ",".join(parse_loss_types(value))
    except ObjectiveError as exc:
        raise click.BadParameter(str(exc)) from None


def _report_to(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from logitstore.dpo.training.trackers import TrackerError, parse_report_to

    try:
        return parse_report_to(value)
    except TrackerError as exc:
        raise click.BadParameter(str(exc)) from None


def _float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from None


storage_option = click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                              callback=_storage_options, help="fsspec option for s3:// and other URLs (repeatable).")
expect_digest_option = click.option("--expect-digest", metavar="SHA256",
                                    help="Refuse the store unless its digest (printed by build and info) is this.")


def _json(value: Any) -> str:
    """JSON that every parser accepts: NaN and infinities become null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)


revision_option = click.option("--revision", help="Branch, tag or commit of a Hub --model (default: main).")
adapter_revision_option = click.option("--adapter-revision", help="Branch, tag or commit of a Hub --adapter.")
dtype_option = click.option(
    "--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
    help="auto: float32 on CPU; on a GPU the checkpoint's bfloat16/float16 where the GPU has it (also the 4-bit "
         "compute dtype).")
attention_option = click.option(
    "--attn-implementation", type=click.Choice(["sdpa", "eager", "flash_attention_2"]), default="sdpa",
    show_default=True, help="flash_attention_2 needs the flash-attn package and a CUDA GPU.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="logitstore")
@debug_option
def cli() -> None:
    """Build, check and train from stores of DPO reference log-probabilities.

    \b
    Examples:
      logitstore demo --out demo-out
      logitstore build --model ./mistral-7b --data pairs.jsonl --out pairs.lstore
      logitstore train --model ./mistral-7b --store pairs.lstore --out run --max-steps 1000
    """


class UsageLine(click.ClickException):
    """A usage error found past option parsing (it needs the model's config): one line, exit status 2."""

    exit_code = 2


def _kl_batch(value: int) -> int:
    if value < 2:
        raise click.BadParameter(f"{value}: KTO's KL term needs batches of at least 2 (TRL refuses a per-device "
                                 "batch size of 1: the KL term would equal the reward)", param_hint="--kl-batch-size")
    return value


@cli.command()
@click.option("--model", required=True, help="Causal LM: a local folder or a Hugging Face Hub name.")
@revision_option
@click.option("--data", required=True, type=click.Path(), help="JSONL(.gz), Parquet, or a datasets folder.")
@click.option("--out", required=True, help="Store folder or fsspec URL (s3://bucket/path).")
@click.option("--adapter", help="peft LoRA folder or Hub name applied to the model (e.g. an SFT adapter).")
@adapter_revision_option
@dtype_option
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), help="Load the reference in bitsandbytes NF4.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option("--device-map", type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
              help="For a reference larger than one device: spread its layers over this machine's GPUs (accelerate's "
              "big-model inference), then the CPU, then disk, in one process.")
@click.option("--max-memory", multiple=True, metavar="DEVICE=SIZE",
              help="With --device-map: the most to place on a device, e.g. 0=70GiB, cpu=200GiB (repeatable).")
@attention_option
@click.option("--split", help="Split of a datasets folder.")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Tokens of prompt + completion (TRL's default); completions are cut at the end.")
@click.option("--max-prompt-length", type=click.IntRange(min=1), help="Keep only the last N prompt tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most pairs per forward pass (pairs are batched by length, also under --batch-tokens).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Token budget per batch (chosen + rejected, padded).")
@click.option("--per-token", is_flag=True, help="Also store per-token log-probs.")
@click.option("--codec", type=click.Choice(fmt.LOGP_CODECS), default="fixed", show_default=True,
              help="Per-token codec preset (docs/FORMAT.md).")
@click.option("--token-codec", type=click.Choice(fmt.TOKEN_CODECS), default="zstd", show_default=True,
              help="Codec of the stored token ids: zstd, or raw (uncompressed).")
@click.option("--rows-per-shard", type=click.IntRange(min=1),
              help=f"Pairs per shard, the unit a build commits (an interruption loses at most the shard in progress). "
              f"Default: about {fmt.SHARD_POSITIONS:,} positions through the model per shard, {fmt.MIN_BUILD_ROWS} to "
              f"{fmt.ROWS_PER_SHARD} pairs, from the data's lengths.")
@click.option("--prompt-sharing/--no-prompt-sharing", "share_prompt", default=False, show_default=True,
              help="Run each prompt once and score both completions from its KV cache, where that saves padded "
              "positions. Off by default: one pass over prompt+completion measured faster on GPU and CPU "
              "(docs/benchmarks.md).")
@click.option("--no-length-bucketing", "length_bucketing", flag_value=False, default=True,
              help="Batch pairs in data order instead of by length.")
@click.option("--skip-invalid", is_flag=True, help="Leave out invalid pairs (recorded in the store) instead of "
              "stopping.")
@click.option("--kl-batch-size", type=int, default=8, show_default=True, callback=lambda ctx, param, v: _kl_batch(v),
              help="Unpaired data (prompt/completion/label): KTO's KL completions are paired within chunks of this "
                   "many examples, as TRL's KTOTrainer pairs them within per_device_train_batch_size; train with "
                   "this batch size.")
@click.option("--reuse", multiple=True, metavar="STORE", help="Copy the values of pairs with the same content "
              "(token ids) from this store, built with the same model, adapter and precision; only the other pairs "
              "run through the model (repeatable).")
@click.option("--top-k", type=int, metavar="K", help="Also store the reference's K most likely next tokens, their "
              "log-probs and the log of the remaining mass at every scored completion position (teacher records for "
              "distillation; docs/teacher.md).")
@click.option("--topk-codec", type=click.Choice(list(TOPK_PRESETS)),
              default="sqrt", show_default=True, help="Value preset of --top-k records: sqrt(p) within 2^-7 / 2^-6 "
              "(sqrt, sqrt-compact: the fewest bytes for a distillation record's fidelity); log-prob fixed point "
              "within 0.00049 / 0.0078 / 0.0625 nats (fine, standard, compact); exact (float32). sqrt levels are "
              "coarse in nats at small p: close small probabilities (a near-uniform model's) decode equal; "
              "docs/teacher.md.")
@click.option("--sample-k", type=int, metavar="K", help="Instead of --top-k: K draws per position from the reference's "
              "distribution, kept as distinct ids with counts (Sparse Logit Sampling).")
@click.option("--seed", type=click.IntRange(min=0, max=(1 << 63) - 1), default=0, show_default=True,
              help="Seed of --sample-k draws (a row side's draws depend on the seed, the row and the side only).")
@storage_option
@click.option("--quiet", is_flag=True, help="Print only errors, whether it resumed, and the final line.")
@config_option
@debug_option
def build(quiet: bool, **options: Any) -> None:
    """Run the reference model over the data once and store its log-probs.

    The data's columns say the store's kind, as TRL reads them: prompt/chosen/rejected pairs (DPO),
    prompt/completion/label (KTO, BCO), or prompt/completion without a label (a completion store, for distillation).

    Interrupted builds resume: run the same command again. Shards are committed one by one, so Ctrl-C or a crash
    loses at most the shard in progress (see --rows-per-shard).

    \b
    Examples:
      logitstore build --model ./tiny --data pairs.jsonl --out pairs.lstore
      logitstore build --model mistralai/Mistral-7B-v0.1 --quantize 4bit --data pairs.jsonl --out pairs.lstore
      logitstore build --model ./mistral-7b --adapter ./sft-lora --quantize 4bit \\
          --data hh.parquet --out s3://bucket/hh.lstore --per-token --codec fixed
      logitstore build --model ./tiny --data pairs-v2.jsonl --out pairs-v2.lstore --reuse pairs.lstore
      torchrun --nproc_per_node 4 --no-python logitstore build --model M --data D --out S
      logitstore build --model ./tiny --data thumbs.jsonl --out kto.lstore --kl-batch-size 8
      logitstore build --model ./llama-70b --device-map auto --max-memory 0=75GiB --max-memory 1=75GiB \\
          --data pairs.jsonl --out pairs.lstore
      logitstore build --model ./tiny --data pairs.jsonl --out distill.lstore --top-k 32 --per-token
      logitstore build --model ./tiny --data prompt-completion.jsonl --out sft.lstore --top-k 32
      logitstore build --model ./tiny --data pairs.jsonl --out sampled.lstore --sample-k 12 --seed 1
    """
    from logitstore.dpo.reference import BuildConfig, build as run_build, check_teacher
    from logitstore.teacher import TeacherError

    options["max_memory"] = tuple(options["max_memory"])
    cfg = BuildConfig(**options)
    try:
        check_teacher(cfg)  # K against the model's vocabulary and the codec: a usage error, before anything is read
    except TeacherError as exc:
        raise UsageLine(str(exc)) from None

    with _quiet(quiet):
        result = run_build(cfg, progress=not quiet, log=click.echo)
    # One final line, which --quiet keeps; the digest is the finalising writer's (rank 0's), never one read back.
    digest = f" Store digest: {result.digest}" if result.digest is not None else ""
    click.echo(f"{result.summary()}{digest}")


@cli.command()
@click.argument("store")
@click.option("--model", help="Recompute a sample with this model (local folder or Hub name).")
@revision_option
@click.option("--data", type=click.Path(), help="The data the store was built from (with --model).")
@click.option("--adapter", help="The adapter the store was built with (local folder or Hub name).")
@adapter_revision_option
@click.option("--sample", type=click.IntRange(min=1), default=16, show_default=True,
              help="Pairs to recompute with --model.")
@click.option("--tolerance", type=float, default=1e-3, show_default=True, help="Nats per sequence sum.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@expect_digest_option
@storage_option
@debug_option
def verify(store: str, model: str | None, revision: str | None, data: str | None, adapter: str | None,
           adapter_revision: str | None, sample: int, tolerance: float, as_json: bool, expect_digest: str | None,
           storage_options: dict[str, Any] | None) -> None:
    """Check a store: structure, completeness, every checksum, sane values.

    Exit status: 0 sound; 1 problems found, or no store at STORE; 2 usage error (an unknown or missing option).

    \b
    Examples:
      logitstore verify pairs.lstore
      logitstore verify pairs.lstore --model ./tiny --data pairs.jsonl --sample 32
      logitstore verify pairs.lstore --expect-digest 3f2a...c9
    """
    import logitstore

    if (model is None) != (data is None):
        raise click.UsageError("--model and --data go together")
    report = logitstore.verify(store, storage_options=storage_options, digest=expect_digest)
    if model is not None and data is not None and report.ok:
        from logitstore.dpo.reference import recompute_sample

        opened = logitstore.open(store, storage_options=storage_options, digest=expect_digest)
        report.problems += recompute_sample(opened, model, data, adapter=adapter, revision=revision,
                                            adapter_revision=adapter_revision, sample=sample, tolerance=tolerance)
    if as_json:
        click.echo(_json(report.as_dict()))
    else:
        from logitstore.errors import printable

        click.echo(printable(f"{report.path}: {report.examples} examples, {report.committed_shards}/{report.shards} "
                             f"shards, {report.files_checked} files checked"))
        for problem in report.problems:
            click.echo(f"  problem: {printable(problem)}")
        click.echo("sound" if report.ok else f"{len(report.problems)} problem(s) found")
    sys.exit(0 if report.ok else 1)


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@expect_digest_option
@storage_option
@debug_option
def info(store: str, as_json: bool, expect_digest: str | None, storage_options: dict[str, Any] | None) -> None:
    """Describe a store: size, completeness, fields, fingerprint, settings.

    \b
    Examples:
      logitstore info pairs.lstore
      logitstore info pairs.lstore --json | jq .bytes
      logitstore info pairs.lstore --expect-digest 3f2a...c9
    """
    import logitstore
    from logitstore.describe import describe, render

    summary = describe(logitstore.open(store, storage_options=storage_options, digest=expect_digest))
    click.echo(_json(summary) if as_json else render(summary))


@cli.command()
@click.argument("store")
@click.option("--to", "to", type=click.Choice(EXPORT_FORMATS), required=True,
              help="trl: a datasets folder for TRL's DPOTrainer; parquet: one file.")
@click.option("--data", required=True, type=click.Path(), help="The data the store was built from.")
@click.option("--split", help="Split of a datasets folder given as --data (default: its only split).")
@click.option("--out", required=True, type=click.Path(), help="Output folder (trl) or file.")
@expect_digest_option
@storage_option
@debug_option
def export(store: str, to: str, data: str, split: str | None, out: str, expect_digest: str | None,
           storage_options: dict[str, Any] | None) -> None:
    """Write the data with `ref_chosen_logps`/`ref_rejected_logps` columns (an unpaired store: TRL KTOTrainer's
    `ref_logps`/`ref_KL_logps`), matched by example ID.

    \b
    Examples:
      logitstore export pairs.lstore --to trl --data pairs.jsonl --out pairs-trl
      logitstore export pairs.lstore --to parquet --data pairs.jsonl --out pairs.parquet
      logitstore export kto.lstore --to trl --data thumbs.jsonl --out kto-trl
    """
    import logitstore
    from logitstore.export import export as run_export

    from logitstore.dpo import kinds

    opened = logitstore.open(store, storage_options=storage_options, digest=expect_digest)
    records = kinds.of_store(opened).export_records(opened, data, split)
    result = run_export(opened, records, to, out)
    left = f" ({result['left_out']} data rows not in the store left out)" if result["left_out"] else ""
    click.echo(f"Wrote {result['rows']} rows to {result['out']}{left}.")


@cli.command()
@click.argument("store")
@click.option("--out", required=True, help="New store folder or fsspec URL.")
@click.option("--ids", "ids_file", type=click.Path(), help="File of example IDs to keep, one per line.")
@click.option("--exclude-ids", "exclude_file", type=click.Path(), help="File of example IDs to leave out, one per "
              "line.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), help="Default: the source's.")
@expect_digest_option
@storage_option
@debug_option
def subset(store: str, out: str, ids_file: str | None, exclude_file: str | None, rows_per_shard: int | None,
           expect_digest: str | None, storage_options: dict[str, Any] | None) -> None:
    """Write a new store with some of a store's pairs, copied without the model.

    Pairs keep the source's order and every stored bit. Interrupted runs resume: run the same command again.

    \b
    Examples:
      logitstore subset pairs.lstore --out clean.lstore --exclude-ids flagged.txt
      logitstore subset pairs.lstore --out eval.lstore --ids eval-ids.txt
      logitstore subset shared.lstore --out mine.lstore --ids mine.txt --expect-digest 3f2a...c9
    """
    from logitstore.derive import read_id_file, subset as run_subset

    if (ids_file is None) == (exclude_file is None):
        raise click.UsageError("give exactly one of --ids and --exclude-ids")
    listed = read_id_file(ids_file or exclude_file)  # type: ignore[arg-type]
    result = run_subset(store, out, ids=listed if ids_file else None, exclude=listed if exclude_file else None,
                        rows_per_shard=rows_per_shard, storage_options=storage_options,
                        digest=expect_digest)
    click.echo(result.summary())


@cli.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="New store folder or fsspec URL.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), help="Default: the first store's.")
@click.option("--expect-digest", "expect_digests", multiple=True, metavar="SHA256",
              help="Refuse the stores unless their digests (printed by build and info) are these: one per store, "
              "in order (repeatable).")
@storage_option
@debug_option
def merge(stores: tuple[str, ...], out: str, rows_per_shard: int | None, expect_digests: tuple[str, ...],
          storage_options: dict[str, Any] | None) -> None:
    """Write one store with the pairs of several, copied without the model.

    The stores must come from the same model, adapter, precision, tokenizer and tokenization. Pairs keep their
    order, store after store; an ID in two stores with the same content is kept once, with different content it
    is refused. Interrupted runs resume: run the same command again.

    \b
    Examples:
      logitstore merge part-1.lstore part-2.lstore --out all.lstore
      logitstore merge old.lstore new-pairs.lstore --out grown.lstore --rows-per-shard 4096
    """
    from logitstore.derive import merge as run_merge

    if expect_digests and len(expect_digests) != len(stores):
        raise click.UsageError(f"give one --expect-digest per store ({len(stores)}), in order, or none")
    result = run_merge(list(stores), out, rows_per_shard=rows_per_shard,
                       storage_options=storage_options, digests=list(expect_digests) or None)
    click.echo(result.summary())


@cli.command()
@click.option("--model", required=True, help="Policy base model (the store's): a local folder or a Hub name.")
@revision_option
@click.option("--store", required=True, help="Training store.")
@click.option("--out", required=True, type=click.Path(), help="Run folder.")
@click.option("--eval-store", help="Store to evaluate on.")
@click.option("--adapter", help="Continue training this peft adapter (local folder or Hub name).")
@adapter_revision_option
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (default: --epochs over the store).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Passes over the store (without --max-steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Pairs per micro-batch, all processes together: each of N torchrun ranks takes batch-size / N.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per optimizer step.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Steps of linear warmup to --lr.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", show_default=True,
              help="Learning rate after warmup.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="paged_adamw_8bit keeps Adam's moments in 8 bits (bitsandbytes, the quantize extra).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW's decoupled weight decay.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True,
              help="Clip the gradient norm to this (0: no clipping).")
@click.option("--beta", type=float, default=0.1, show_default=True, help="Strength of the pull to the reference "
              "(IPO's τ for ipo).")
@click.option("--loss", default="sigmoid", show_default=True, callback=_loss_types, metavar="TYPE[,TYPE...]",
              help="TRL 1.16's loss type, or several separated by commas, summed with --loss-weights: "
              f"{', '.join(LOSS_TYPES)} (papers in docs/api.md). On a store built with --top-k (distill also "
              f"--sample-k), combinable with those: {', '.join(TEACHER_LOSSES)} (docs/teacher.md). On an unpaired "
              f"store: {', '.join(UNPAIRED_LOSS_TYPES)} (KTO, its APO-zero variant, BCO).")
@click.option("--desirable-weight", type=float, default=1.0, show_default=True, help="Unpaired losses: weight of "
              "the desirable (label true) examples' losses, as TRL's KTOConfig.")
@click.option("--undesirable-weight", type=float, default=1.0, show_default=True, help="Unpaired losses: weight of "
              "the undesirable (label false) examples' losses.")
@click.option("--loss-weights", callback=_float_list, metavar="W[,W...]", help="One weight per --loss type (default "
              "1 each); MPO (arXiv:2411.10442) is --loss sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0.")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True, help="Probability that a label is "
              "flipped: robust (Chowdhury et al. 2024, arXiv:2403.00409; below 0.5), exo_pair (Ji et al. 2024, "
              "arXiv:2402.00856; above 0, the paper uses 1e-3), aot and aot_unpaired; refused for other losses.")
@click.option("--f-divergence", type=click.Choice(F_DIVERGENCES), default="reverse_kl", show_default=True,
              help="f-DPO's divergence to the reference (Wang et al. 2023, arXiv:2309.16240); other than reverse_kl "
              f"only with {', '.join(F_DIVERGENCE_LOSSES)}.")
@click.option("--f-alpha", "f_alpha_coef", type=float, help="α of --f-divergence alpha_divergence (default 0.5).")
@click.option("--ld-alpha", type=float, help="LD-DPO (Liu et al. 2024, arXiv:2409.06411): weight in [0, 1] of the "
              "longer completion's tokens past the pair's shared length. Needs a store built with --per-token; any "
              "value is served from the same store.")
@click.option("--use-weighting", is_flag=True, help="WPO (Zhou et al. 2024, arXiv:2406.11827): weight each pair by "
              "the policy's length-normalised probability of both completions.")
@click.option("--discopop-tau", type=float, help="τ of the discopop loss (DiscoPOP, Lu et al. 2024, "
              "arXiv:2406.08414; default 0.05).")
@click.option("--distill-beta", type=float, help="distill's divergence to the stored teacher, TRL's "
              "DistillationTrainer beta: 0 forward KL, 1 reverse KL, between the generalized JSD (default 1.0 as "
              "TRL; 0, the only one it estimates, on a --sample-k store).")
@click.option("--tdpo-alpha", type=float, help="α of tdpo2, the weight of the sequential KL difference (TDPO, Zeng "
              "et al. 2024, arXiv:2404.11999; default 0.5).")
@click.option("--lora/--no-lora", default=True, show_default=True, help="--no-lora trains every weight instead of a "
              "LoRA adapter (not with --quantize); the store replaces the reference model's copy.")
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=click.IntRange(min=1), default=16, show_default=True,
              help="LoRA scaling numerator (the update is scaled by alpha / r).")
@click.option("--lora-dropout", type=float, default=0.05, show_default=True, help="Dropout on the LoRA input, in effect "
              "with --keep-dropout.")
@click.option("--disable-dropout/--keep-dropout", default=True, show_default=True, help="Dropout off in the policy, "
              "as TRL's DPOTrainer does by default (disable_dropout): no dropped copies held for backward.")
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated or all-linear.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), help="Train LoRA on the model in bitsandbytes NF4 "
              "(QLoRA).")
@dtype_option
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@attention_option
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass: less "
              "memory, same loss.")
@click.option("--split-sequences", is_flag=True, help="Memory for step time: forward and backward each sequence "
              "(chosen, rejected, ...) on its own, after a no-gradient pass for the values the loss reads; same loss "
              "and gradients, one sequence's activations live at a time. Measured on CPU (12 x 512 model, batch 2, "
              "with --gradient-checkpointing): +21% step time at 512 tokens; peak 2.52 GiB instead of 3.85 GiB at "
              "2,048 tokens (1.97 GiB with --mlp-chunk 256).")
@click.option("--mlp-chunk", type=click.IntRange(min=1), metavar="N", help="Memory for step time: each layer's MLP "
              "over the sequence in chunks of N tokens, each recomputed in the backward pass (Mini-Sequence "
              "Transformer); same loss and gradients. Measured as --split-sequences: +2% step time at 512 tokens; "
              "peak 3.76 GiB instead of 3.85 GiB at 2,048 tokens.")
@click.option("--offload-activations", is_flag=True, help="GPU only: what the forward pass keeps for backward (the "
              "layer checkpoints with --gradient-checkpointing) waits in pinned CPU memory, as TRL's "
              "activation_offloading; costs the copies' time. Refused on the CPU.")
@click.option("--group-by-length", is_flag=True, help="Batch similar lengths together (less padding).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes reading the store (0: the training process reads).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the LoRA init, dropout and batch "
              "order.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Log every N optimizer steps, and the first and the last.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate on --eval-store every N steps (0: only at the end).")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write a checkpoint every N steps, for --resume (0: none).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--allow-fingerprint-mismatch", is_flag=True, help="Train even if the store's model differs.")
@expect_digest_option
@storage_option
@click.option("--report-to", multiple=True, callback=_report_to, metavar="NAME[,NAME...]",
              help="Also send every logged step to tensorboard, trackio or wandb (repeatable, or separated by "
              "commas; none: only metrics.jsonl, the default), with TRL's metric names; each needs the extra of its "
              "name, e.g. pip install 'logitstore[tensorboard]' (docs/api.md, \"Experiment tracking\").")
@click.option("--quiet", is_flag=True, help="Print only errors, whether it resumed, and the final line.")
@config_option
@debug_option
def train(**kw: Any) -> None:
    """Train a LoRA policy (or every weight, --no-lora) with DPO against the reference log-probs in a store, or
    distill it from the teacher records of a store built with --top-k / --sample-k.

    \b
    Examples:
      logitstore train --model ./tiny --store pairs.lstore --out run --max-steps 100
      logitstore train --model mistralai/Mistral-7B-v0.1 --quantize 4bit --gradient-checkpointing \\
          --optimizer paged_adamw_8bit --store pairs.lstore --out run --batch-size 2 --grad-accum 8
      logitstore train --model ./mistral-7b --quantize 4bit --store hh.lstore --eval-store hh-eval.lstore \\
          --out run --batch-size 8 --grad-accum 4 --lr 5e-6 --eval-every 100 --save-every 200
      logitstore train --model ./tiny --store pairs.lstore --out run --resume
      logitstore train --model ./tiny --store pairs.lstore --out run --loss sigmoid,bco_pair,sft \\
          --loss-weights 0.8,0.2,1.0
      logitstore train --model ./tiny --store per-token.lstore --out run --ld-alpha 0.5
      logitstore train --model ./tiny --store kto.lstore --out run --loss kto --batch-size 8
      logitstore train --model ./tiny --store top32.lstore --out run --loss distill --distill-beta 0
      logitstore train --model ./tiny --store top32.lstore --out run --loss sigmoid,distill \\
          --loss-weights 1,0.5
      logitstore train --model ./tiny --store top32.lstore --out run --loss tdpo2 --tdpo-alpha 0.5
      torchrun --nproc_per_node 8 --no-python logitstore train --model ./mistral-7b --no-lora \\
          --store hh.lstore --out run --batch-size 64 --save-every 200
    """
    from logitstore.dpo.objectives.objective import ObjectiveError, objective_of
    from logitstore.dpo.training import TrainConfig, train as run_train
    from logitstore.dpo.training.trackers import require

    quiet = kw.pop("quiet")
    cfg = TrainConfig(**kw)
    try:
        objective_of(cfg)
    except ObjectiveError as exc:
        raise click.UsageError(str(exc)) from None
    require(cfg.report_to)  # a missing tracker library is named before the model loads
    with _quiet(quiet):
        result = run_train(cfg, progress=not quiet, log=click.echo)
    if "history" not in result:  # not rank 0 of a distributed run: rank 0 reports
        return
    last = result["history"][-1] if result.get("history") else {}
    saved = f"Adapter in {Path(result['out']) / 'adapter'}" if cfg.lora else f"Model in {Path(result['out']) / 'model'}"
    plot = f" (plot: {result['plot']})" if result.get("plot") else ""
    peak = result["peak_memory"]
    click.echo(f"Trained {result['steps']} steps; last logged loss {last.get('loss', float('nan')):.4f}. "
               f"{peak[0].upper()}{peak[1:]}. {saved}, metrics in {Path(result['out']) / 'metrics.jsonl'}{plot}.")


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(), help="Folder for everything; an "
              "earlier demo's folder is replaced (it says so), any other existing folder refused.")
@click.option("--pairs", type=click.IntRange(min=20, max=320), default=320, show_default=True,
              help="Bundled pairs to use (a tenth for evaluation).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True, help="Training steps.")
@click.option("--quiet", is_flag=True, help="Print only errors and the demo's own lines (no progress bars or "
              "library warnings).")
@debug_option
def demo(out: str, pairs: int, steps: int, quiet: bool) -> None:
    """Make a tiny model, build stores from bundled medical pairs, verify, train, and report.

    \b
    Examples:
      logitstore demo
      logitstore demo --out /tmp/demo --pairs 100 --steps 10
    """
    from logitstore.dpo.demo import run_demo

    with _quiet(quiet):
        run_demo(out, pairs=pairs, steps=steps, log=click.echo, progress=not quiet)


_RESUME = {
    "build": "run the same command again to resume: committed shards are kept, only the shard in progress is redone",
    "subset": "run the same command again to resume: committed shards are kept",
    "merge": "run the same command again to resume: committed shards are kept",
    "train": "checkpoints written with --save-every are kept; add --resume to continue from the latest",
}


def _interrupted(argv: list[str] | None) -> str:
    """The line Ctrl-C ends a command with: what is kept and how to go on."""
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), "")
    hint = _RESUME.get(command)
    return f"Interrupted; {hint}." if hint else "Interrupted."


def _end(line: str, code: int, show: Any = None) -> None:
    """Exit with `code` after the command's error `line` (`show` prints it with more, e.g. click's usage lines):
    printed once under torchrun, by rank 0, and recorded for torchrun's failure report on every rank."""
    launcher.record(line)
    if launcher.speaks():
        show() if show is not None else click.echo(line, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group and turn errors into one line."""
    import logging

    from logitstore.errors import LogitstoreError, printable
    from logitstore.extras import missing_extra

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernel notice is not the user's concern
    try:
        cli.main(args=argv, prog_name="logitstore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if _DEBUG:
            raise
        _end(f"Error: {exc.format_message()}", exc.exit_code, exc.show)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            _end(_interrupted(argv), 130)
        _end("Aborted.", 1)
    except KeyboardInterrupt:
        _end(_interrupted(argv), 130)
    except (LogitstoreError, OSError) as exc:
        if _DEBUG:
            raise
        _end(f"Error: {printable(exc)}", 1)
    except Exception as exc:  # noqa: BLE001 - the edge: one line, never a traceback without --debug
        if _DEBUG:
            raise
        needs = missing_extra(exc) if isinstance(exc, ImportError) else None
        _end(f"Error: this command {needs}" if needs else
             f"Error: {type(exc).__name__}: {printable(exc)} (run with --debug for the traceback)", 1)

if __name__ == "__main__":
    main()
