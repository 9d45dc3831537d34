"""The `logitstore` command. Commands are thin: they parse options and call the library.

Errors: a LogitstoreError (or a bad input caught by the library) prints one line and exits 1; usage errors exit 2
(click's convention); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

_DEBUG = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _DEBUG
    _DEBUG = _DEBUG or value


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show the full traceback on errors.")


def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        key, value = pair.split("=", 1)
        out[key] = value
    return out or None


def _quiet(quiet: bool) -> None:
    if quiet:  # also silences the progress bars of transformers and datasets, which use tqdm
        import os

        os.environ["TQDM_DISABLE"] = "1"


storage_option = click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                              help="fsspec option for s3:// and other URLs (repeatable).")


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


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="Local Hugging Face causal-LM folder.")
@click.option("--data", required=True, type=click.Path(), help="JSONL(.gz), Parquet, or a datasets folder.")
@click.option("--out", required=True, help="Store folder or fsspec URL (s3://bucket/path).")
@click.option("--adapter", type=click.Path(), help="peft LoRA folder applied to the model (e.g. an SFT adapter).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--quantize", type=click.Choice(["4bit"]), help="Load the reference in bitsandbytes NF4.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option("--split", help="Split of a datasets folder.")
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Tokens of prompt + completion (TRL's default).")
@click.option("--max-prompt-length", type=click.IntRange(min=1), help="Keep only the last N prompt tokens.")
@click.option("--truncation", type=click.Choice(["keep_start"]), default="keep_start", show_default=True,
              help="Cut completions at the end (the only mode TRL 1.16 supports).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Token budget per batch (chosen + rejected, padded).")
@click.option("--per-token", is_flag=True, help="Also store per-token log-probs.")
@click.option("--codec", type=click.Choice(["fixed", "float16", "float32", "raw"]), default="fixed",
              show_default=True, help="Per-token codec preset (docs/FORMAT.md).")
@click.option("--token-codec", type=click.Choice(["zstd", "raw"]), default="zstd", show_default=True)
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--no-prompt-sharing", is_flag=True, help="Score prompt+completion in one pass instead of reusing "
              "the prompt's KV cache.")
@click.option("--no-length-bucketing", is_flag=True, help="Batch pairs in data order instead of by length.")
@click.option("--skip-invalid", is_flag=True, help="Leave out invalid pairs (recorded in the store) instead of "
              "stopping.")
@click.option("--reuse", multiple=True, metavar="STORE", help="Copy the values of pairs with the same content "
              "(token ids) from this store, built with the same model, adapter and precision; only the other pairs "
              "run through the model (repeatable).")
@storage_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@debug_option
def build(**kw: Any) -> None:
    """Run the reference model over the data once and store its log-probs.

    Interrupted builds resume: run the same command again.

    \b
    Examples:
      logitstore build --model ./tiny --data pairs.jsonl --out pairs.lstore
      logitstore build --model ./mistral-7b --adapter ./sft-lora --quantize 4bit \\
          --data hh.parquet --out s3://bucket/hh.lstore --per-token --codec fixed
      logitstore build --model ./tiny --data pairs-v2.jsonl --out pairs-v2.lstore --reuse pairs.lstore
      torchrun --nproc_per_node 4 --no-python logitstore build --model M --data D --out S
    """
    from dpo.reference import BuildConfig, build as run_build

    _quiet(kw["quiet"])
    cfg = BuildConfig(model=kw["model"], data=kw["data"], out=kw["out"], adapter=kw["adapter"], dtype=kw["dtype"],
                      quantize=kw["quantize"], device=kw["device"], split=kw["split"], max_length=kw["max_length"],
                      max_prompt_length=kw["max_prompt_length"], batch_size=kw["batch_size"],
                      batch_tokens=kw["batch_tokens"], per_token=kw["per_token"], codec=kw["codec"],
                      token_codec=kw["token_codec"], rows_per_shard=kw["rows_per_shard"],
                      share_prompt=not kw["no_prompt_sharing"], length_bucketing=not kw["no_length_bucketing"],
                      skip_invalid=kw["skip_invalid"], reuse=tuple(kw["reuse"]),
                      storage_options=_storage_options(kw["storage_options"]))
    result = run_build(cfg, progress=not kw["quiet"], log=click.echo)
    click.echo(result.summary())


@cli.command()
@click.argument("store")
@click.option("--model", type=click.Path(), help="Recompute a sample with this model folder.")
@click.option("--data", type=click.Path(), help="The data the store was built from (with --model).")
@click.option("--adapter", type=click.Path())
@click.option("--sample", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--tolerance", type=float, default=1e-3, show_default=True, help="Nats per sequence sum.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@storage_option
@debug_option
def verify(store: str, model: str | None, data: str | None, adapter: str | None, sample: int, tolerance: float,
           as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Check a store: structure, completeness, every checksum, sane values.

    Exit status: 0 sound, 1 problems found, 2 usage error.

    \b
    Examples:
      logitstore verify pairs.lstore
      logitstore verify pairs.lstore --model ./tiny --data pairs.jsonl --sample 32
    """
    import logitstore

    if (model is None) != (data is None):
        raise click.UsageError("--model and --data go together")
    options = _storage_options(storage_options)
    report = logitstore.verify(store, storage_options=options)
    if model is not None and report.ok:
        from dpo.reference import BuildConfig, recompute_sample

        opened = logitstore.open(store, storage_options=options)
        precision = opened.fingerprint.get("precision", {})
        tokenization = opened.fingerprint.get("tokenization", {})
        cfg = BuildConfig(model=model, data=data or "", out=store, adapter=adapter,
                          dtype=precision.get("dtype", "float32"), quantize=precision.get("quantize"),
                          max_prompt_length=tokenization.get("max_prompt_length"))
        report.problems += recompute_sample(opened, cfg, sample, tolerance=tolerance)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(f"{report.path}: {report.examples} examples, {report.committed_shards}/{report.shards} shards, "
                   f"{report.files_checked} files checked")
        for problem in report.problems:
            click.echo(f"  problem: {problem}")
        click.echo("sound" if report.ok else f"{len(report.problems)} problem(s) found")
    sys.exit(0 if report.ok else 1)


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@storage_option
@debug_option
def info(store: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Describe a store: size, completeness, fields, fingerprint, settings.

    \b
    Examples:
      logitstore info pairs.lstore
      logitstore info pairs.lstore --json | jq .bytes
    """
    from cli.describe import describe, render

    summary = describe(store, _storage_options(storage_options))
    click.echo(json.dumps(summary) if as_json else render(summary))


@cli.command()
@click.argument("store")
@click.option("--to", "to", type=click.Choice(["trl", "parquet", "jsonl"]), required=True)
@click.option("--data", required=True, type=click.Path(), help="The data the store was built from.")
@click.option("--split")
@click.option("--out", required=True, type=click.Path(), help="Output folder (trl) or file.")
@storage_option
@debug_option
def export(store: str, to: str, data: str, split: str | None, out: str, storage_options: tuple[str, ...]) -> None:
    """Write the data with `ref_chosen_logps`/`ref_rejected_logps` columns, matched by example ID.

    \b
    Examples:
      logitstore export pairs.lstore --to trl --data pairs.jsonl --out pairs-trl
      logitstore export pairs.lstore --to parquet --data pairs.jsonl --out pairs.parquet
    """
    import logitstore
    from logitstore.export import export as run_export

    from dpo.data import load_examples

    records = []
    for ex in load_examples(data, split):
        record: dict[str, Any] = {"id": ex.id}
        if ex.prompt is not None:
            record["prompt"] = ex.prompt
        record.update(chosen=ex.chosen, rejected=ex.rejected)
        records.append(record)
    result = run_export(logitstore.open(store, storage_options=_storage_options(storage_options)), records, to, out)
    left = f" ({result['left_out']} data rows not in the store left out)" if result["left_out"] else ""
    click.echo(f"Wrote {result['rows']} rows to {result['out']}{left}.")


@cli.command()
@click.argument("store")
@click.option("--out", required=True, help="New store folder or fsspec URL.")
@click.option("--ids", "ids_file", type=click.Path(), help="File of example IDs to keep, one per line.")
@click.option("--exclude-ids", "exclude_file", type=click.Path(), help="File of example IDs to leave out, one per "
              "line.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), help="Default: the source's.")
@storage_option
@debug_option
def subset(store: str, out: str, ids_file: str | None, exclude_file: str | None, rows_per_shard: int | None,
           storage_options: tuple[str, ...]) -> None:
    """Write a new store with some of a store's pairs, copied without the model.

    Pairs keep the source's order and every stored bit. Interrupted runs resume: run the same command again.

    \b
    Examples:
      logitstore subset pairs.lstore --out clean.lstore --exclude-ids flagged.txt
      logitstore subset pairs.lstore --out eval.lstore --ids eval-ids.txt
    """
    from logitstore.derive import read_id_file, subset as run_subset

    if (ids_file is None) == (exclude_file is None):
        raise click.UsageError("give exactly one of --ids and --exclude-ids")
    listed = read_id_file(ids_file or exclude_file)  # type: ignore[arg-type]
    result = run_subset(store, out, ids=listed if ids_file else None, exclude=listed if exclude_file else None,
                        rows_per_shard=rows_per_shard, storage_options=_storage_options(storage_options))
    click.echo(result.summary())


@cli.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="New store folder or fsspec URL.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), help="Default: the first store's.")
@storage_option
@debug_option
def merge(stores: tuple[str, ...], out: str, rows_per_shard: int | None, storage_options: tuple[str, ...]) -> None:
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

    result = run_merge(list(stores), out, rows_per_shard=rows_per_shard,
                       storage_options=_storage_options(storage_options))
    click.echo(result.summary())


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="Policy base model folder (the store's model).")
@click.option("--store", required=True, help="Training store.")
@click.option("--out", required=True, type=click.Path(), help="Run folder.")
@click.option("--eval-store", help="Store to evaluate on.")
@click.option("--adapter", type=click.Path(), help="Continue training this peft adapter.")
@click.option("--max-steps", type=click.IntRange(min=1))
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=float, default=5e-5, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "paged_adamw_8bit"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--beta", type=float, default=0.1, show_default=True)
@click.option("--loss", type=click.Choice(["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"]), default="sigmoid",
              show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated or all-linear.")
@click.option("--quantize", type=click.Choice(["4bit"]))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--group-by-length", is_flag=True, help="Batch similar lengths together (less padding).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--allow-fingerprint-mismatch", is_flag=True, help="Train even if the store's model differs.")
@storage_option
@click.option("--quiet", is_flag=True)
@debug_option
def train(**kw: Any) -> None:
    """Train a LoRA policy with DPO against the reference log-probs in a store.

    \b
    Examples:
      logitstore train --model ./tiny --store pairs.lstore --out run --max-steps 100
      logitstore train --model ./mistral-7b --quantize 4bit --store hh.lstore --eval-store hh-eval.lstore \\
          --out run --batch-size 8 --grad-accum 4 --lr 5e-6 --eval-every 100 --save-every 200
      logitstore train --model ./tiny --store pairs.lstore --out run --resume
    """
    from dpo.train import TrainConfig, train as run_train

    options = _storage_options(kw.pop("storage_options"))
    quiet = kw.pop("quiet")
    _quiet(quiet)
    cfg = TrainConfig(**kw, storage_options=options)
    result = run_train(cfg, progress=not quiet, log=click.echo)
    last = result["history"][-1] if result.get("history") else {}
    click.echo(f"Trained {result['steps']} steps; last logged loss {last.get('loss', float('nan')):.4f}. "
               f"Adapter in {Path(result['out']) / 'adapter'}, metrics in {Path(result['out']) / 'metrics.jsonl'}.")


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(), help="Folder for everything.")
@click.option("--pairs", type=click.IntRange(min=20, max=320), default=320, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--quiet", is_flag=True)
@debug_option
def demo(out: str, pairs: int, steps: int, quiet: bool) -> None:
    """Make a tiny model, build stores from bundled medical pairs, verify, train, and report.

    \b
    Examples:
      logitstore demo
      logitstore demo --out /tmp/demo --pairs 100 --steps 10
    """
    from dpo.demo import run_demo

    _quiet(quiet)
    run_demo(out, pairs=pairs, steps=steps, log=click.echo, progress=not quiet)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group and turn errors into one line."""
    import logging

    from logitstore.errors import LogitstoreError

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernel notice is not the user's concern
    try:
        cli.main(args=argv, prog_name="logitstore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if _DEBUG:
            raise
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted; run the same command again to resume.", err=True)
        sys.exit(130)
    except (LogitstoreError, OSError) as exc:
        if _DEBUG:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the edge: one line, never a traceback without --debug
        if _DEBUG:
            raise
        click.echo(f"Error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
